"""Fold BatchNorm into the Conv/Linear layer in front of it.

The weight representation in this library describes plain Conv/Linear weights, so a network
has to be BatchNorm-free first. In eval mode a BatchNorm is a fixed per-channel affine map,
    y = (z - mean) / sqrt(var + eps) * gamma + beta,
and when z is the output of a Conv/Linear layer that nothing else reads, that map can be
moved into the layer's weight and bias, leaving the function unchanged.

`fold_batchnorm` returns such a folded copy. Every BatchNorm must be foldable: one that
is not (it follows an add, a ReLU, a pooling, or the layer before it feeds something else
too) is an error rather than something silently left behind.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["fold_batchnorm"]

FOLDABLE_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# What makes or reads a tensor: ("module", qualified name), ("op", the operation's name) or
# ("other", a description). Kept as pairs so an operation is never mistaken for a module.
Label = tuple[str, str]


def fold_batchnorm(model: nn.Module, example_inputs=None) -> nn.Module:
    """Return an eval-mode deep copy of `model` with every BatchNorm folded away.

    Each BatchNorm{1,2,3}d must directly follow a Conv{1,2,3}d, ConvTranspose{1,2,3}d or
    Linear whose output it alone reads; its running statistics (and affine weight/bias)
    are folded into that layer, and the BatchNorm is replaced by `nn.Identity()` under the
    same name, so module classes and names stay as they were. `model` is not modified.

    The pairs are found with torch.fx. For a model fx cannot trace, pass `example_inputs`
    (a tensor, or a tuple of positional arguments): the model is then run once on them
    and the pairs are read off what each module produced and consumed. The caller is
    responsible for those inputs taking the same path through the model as real ones.

    Raises ValueError naming the BatchNorm when one cannot be folded, and TypeError when
    the model is not fx-traceable and no example_inputs were given.

    Layers must be exactly those classes: a subclass may use its weight differently in
    forward (weight standardisation, say), so folding into it is refused.

    Limitation: the channel axis is not checked against shapes, so a Linear applied to a
    3-d input followed by a BatchNorm1d over the *sequence* axis (with a coinciding size)
    would be folded along the wrong axis. BatchNorm after Linear is assumed to be over
    the Linear's features.
    """
    folded = copy.deepcopy(model).eval()
    if not any(isinstance(m, BATCHNORMS) for m in folded.modules()):
        return folded

    bn_sources, uses = _find_uses(folded, example_inputs)
    pairs = _plan(folded, bn_sources, uses)
    for bn_name, layer_name in pairs.items():
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
    _replace_with_identity(folded, {id(folded.get_submodule(n)) for n in pairs})
    return folded


def _find_uses(model: nn.Module, example_inputs):
    """Trace with fx; where fx cannot trace the model, run it once on example_inputs instead.

    The eager run is the judge: an error the model's forward raises by itself (a shape
    mismatch, a ``raise`` in forward) raises there too and propagates, rather than being taken
    for a tracing problem. Without example_inputs only a failure of tracing itself (fx's
    TraceError, an error inside fx, an operation a Proxy does not support) becomes the
    TypeError asking for them; any other error is the model's and propagates as it is.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # fx raises many kinds: TraceError, TypeError, RuntimeError ...
        failure = err
    else:
        return _uses_from_graph(model, graph)
    if example_inputs is not None:
        return _HookTracer(model).run(example_inputs)  # outside the except: its errors stand alone
    if _is_tracing_failure(failure):
        raise TypeError(
            f"fold_batchnorm: {type(model).__name__} is not fx-traceable ({failure}); "
            "pass example_inputs so the model can be run once to find which layer "
            "each BatchNorm follows"
        ) from failure
    if hasattr(failure, "add_note"):  # Python 3.11+
        failure.add_note("fold_batchnorm traced the model with torch.fx; if this error only happens "
                         "while tracing, pass example_inputs to run the model eagerly instead")
    raise failure


_FX_DIR = os.path.dirname(fx.__file__) + os.sep


def _is_tracing_failure(err: BaseException) -> bool:
    """True when fx itself gave up: TraceError, an error raised inside torch.fx, or Python
    refusing a Proxy (``range(x.shape[0])``); False for an error the forward raised itself."""
    if isinstance(err, fx.proxy.TraceError) or "Proxy" in str(err):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(_FX_DIR)


# --- Finding conv -> BN pairs with torch.fx -------------------------------------------------

class _LeafTracer(fx.Tracer):
    """Keeps conv/linear/BN modules whole, subclasses too, so each is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FOLDABLE_LAYERS + BATCHNORMS) or super().is_leaf_module(m, qualname)


def _uses_from_graph(model: nn.Module, graph: fx.Graph):
    """For each BN call, what made its input; for each module call, what reads its output."""
    bn_sources: dict[str, list[Label]] = defaultdict(list)
    uses: dict[str, list[list[Label]]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        uses[node.target].append([_node_label(u) for u in node.users if not _reads_only_metadata(u)])
        if isinstance(model.get_submodule(node.target), BATCHNORMS):
            x = node.args[0] if node.args else node.kwargs.get("input")
            bn_sources[node.target].append(_node_label(x))
    return bn_sources, uses


def _node_label(node) -> Label:
    if not isinstance(node, fx.Node):
        return ("other", f"the constant {node!r}")
    if node.op == "call_module":
        return ("module", node.target)
    if node.op == "call_function":
        return ("op", getattr(node.target, "__name__", str(node.target)))
    if node.op == "call_method":
        return ("op", f".{node.target}()")
    if node.op == "placeholder":
        return ("other", "the model input")
    if node.op == "output":
        return ("other", "the model output")
    return ("other", f"{node.op} {node.target}")


def _reads_only_metadata(node: fx.Node) -> bool:
    """x.shape / x.size() do not read values, and folding keeps shapes, so they don't count."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return (node.op == "call_function" and node.target is getattr
            and node.args[1] in ("shape", "ndim", "dtype", "device"))


# --- Finding conv -> BN pairs by running the model ------------------------------------------

class _HookTracer(TorchFunctionMode):
    """Runs the model once, noting which leaf module made each tensor and what read it.

    Forward hooks see module calls; the torch-function mode sees the operations between
    them (an add, a functional relu), which hooks alone would miss, so a layer output that
    is also read outside its BatchNorm is caught. Operations inside leaf modules (the conv
    kernel itself) are ignored by counting how deep in leaf-module calls we are.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = {m: n for n, m in model.named_modules() if next(m.children(), None) is None}
        self.made_by: dict[int, tuple[str, int]] = {}  # id(tensor) -> (module name, call index)
        self.keep: list[torch.Tensor] = []             # those tensors, alive so ids aren't reused
        self.depth = 0
        self.bn_sources: dict[str, list[Label]] = defaultdict(list)
        self.uses: dict[str, list[list[Label]]] = defaultdict(list)

    def run(self, example_inputs):
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        handles = []
        for m in self.names:
            handles.append(m.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(m.register_forward_hook(self._after))
        try:
            with torch.no_grad(), self:
                output = self.model(*args)
        finally:
            for h in handles:
                h.remove()
        # Returning a layer's output reads it too (fx sees this as the output node).
        self._note_reads(_tensors(output), ("other", "the model output"))
        return self.bn_sources, self.uses

    def _note_reads(self, tensors, reader: Label):
        for t in tensors:
            if id(t) in self.made_by:
                name, call = self.made_by[id(t)]
                self.uses[name][call].append(reader)

    def _before(self, module, args, kwargs):
        if self.depth == 0:
            inputs = list(_tensors((args, kwargs)))
            name = self.names[module]
            if isinstance(module, BATCHNORMS):
                made = self.made_by.get(id(inputs[0])) if inputs else None
                self.bn_sources[name].append(
                    ("module", made[0]) if made else ("other", "an operation or the model input"))
            self._note_reads(inputs, ("module", name))
        self.depth += 1

    def _after(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            name = self.names[module]
            self.uses[name].append([])
            for t in _tensors(output):
                self.made_by[id(t)] = (name, len(self.uses[name]) - 1)
                self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Results without tensors (x.shape, x.dim()) don't read values, so they don't count.
        if self.depth == 0 and next(_tensors(out), None) is not None:
            self._note_reads(_tensors((args, kwargs)), ("op", getattr(func, "__name__", str(func))))
        return out


def _tensors(obj):
    """Every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


# --- Deciding and folding -------------------------------------------------------------------

def _plan(model: nn.Module, bn_sources, uses) -> dict[str, str]:
    """Map each BatchNorm's name to the layer it folds into, or raise saying why it can't."""
    pairs = {}
    for name, bn in model.named_modules():
        if not isinstance(bn, BATCHNORMS):
            continue
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise _cannot_fold(name, "it keeps no running statistics (track_running_stats=False), "
                               "so even in eval mode it normalises with batch statistics")
        sources = set(bn_sources.get(name, []))
        if not sources:
            raise _cannot_fold(name, "it never runs in the model's forward")
        if len(sources) > 1:
            raise _cannot_fold(name, "it is applied to outputs of several places: "
                               + ", ".join(sorted(_describe(model, s) for s in sources)))
        (source,) = sources
        if source[0] != "module" or type(model.get_submodule(source[1])) not in FOLDABLE_LAYERS:
            raise _cannot_fold(name, f"its input comes from {_describe(model, source)}, "
                               "not straight from a Conv, ConvTranspose or Linear layer")
        layer_name = source[1]
        for readers in uses[layer_name]:
            others = [r for r in readers if r != ("module", name)]
            if others:
                raise _cannot_fold(name, f"the output of '{layer_name}' is also used by "
                                   + ", ".join(_describe(model, r) for r in others))
        layer = model.get_submodule(layer_name)
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if channels != bn.num_features:
            raise _cannot_fold(name, f"it has {bn.num_features} features but '{layer_name}' "
                               f"has {channels} output channels")
        pairs[name] = layer_name
    return pairs


def _cannot_fold(bn_name: str, why: str) -> ValueError:
    return ValueError(f"fold_batchnorm: cannot fold BatchNorm '{bn_name}': {why}. "
                      "This library needs BatchNorm-free networks.")


def _describe(model: nn.Module, label: Label) -> str:
    kind, what = label
    if kind == "module":
        return f"module '{what}' ({type(model.get_submodule(what)).__name__})"
    return f"operation '{what}'" if kind == "op" else what


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold `bn` (eval mode) into `layer`'s weight and bias, in float64 for precision."""
    as64 = dict(device="cpu", dtype=torch.float64)  # CPU: not every device has float64
    weight = layer.weight
    mean, var = bn.running_mean.to(**as64), bn.running_var.to(**as64)
    gamma = bn.weight.to(**as64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(**as64) if bn.bias is not None else torch.zeros_like(mean)
    bias = layer.bias.to(**as64) if layer.bias is not None else torch.zeros_like(mean)

    scale = gamma / torch.sqrt(var + bn.eps)
    new_weight = _scale_output_channels(layer, weight.to(**as64), scale)
    new_bias = (bias - mean) * scale + beta

    weight.copy_(new_weight.to(device=weight.device, dtype=weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(device=weight.device, dtype=weight.dtype),
                                  requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias.to(device=layer.bias.device, dtype=layer.bias.dtype))


def _scale_output_channels(layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor):
    """Multiply each output channel's weights by its scale.

    Conv and Linear weights are [out, ...], so the scale runs along axis 0. ConvTranspose
    weights are [in, out/groups, *k]: output channel g*(out/groups)+j lives in column j of
    the rows of input group g, so split the rows into groups and scale the columns per group.
    """
    if not isinstance(layer, TRANSPOSED):
        return weight * scale.view(-1, *[1] * (weight.dim() - 1))
    groups = layer.groups
    in_ch, out_per_group, *kernel = weight.shape
    grouped = weight.view(groups, in_ch // groups, out_per_group, *kernel)
    grouped = grouped * scale.view(groups, 1, out_per_group, *[1] * len(kernel))
    return grouped.view(weight.shape)


def _replace_with_identity(model: nn.Module, bn_ids: set) -> None:
    """Swap each folded BN for nn.Identity under every name it is registered at."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if id(m) in bn_ids]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
