"""Channel groups: which channel dimensions must change width together, and narrowing.

torch-pruning's ``DependencyGraph`` is the one source of truth about coupling: a conv's
output channels, the next conv's input channels, a residual stream shared by many layers,
the inputs of a linear layer after a flatten. ``WidthSpace`` turns its groups into a small
description of every weight-bearing layer (which group owns each of its channel positions)
that the rest of the library reads: coordinates, resizing, smoothing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from .fold import fold_batchnorm

Width = Union[float, int, Mapping[str, Union[int, float]]]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MORPHABLE_TYPES = _CONV + _CONV_T + (nn.Linear,)
PRESETS = ("paper",)  # WidthSpace(groups="paper"): the groups the model names in neumeta_paper_groups


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
class ChannelGroup:
    name: str
    size: int
    members: Tuple[str, ...]  # "module.out" / "module.in" of every coupled layer


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


def _output_modules(model: nn.Module, example_inputs) -> List[str]:
    """Names of the leaf modules whose output *is* (part of) the model's output.

    Their output channels are what the task needs (classes, image channels), so they stay fixed.
    """
    produced: Dict[int, str] = {}
    keep = []

    def hook(name):
        def record(_module, _inputs, output):
            for t in _flatten(output):
                produced[id(t)] = name
                keep.append(t)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, MORPHABLE_TYPES)]
    try:
        with torch.no_grad():
            out = model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return sorted({produced[id(t)] for t in _flatten(out) if id(t) in produced})


def _flatten(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flatten(o)]
    return []


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)


def group_name(group, names: Dict[nn.Module, str]) -> str:
    """A stable name for a torch-pruning group: the first module, in definition order, whose
    output channels it holds (a residual stream is named after its first producer)."""
    order = {m: i for i, m in enumerate(names)}
    producers = [item.dep.target.module for item in group.items
                 if item.dep.target.module in names and isinstance(item.dep.target.module, MORPHABLE_TYPES)
                 and "out_channels" in getattr(item.dep.handler, "__name__", "")]
    return names[min(producers, key=order.__getitem__)] if producers else names[group.items[0].dep.target.module]


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
        fixed: module names whose *output* channels never morph (added to the automatically
            detected output layers).
    """

    def __init__(self, model: nn.Module, example_inputs, groups: Union[None, str, Sequence[str]] = None,
                 fixed: Sequence[str] = ()):
        self.model = fold_batchnorm(model, example_inputs).eval()
        self.example_inputs = example_inputs
        names = {m: n for n, m in self.model.named_modules()}
        modules = dict(self.model.named_modules())
        for name in fixed:
            if name not in modules:
                raise KeyError(f"fixed={name!r}: no such module")
        self.output_layers = sorted(set(_output_modules(self.model, example_inputs)) | set(fixed))

        graph = tp.DependencyGraph().build_dependency(self.model, example_inputs=example_inputs)
        ignored = [modules[n] for n in self.output_layers]
        owners: Dict[Tuple[str, str], List[Optional[Tuple[str, int]]]] = {}
        all_groups: Dict[str, ChannelGroup] = {}
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=MORPHABLE_TYPES):
            root = group.items[0]
            gname = group_name(group, names)
            size = len(root.idxs)
            members = []
            for item in group.items:
                module = item.dep.target.module
                handler = getattr(item.dep.handler, "__name__", "")
                if module not in names:  # torch-pruning's own ops: add, concat, reshape, ...
                    continue
                mname = names[module]
                if not isinstance(module, MORPHABLE_TYPES):
                    if any(True for _ in module.parameters(recurse=False)):
                        raise ValueError(
                            f"module {mname!r} ({type(module).__name__}) has parameters tied to the "
                            f"channels of group {gname!r}; only Conv/ConvTranspose/Linear layers can be "
                            f"resized (fold BatchNorm first, or pass it in fixed=)")
                    continue
                _check_grouped(module, mname)
                dim = "out" if "out_channels" in handler else "in" if "in_channels" in handler else None
                if dim is None:
                    continue
                idxs = [int(getattr(i, "idx", i)) for i in item.idxs]
                if len(idxs) % size:
                    raise ValueError(f"module {mname!r}: {len(idxs)} {dim} positions do not divide "
                                     f"into the {size} channels of group {gname!r}")
                repeat = len(idxs) // size
                key = (mname, dim)
                if key not in owners:
                    owners[key] = [None] * self._dim_length(module, dim)
                for n, pos in enumerate(idxs):
                    if owners[key][pos] not in (None, (gname, n // repeat)):
                        raise ValueError(f"module {mname!r}: {dim} position {pos} is claimed by two groups")
                    owners[key][pos] = (gname, n // repeat)
                members.append(f"{mname}.{dim}")
            all_groups[gname] = ChannelGroup(gname, size, tuple(dict.fromkeys(members)))

        order = {n: i for i, n in enumerate(modules)}
        self.all_groups = {n: all_groups[n] for n in sorted(all_groups, key=order.__getitem__)}
        self.groups = self._select(self.all_groups, groups)
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
        if name in groups:
            return name
        hits = [g.name for g in groups.values() if f"{name}.out" in g.members]
        if len(hits) == 1:
            return hits[0]
        raise KeyError(f"unknown channel group {name!r}; groups are: {', '.join(groups) or '(none)'}")

    # ------------------------------------------------------------------ widths
    @property
    def full(self) -> Dict[str, int]:
        """Channel count of every morphable group at full width."""
        return {g.name: g.size for g in self.groups.values()}

    def resolve(self, width: Width) -> Dict[str, int]:
        """Turn a width multiplier, or a ``{group: count or multiplier}`` dict, into channel counts.

        An ``int`` in a dict is an exact channel count, a ``float`` a multiplier of that group.
        Groups left out of a dict keep their full width.
        """
        counts = dict(self.full)
        if isinstance(width, Mapping):
            items = [(self.group_of(k, self.groups), v) for k, v in width.items()]
        elif isinstance(width, (int, float)) and not isinstance(width, bool):
            items = [(g, float(width)) for g in counts]
        else:
            raise TypeError(f"width must be a number or a dict of group widths, not {type(width).__name__}")
        for gname, value in items:
            size = self.groups[gname].size
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"width of group {gname!r} must be a number, not {value!r}")
            if value <= 0:
                raise ValueError(f"width {value} for group {gname!r} must be > 0")
            count = int(value) if isinstance(value, int) else int(round(size * value))
            if count < 1:
                raise ValueError(f"width {value} leaves group {gname!r} ({size} channels) with 0 channels; "
                                 f"the smallest multiplier for it is {0.5 / size:.3g}")
            counts[gname] = count
        return counts

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
