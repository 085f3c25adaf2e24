"""Channel groups: which channel dimensions must change width together, and narrowing.

torch-pruning's ``DependencyGraph`` is the one source of truth about coupling: a conv's
output channels, the next conv's input channels, a residual stream shared by many layers,
the inputs of a linear layer after a flatten. ``neumeta.graph`` reads it (the same reading
``smooth`` uses); ``WidthSpace`` turns it into a small description of every weight-bearing
layer (which group owns each of its channel positions) that the rest of the library reads:
coordinates, resizing.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .fold import fold_batchnorm
from .graph import CONV as _CONV, CONV_T as _CONV_T, MORPHABLE_TYPES, ChannelGroup, channel_graph, group_named

Width = Union[float, int, Mapping[str, Union[int, float]]]

PRESETS = ("paper",)  # WidthSpace(groups="paper"): the groups the model names in neumeta_paper_groups
# Per-channel modules whose size is part of their configuration, not only of their tensors.
_SIZED_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Segment:
    """A run of channel positions along one dimension of a layer.

    ``group`` is None for channels that never morph (image input, class outputs). Each channel
    covers ``repeat`` consecutive positions: a linear layer after a flatten sees every conv
    channel as ``H*W`` inputs.
    """
    group: Optional[str]
    channels: int
    repeat: int = 1


@dataclass(frozen=True)
class MorphLayer:
    """A weight-bearing layer as the manifold sees it."""
    index: int
    name: str
    kind: str  # "conv", "conv_transpose" or "linear"
    out: Tuple[Segment, ...]
    inp: Tuple[Segment, ...]
    kernel: Tuple[int, ...]
    has_bias: bool
    depthwise: bool = False  # groups == in == out channels: weight [C, 1, *k], in follows out

    @property
    def morphs(self) -> bool:
        """True when a morphable group owns some of its channels; the others keep their weights."""
        return any(seg.group is not None for seg in self.out + self.inp)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"


def _dim_size(segments: Sequence[Segment], counts: Mapping[str, int]) -> int:
    return sum((counts[s.group] if s.group else s.channels) * s.repeat for s in segments)


def _channels(segments: Sequence[Segment], counts: Mapping[str, int]) -> int:
    return sum(counts[s.group] if s.group else s.channels for s in segments)


def _segments(owner: List[Optional[Tuple[str, int]]], where: str) -> Tuple[Segment, ...]:
    """Compress a per-position owner list into channel-major segments (or refuse)."""
    segments: List[Segment] = []
    pos = 0
    while pos < len(owner):
        group = owner[pos][0] if owner[pos] else None
        end = pos
        while end < len(owner) and (owner[end][0] if owner[end] else None) == group:
            end += 1
        if group is None:
            segments.append(Segment(None, end - pos, 1))
        else:
            channels = [owner[p][1] for p in range(pos, end)]
            count = len(set(channels))
            repeat = (end - pos) // count
            expected = [c for c in range(count) for _ in range(repeat)]
            if count * repeat != end - pos or channels != expected:
                raise ValueError(
                    f"{where}: the channels of group {group!r} are not laid out channel-major "
                    f"(e.g. a pixel-shuffle or an interleaving reshape); this layout cannot be resized")
            segments.append(Segment(group, count, repeat))
        pos = end
    return tuple(segments)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_grouped(module: nn.Module, name: str) -> bool:
    """True for a depthwise conv (morphs with its channel group); raise for other grouped convs."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return False
    if isinstance(module, _CONV) and groups == module.in_channels == module.out_channels:
        return True
    kind = type(module).__name__
    if isinstance(module, _CONV_T):
        why = "grouped transposed convolutions are not supported"
    elif groups == module.in_channels:
        why = (f"a depthwise convolution with a channel multiplier ({module.in_channels} -> "
               f"{module.out_channels}) is not supported; only groups == in == out channels is")
    else:
        why = (f"grouped convolution (groups={groups}, {module.in_channels} -> {module.out_channels} "
               "channels) is not supported: its channels morph in blocks of one group, which the "
               "coordinates cannot express; only depthwise convolutions (groups == channels) are")
    raise ValueError(f"module {name!r} ({kind}): {why}")


def _refuse_unresizable(group: ChannelGroup, modules: Mapping[str, nn.Module]) -> None:
    """Raise, naming the module, if a group chosen to morph holds anything but Conv/Linear sides.

    A per-channel vector (a PReLU's slopes, a norm's affine parameters, a loose ``self.scale``)
    or a norm whose configuration fixes the channel count cannot follow a width change.
    Permuting them is fine, so ``smooth`` takes the same members; only resizing is refused.
    """
    for c in group.couplings:
        if c.is_layer and not c.problem:
            continue
        sized = isinstance(modules.get(c.module), _SIZED_NORMS)
        if not (c.problem or c.tensors or sized):
            continue  # nothing tied to the channel count (a parameter-free module, a scalar)
        why = c.problem or (f"module {c.module!r} ({c.kind}) has parameters or a size tied to the "
                            f"channels of group {group.name!r}; only Conv/ConvTranspose/Linear layers "
                            "can be resized")
        raise ValueError(f"{why}. Leave the group out: fixed=[{group.name!r}] or groups=[...] "
                         "without it (BatchNorm right after a layer is folded instead)")


def _channel_owners(groups, modules: Mapping[str, nn.Module], dim_length):
    """``(layer, "out"/"in") -> [(group, channel) or None per position]`` over all groups."""
    owners: Dict[Tuple[str, str], List[Optional[Tuple[str, int]]]] = {}
    for group in groups:
        for c in group.couplings:
            if not c.is_layer:
                continue
            if len(c.positions) % group.size:
                raise ValueError(f"module {c.module!r}: {len(c.positions)} {c.side} positions do not divide "
                                 f"into the {group.size} channels of group {group.name!r}")
            key = (c.module, c.side)
            if key not in owners:
                owners[key] = [None] * dim_length(modules[c.module], c.side)
            for pos, channel in zip(c.positions, c.channels):
                if owners[key][pos] not in (None, (group.name, channel)):
                    raise ValueError(f"module {c.module!r}: {c.side} position {pos} is claimed by two groups")
                owners[key][pos] = (group.name, channel)
    return owners


class WidthSpace:
    """The morphable channel groups of a network and its weight-bearing layers.

    Args:
        model: any traceable ``nn.Module``; BatchNorm is folded into a private copy.
        example_inputs: a tensor (or tuple of tensors) the model accepts, used for tracing.
        groups: names of the groups allowed to morph (a group is named after the module
            whose output channels define it, e.g. ``"conv1"``; any member module's name works
            too). ``None`` morphs every internal group. A preset name instead of a list:
            ``"paper"``, the groups the paper's release morphs, declared by the model as
            ``neumeta_paper_groups`` (module names): for the CIFAR ResNets the inner group of
            the last block of layer3 (``layer3.2.conv1`` in resnet20); for the ImageNet
            ResNets, by analogy, the inner group(s) of the last block of layer4. Other models
            have no preset and ``"paper"`` is an error.
        fixed: module names whose *output* channels never morph, added to the output layers
            found automatically (every layer whose output reaches the model's output through
            parameter-free operations: a softmax, a sigmoid, a reshape). Where the output is
            computed in a way the reader cannot follow (e.g. a product of two layers' outputs)
            it says so and asks for them here. Fixing a layer keeps its whole group fixed, which
            is also how to keep a group holding something unresizable (a PReLU's slopes, a
            GroupNorm) out of the morphing.

    A group that morphs may hold only Conv/ConvTranspose/Linear sides and parameter-free
    modules; anything else is an error naming the module, raised only for groups chosen to
    morph. ``smooth`` reads the same groups (``neumeta.graph``) and may permute all of them.
    """

    max_extrapolation = 2.0
    """The widest multiplier ``resolve`` accepts (a channel count likewise, relative to the full
    size): a little beyond 1.0 extrapolates the trained range, far beyond it means nothing and
    would allocate a huge network."""

    def __init__(self, model: nn.Module, example_inputs, groups: Union[None, str, Sequence[str]] = None,
                 fixed: Sequence[str] = ()):
        self.model = fold_batchnorm(model, example_inputs).eval()
        self.example_inputs = example_inputs
        modules = dict(self.model.named_modules())
        for mname, module in modules.items():  # refused whichever groups morph: never generated right
            if isinstance(module, MORPHABLE_TYPES):
                _check_grouped(module, mname)
        graph = channel_graph(self.model, example_inputs, fixed)
        self.output_layers = list(graph.output_layers)
        self.all_groups: Dict[str, ChannelGroup] = {g.name: g for g in graph.groups}
        self.groups = self._select(self.all_groups, groups)
        for group in self.groups.values():
            _refuse_unresizable(group, modules)
        owners = _channel_owners(self.all_groups.values(), modules, self._dim_length)

        self.layers: List[MorphLayer] = []
        for mname, module in self.model.named_modules():
            if not isinstance(module, MORPHABLE_TYPES):
                continue
            depthwise = _check_grouped(module, mname)
            segs = {}
            for dim in ("out", "in"):
                owner = owners.get((mname, dim), [None] * self._dim_length(module, dim))
                owner = [o if o and o[0] in self.groups else None for o in owner]
                segs[dim] = _segments(owner, f"{mname}.{dim}")
            if depthwise:  # input channel c *is* output channel c; the graph lists only one side
                if any(s.group for s in segs["in"]) and segs["in"] != segs["out"]:
                    raise ValueError(f"module {mname!r}: depthwise convolution whose input channels "
                                     f"({segs['in']}) do not follow its output channels ({segs['out']})")
                segs["in"] = segs["out"]
            kind = "conv_transpose" if isinstance(module, _CONV_T) else "conv" if isinstance(module, _CONV) else "linear"
            kernel = tuple(module.kernel_size) if kind != "linear" else ()
            self.layers.append(MorphLayer(len(self.layers), mname, kind, segs["out"], segs["in"], kernel,
                                          module.bias is not None, depthwise))
        for p in self.model.parameters():  # the reference is never trained; tracing needed grads
            p.requires_grad_(False)
        full = self.full
        self.max_channels = max(max(self.layer_channels(l, full)) for l in self.layers)

    @staticmethod
    def _dim_length(module: nn.Module, dim: str) -> int:
        w = module.weight
        if isinstance(module, _CONV_T):
            return w.shape[0] if dim == "in" else w.shape[1] * module.groups
        return w.shape[0] if dim == "out" else w.shape[1] * getattr(module, "groups", 1)

    def _select(self, all_groups: Dict[str, ChannelGroup], wanted) -> Dict[str, ChannelGroup]:
        if wanted is None:
            return dict(all_groups)
        if isinstance(wanted, str):
            if wanted not in PRESETS:
                raise ValueError(f"groups={wanted!r} is not a preset ({', '.join(PRESETS)}); "
                                 f"to pick groups by name pass a list, e.g. groups=[{wanted!r}]")
            wanted = getattr(self.model, "neumeta_paper_groups", None)
            if wanted is None:
                raise ValueError(f"groups='paper': {type(self.model).__name__} declares no paper preset "
                                 "(neumeta_paper_groups); it is defined for the registry's ResNets "
                                 "(resnet20, resnet56, resnet18, resnet50). Pass group names instead.")
        chosen = {}
        for name in wanted:
            chosen[self.group_of(name, all_groups)] = None
        return {g: all_groups[g] for g in all_groups if g in chosen}

    @staticmethod
    def group_of(name: str, groups: Mapping[str, ChannelGroup]) -> str:
        """Resolve a group name, or a member module's name, to its group name."""
        return group_named(name, groups.values())

    # ------------------------------------------------------------------ widths
    @property
    def full(self) -> Dict[str, int]:
        """Channel count of every morphable group at full width."""
        return {g.name: g.size for g in self.groups.values()}

    def resolve(self, width: Width) -> Dict[str, int]:
        """Turn a width multiplier, or a ``{group: count or multiplier}`` dict, into channel counts.

        An ``int`` in a dict is an exact channel count, a ``float`` a multiplier of that group.
        Groups left out of a dict keep their full width. A width must be a finite number > 0 and
        at most ``max_extrapolation`` (times the group's full size, for a count).
        """
        counts = dict(self.full)
        if isinstance(width, Mapping):
            items = [(self.group_of(k, self.groups), v) for k, v in width.items()]
        elif _is_number(width):  # one multiplier for every group, even when written as an int
            items = [(g, width) for g in counts]
        else:
            raise ValueError(f"width {width!r} is neither a number nor a dict of group widths")
        for gname, value in items:
            counts[gname] = self._channel_count(gname, value, exact=isinstance(width, Mapping))
        return counts

    def _channel_count(self, gname: str, value, exact: bool) -> int:
        """Channels of group ``gname`` for ``value``: an exact count if ``exact`` and ``value`` is
        an int, else a multiplier of the group's full size. Refused naming both when unusable."""
        size, limit = self.groups[gname].size, self.max_extrapolation
        if not _is_number(value):
            raise ValueError(f"width {value!r} for group {gname!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"width {value!r} for group {gname!r} must be a finite number")
        if value <= 0:
            raise ValueError(f"width {value} for group {gname!r} must be > 0")
        exact = exact and isinstance(value, numbers.Integral)  # checked before rounding: 1e308 * size is inf
        if (value > limit * size) if exact else (value > limit):
            asked = f"{value} channels" if exact else f"multiplier {value!r}"
            raise ValueError(f"width {value!r} for group {gname!r} ({size} channels) is too wide: {asked} is "
                             f"beyond WidthSpace.max_extrapolation = {limit:g} times the trained width")
        count = int(value) if exact else int(round(size * value))
        if count < 1:
            raise ValueError(f"width {value} leaves group {gname!r} ({size} channels) with 0 channels; "
                             f"the smallest multiplier for it is {0.5 / size:.3g}")
        return count

    def is_extrapolation(self, counts: Mapping[str, int]) -> bool:
        return any(counts[g] > s for g, s in self.full.items())

    # ------------------------------------------------------------------ shapes and modules
    def layer_channels(self, layer: MorphLayer, counts: Mapping[str, int]) -> Tuple[int, int]:
        """(input channels, output channels) of ``layer`` at ``counts``; flatten repeats not counted.

        The input count is what one output channel reads (its fan-in, the weight's axis 1): 1 for
        a depthwise convolution.
        """
        if layer.depthwise:
            return 1, _channels(layer.out, counts)
        return _channels(layer.inp, counts), _channels(layer.out, counts)

    def parameter_shapes(self, counts: Mapping[str, int]) -> Dict[str, torch.Size]:
        shapes = {}
        for layer in self.layers:
            out, inp = _dim_size(layer.out, counts), _dim_size(layer.inp, counts)
            if layer.depthwise:
                shapes[layer.weight_name] = torch.Size((out, 1) + layer.kernel)
            elif layer.kind == "conv_transpose":
                shapes[layer.weight_name] = torch.Size((inp, out) + layer.kernel)
            else:
                shapes[layer.weight_name] = torch.Size((out, inp) + layer.kernel)
            if layer.has_bias:
                shapes[layer.bias_name] = torch.Size((out,))
        return shapes

    def build(self, counts: Mapping[str, int]) -> nn.Module:
        """A standalone copy of the (folded) model resized to ``counts``: the weights of layers a
        morphable group touches are zeros (to be written), every other layer keeps the reference's."""
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        for layer in self.layers:
            module = modules[layer.name]
            out, inp = _dim_size(layer.out, counts), _dim_size(layer.inp, counts)
            if layer.kind == "linear":
                module.in_features, module.out_features = inp, out
            else:
                module.in_channels, module.out_channels = inp, out
                if layer.depthwise:
                    module.groups = out
        fixed = {layer.name for layer in self.layers if not layer.morphs}
        shapes = self.parameter_shapes(counts)
        for name, shape in shapes.items():
            mname, pname = name.rsplit(".", 1)
            if mname in fixed:
                continue
            old = getattr(modules[mname], pname)
            setattr(modules[mname], pname, nn.Parameter(old.new_zeros(shape)))
        for p in model.parameters():
            p.requires_grad_(True)
        return model
