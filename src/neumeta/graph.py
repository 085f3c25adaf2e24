"""One reading of a network's channel coupling, shared by ``WidthSpace`` and ``smooth``.

Both need the same facts: which channel dimensions torch-pruning's ``DependencyGraph`` couples
into groups, which tensor axes each group owns (a producer's weight rows and bias, a consumer's
weight columns, the per-channel vectors of the norms and activations in between, a loose
parameter such as ``x * self.scale``), and which layers produce the model's output. Read twice,
the two readers disagreed (smooth permuted PReLU slopes that WidthSpace never saw). Here they
are read once; each user then applies its own rule to the same members: permuting a PReLU's
slopes keeps the function, resizing them is not supported.

Output layers are found by walking the autograd graph back from the model's outputs: a layer
whose output reaches them through parameter-free operations only (an activation, a softmax,
a reshape, a concatenation) produces what the task needs, so its output channels stay fixed.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = ["ChannelGraph", "ChannelGroup", "Coupling", "MORPHABLE_TYPES", "channel_graph",
           "find_output_layers", "group_named"]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MORPHABLE_TYPES = CONV + CONV_T + (nn.Linear,)


@dataclass(frozen=True)
class Coupling:
    """One module's (or loose parameter's) share of a channel group.

    ``positions[k]`` is a position along the module's ``side`` that holds group channel
    ``channels[k]``: a layer after a flatten holds each channel at several positions, a layer
    after a concatenation holds only part of its input in this group. ``tensors`` are the
    (qualified name, axis) pairs those positions index. ``problem`` says why the coupling can be
    neither permuted nor resized (empty when it can).
    """
    module: str                        # qualified module name; for a loose parameter its own name
    kind: str                          # class name: "Conv2d", "PReLU", "Parameter", ...
    side: str                          # "out" / "in" of a layer ("unknown": a problem), "channel" otherwise
    positions: Tuple[int, ...]
    channels: Tuple[int, ...]          # -1 where torch-pruning gives no mapping (then a problem)
    tensors: Tuple[Tuple[str, int], ...]
    problem: str = ""

    @property
    def is_layer(self) -> bool:
        """A Conv/ConvTranspose/Linear side: the only couplings a width change can resize."""
        return self.side in ("out", "in")


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be permuted or resized together, named after their first producer."""
    name: str
    size: int
    couplings: Tuple[Coupling, ...]

    @property
    def members(self) -> Tuple[str, ...]:
        """``"module.out"`` / ``"module.in"`` of every coupled Conv/ConvTranspose/Linear layer."""
        return tuple(dict.fromkeys(f"{c.module}.{c.side}" for c in self.couplings if c.is_layer))

    @property
    def producers(self) -> Tuple[str, ...]:
        """The layers whose output channels are the group's."""
        return tuple(dict.fromkeys(c.module for c in self.couplings if c.side == "out"))

    def tensor_axes(self) -> FrozenSet[Tuple[str, int]]:
        """Every (tensor name, axis) the group's channels index."""
        return frozenset(t for c in self.couplings for t in c.tensors)


@dataclass(frozen=True)
class ChannelGraph:
    groups: Tuple[ChannelGroup, ...]   # in module definition order; output groups left out
    output_layers: Tuple[str, ...]     # found from the outputs, plus the caller's ``fixed``


def group_named(name: str, groups: Iterable[ChannelGroup]) -> str:
    """The group ``name`` stands for: a group's own name, or the name of the layer producing it."""
    groups = list(groups)
    if any(g.name == name for g in groups):
        return name
    hits = [g.name for g in groups if name in g.producers]
    if len(hits) == 1:
        return hits[0]
    raise KeyError(f"unknown channel group {name!r}; groups are: {', '.join(g.name for g in groups) or '(none)'}")


def channel_graph(model: nn.Module, example_inputs, fixed: Sequence[str] = ()) -> ChannelGraph:
    """The channel groups of ``model`` and its output layers, read from one trace.

    ``fixed`` names layers whose output channels must not change, on top of the output layers
    found automatically; a group holding any of their output channels is left out. The model is
    traced in eval mode with gradients on (torch-pruning follows the autograd graph); its
    modes and ``requires_grad`` flags are restored afterwards.
    """
    modules = dict(model.named_modules())
    outputs, _, tp_groups = dependency_groups(model, example_inputs, fixed)
    names = {m: n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    groups = [_read_group(g, names, param_names) for g in tp_groups]
    order = {n: i for i, n in enumerate(modules)}
    groups.sort(key=lambda g: order.get(g.name, len(order)))
    return ChannelGraph(tuple(groups), tuple(outputs))


def dependency_groups(model: nn.Module, example_inputs, fixed: Sequence[str] = ()):
    """(output layers, torch-pruning's ``DependencyGraph``, its groups without the output layers'
    channels): the one trace ``channel_graph`` reads, and the pruning baselines prune with."""
    modules = dict(model.named_modules())
    for name in fixed:
        if name not in modules:
            raise KeyError(f"fixed={name!r}: no such module")
    with _traceable(model):
        outputs = find_output_layers(model, example_inputs, fixed)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        tp_groups = list(graph.get_all_groups(ignored_layers=[modules[n] for n in outputs],
                                              root_module_types=MORPHABLE_TYPES))
    return outputs, graph, tp_groups


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in grads:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for p, flag in grads.items():
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------

def _group_name(group, names: Dict[nn.Module, str]) -> str:
    """The first module, in definition order, whose output channels the group holds (a residual
    stream is named after its first producer)."""
    order = {m: i for i, m in enumerate(names)}
    producers = [item.dep.target.module for item in group.items
                 if item.dep.target.module in names and isinstance(item.dep.target.module, MORPHABLE_TYPES)
                 and "out_channels" in getattr(item.dep.handler, "__name__", "")]
    return names[min(producers, key=order.__getitem__)] if producers else names[group.items[0].dep.target.module]


def _read_group(group, names: Dict[nn.Module, str], param_names: Dict[int, str]) -> ChannelGroup:
    gname = _group_name(group, names)
    couplings = []
    for item in group.items:
        target = item.dep.target.module
        if isinstance(target, nn.Parameter):
            pname = param_names[id(target)]
            module, kind, side = pname, "Parameter", "channel"
            tensors, problem = _loose_parameter_axis(target, pname)
        elif target in names:
            module, kind = names[target], type(target).__name__
            handler = getattr(item.dep.handler, "__name__", "")
            side = ("out" if "out_channels" in handler else "in" if "in_channels" in handler else "unknown") \
                if isinstance(target, MORPHABLE_TYPES) else "channel"
            tensors, problem = _sliced_tensors(target, module, side)
        else:
            continue  # torch-pruning's own nodes (add, cat, reshape, ...): nothing to slice
        if any(r is None for r in item.root_idxs):
            problem = problem or (f"module {module!r} ({kind}): torch-pruning gives no channel mapping "
                                  f"for it (e.g. attention heads repeated), so its positions cannot be "
                                  f"matched to the channels of group {gname!r}")
        channels = tuple(-1 if r is None else int(r) for r in item.root_idxs)
        positions = tuple(int(getattr(i, "idx", i)) for i in item.idxs)
        couplings.append(Coupling(module, kind, side, positions, channels, tensors, problem))
    return ChannelGroup(gname, len(group.items[0].idxs), tuple(couplings))


def _sliced_tensors(module: nn.Module, name: str, side: str):
    """((qualified tensor, axis), ...) that one channel position of ``module`` on ``side`` slices,
    and a problem (empty if none).

    Conv/Linear weights are [out, in, ...], ConvTranspose weights [in, out, ...]; a depthwise
    conv (groups == in == out) holds input and output channel c in the same row, axis 0. Any
    other module may hold per-channel vectors (norms, PReLU's slopes) or scalars (shared).
    """
    kind = type(module).__name__
    prefix = f"{name}." if name else ""
    if isinstance(module, MORPHABLE_TYPES):
        groups = getattr(module, "groups", 1)
        depthwise = groups > 1 and groups == module.in_channels == module.out_channels
        if groups > 1 and not depthwise:
            return (), (f"module {name!r} ({kind}): grouped convolution (groups={groups}) ties its "
                        "channels in blocks; only depthwise convolutions (groups == channels) are supported")
        if side == "unknown":
            return (), f"module {name!r} ({kind}): torch-pruning couples it to a channel group in an unknown way"
        if side == "out" or depthwise:
            axis = 1 if isinstance(module, CONV_T) and not depthwise else 0
            bias = ((f"{prefix}bias", 0),) if module.bias is not None else ()
            return ((f"{prefix}weight", axis),) + bias, ""
        return ((f"{prefix}weight", 0 if isinstance(module, CONV_T) else 1),), ""
    tensors = []
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    for attr, tensor in own:
        if tensor is None or tensor.numel() <= 1:
            continue  # a scalar (PReLU's single slope, BatchNorm's batch counter) is shared
        if tensor.dim() != 1:
            return (), (f"module {name!r} ({kind}) has {attr!r} of shape {tuple(tensor.shape)} tied "
                        "to the channels of a group; only per-channel vectors can follow a channel")
        tensors.append((f"{prefix}{attr}", 0))
    return tuple(tensors), ""


def _loose_parameter_axis(param: torch.Tensor, name: str):
    """The channel axis of a parameter used outside a module (e.g. ``x * self.scale``)."""
    axes = [a for a, n in enumerate(param.shape) if n > 1]
    if len(axes) != 1:
        return (), (f"parameter {name!r} of shape {tuple(param.shape)} is tied to a channel group "
                    "along an unknown axis; wrap it in a module")
    return ((name, axes[0]),), ""


# ----------------------------------------------------------------------------------------------
# Output layers
# ----------------------------------------------------------------------------------------------

# Operations that mix channels with learned or computed weights: past one of them the output's
# shape no longer follows a layer's channels in a way this walk can tell.
_MIXING = re.compile(r"^((Add|Baddb|Addb)?(mm|bmm|mv|dot|vdot)|Mm|Bmm|Mv|Dot|Vdot|Linear|MkldnnLinear"
                     r"|Embedding)Backward|Convolution|Conv(Depthwise|Transpose)?\d|^SlowConv")


def find_output_layers(model: nn.Module, example_inputs, fixed: Sequence[str] = ()) -> List[str]:
    """Names of the Conv/ConvTranspose/Linear layers whose output channels reach the model's
    output through parameter-free operations (plus ``fixed``), sorted.

    The walk goes back from each output's ``grad_fn`` and stops at the first layer output on
    every path. Where a path meets an operation that mixes channels outside a layer (a matmul of
    two activations, ``F.linear`` with a raw weight) the output layers cannot be told; that is
    an error unless the caller names them in ``fixed``.
    """
    layers = {m: n for n, m in model.named_modules() if isinstance(m, MORPHABLE_TYPES)}
    layer_params = {id(p): n for m, n in layers.items() for p in m.parameters(recurse=False)}
    made_by: Dict[int, str] = {}
    keep = []  # the grad_fns, alive so their ids are not reused

    def record(module, _inputs, output):
        for t in _tensors(output):
            if t.grad_fn is not None:
                made_by[id(t.grad_fn)] = layers[module]
                keep.append(t.grad_fn)

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with _traceable(model), torch.random.fork_rng(devices=[]):
            out = model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()

    found, unfollowed = set(fixed), []
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in made_by:
            found.add(made_by[id(node)])
            continue
        kind = type(node).__name__
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a parameter read directly
            if id(variable) in layer_params:
                unfollowed.append(f"a direct use of {layer_params[id(variable)]!r}'s parameters")
            continue
        if _MIXING.search(kind):
            unfollowed.append(kind)
            continue
        stack.extend(f for f, _ in node.next_functions if f is not None)
    if unfollowed and not fixed:
        raise ValueError(
            "cannot tell which layers produce the model's output: it is computed through "
            f"{', '.join(sorted(set(unfollowed)))}, which mixes channels outside a Conv/Linear module. "
            "Pass fixed=[...] with the names of the layers whose output channels the output needs"
            + (f" (found so far: {', '.join(sorted(found))})" if found else ""))
    return sorted(found)


def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
