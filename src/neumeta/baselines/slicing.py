"""One set of full-width weights run at any channel counts: what the slimmable baselines share.

A slimmable network keeps only the full model's tensors; a narrower network is the first ``k``
channels of every group. ``narrow_copy`` builds that network's skeleton once per width (so
torch-pruning decides every shape: residual streams, a linear layer after a flatten, the
BatchNorm vectors); the forward pass then runs the skeleton with ``torch.func.functional_call``
on tensors sliced out of the full ones, so gradients of any width land on the shared weights.

Which positions of which tensor axis a group owns is read from ``neumeta.graph`` (the same
reading ``WidthSpace`` uses): a flatten-Linear holds each channel at ``H*W`` positions and keeps
those whose channel is kept. ``ResampledNetwork`` (``inn``) replaces the slice by another
operator along the same axes; everything else here is shared.

Also here, because every method needs them: BatchNorm re-calibration of one width, and the
step loop over a loader.
"""
from __future__ import annotations

import copy
import itertools
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call

from ..graph import channel_graph
from ..train import endless_batches
from .narrow import first_channels, narrow_copy

__all__ = ["SlicedNetwork", "batchnorm_tensors", "first_batches", "has_batchnorm", "recalibrate_batchnorm", "reslice",
           "step_batches"]

Counts = Mapping[str, int]
Key = Tuple[Tuple[str, int], ...]
TensorAxis = Tuple[str, int]
Owner = Tuple[str, int, int]
"""(group, channel, slot): the group channel a tensor position holds; ``slot`` numbers the
positions of one channel (a flatten-Linear holds channel c at H*W slots)."""


class SlicedNetwork:
    """``model``'s tensors run at the first ``counts[group]`` channels of every group.

    ``counts`` names groups as ``WidthSpace`` does (``channel_graph`` names); groups left out
    keep every channel. Skeletons and index plans are cached per width (a handful of small
    modules even for US-Nets' random widths: a multiplier rounds to few distinct counts).
    """

    def __init__(self, model: nn.Module, example_inputs, fixed: Sequence[str] = ()):
        self.model = model
        self.example_inputs = example_inputs
        graph = channel_graph(model, example_inputs, fixed)
        self.sizes: Dict[str, int] = {g.name: g.size for g in graph.groups}
        self._problems: Dict[str, str] = {}
        shapes = {n: t.shape for n, t in _named_tensors(model).items()}
        # (tensor, axis) -> owner per position; (tensor, axis) -> {owner: position}
        self.owners: Dict[TensorAxis, List[Optional[Owner]]] = {}
        self.position_of: Dict[TensorAxis, Dict[Owner, int]] = {}
        inputs, outputs = set(), set()
        for group in graph.groups:
            for coupling in group.couplings:
                if coupling.problem:
                    self._problems.setdefault(group.name, coupling.problem)
                    continue
                slots: Dict[int, int] = {}
                owned = []
                for pos, ch in sorted(zip(coupling.positions, coupling.channels)):
                    owned.append((pos, (group.name, ch, slots.get(ch, 0))))
                    slots[ch] = slots.get(ch, 0) + 1
                for tensor_axis in coupling.tensors:
                    (inputs if coupling.side == "in" else outputs).add(tensor_axis)
                    name, axis = tensor_axis
                    row = self.owners.setdefault(tensor_axis, [None] * shapes[name][axis])
                    lookup = self.position_of.setdefault(tensor_axis, {})
                    for pos, owner in owned:
                        if row[pos] not in (None, owner):
                            raise ValueError(f"{name} axis {axis} position {pos} is claimed by "
                                             f"{row[pos][0]!r} and {owner[0]!r}")
                        row[pos], lookup[owner] = owner, pos
        # an input axis sums over channels; a depthwise conv's one axis is its input and output
        self.summed_axes = frozenset(inputs - outputs)
        self._skeletons: Dict[Key, nn.Module] = {}
        self._plans: Dict[Tuple[Key, str], Dict[str, list]] = {}

    # ------------------------------------------------------------------ widths
    @property
    def full(self) -> Dict[str, int]:
        return dict(self.sizes)

    def key(self, counts: Counts) -> Key:
        """The complete, checked channel counts of ``counts`` (every group), hashable."""
        full = self.full
        for name, count in counts.items():
            if name not in full:
                raise KeyError(f"unknown channel group {name!r}; groups are: {', '.join(full)}")
            if not 1 <= int(count) <= full[name]:
                raise ValueError(f"group {name!r} has {full[name]} channels; a slice of the full "
                                 f"weights cannot have {count}")
            if int(count) < full[name] and name in self._problems:
                raise ValueError(f"group {name!r} cannot be resized: {self._problems[name]}")
            full[name] = int(count)
        return tuple(sorted(full.items()))

    def skeleton(self, counts: Counts) -> nn.Module:
        """The narrow module at ``counts`` (its own tensors are never read: calls replace them)."""
        key = self.key(counts)
        if key not in self._skeletons:
            narrow = {g: c for g, c in key if c < self.sizes[g]}
            skeleton = narrow_copy(self.model, self.example_inputs, first_channels(narrow))
            for p in skeleton.parameters():
                p.requires_grad_(False)
            self._check_shapes(key, skeleton)
            self._skeletons[key] = skeleton
        return self._skeletons[key]

    def _check_shapes(self, key: Key, skeleton: nn.Module) -> None:
        """The plan and torch-pruning must agree on every shape, or the slices are wrong."""
        mine = self.shapes(dict(key))
        for name, tensor in _named_tensors(skeleton).items():
            if mine.get(name, tensor.shape) != tensor.shape:
                raise ValueError(f"{name}: sliced to {tuple(mine[name])} but torch-pruning made "
                                 f"{tuple(tensor.shape)}; the channel graph and the pruner disagree")

    def shapes(self, counts: Counts) -> Dict[str, torch.Size]:
        """Every tensor's shape at ``counts``."""
        shapes = {n: list(t.shape) for n, t in _named_tensors(self.model).items()}
        for (name, axis), kept in self.kept_positions(counts).items():
            shapes[name][axis] = len(kept)
        return {n: torch.Size(s) for n, s in shapes.items()}

    def kept_positions(self, counts: Counts) -> Dict[TensorAxis, List[int]]:
        """(tensor, axis) -> the positions kept at ``counts``, for every axis that narrows."""
        key = dict(self.key(counts))
        kept = {}
        for tensor_axis, row in self.owners.items():
            positions = [p for p, o in enumerate(row) if o is None or o[1] < key[o[0]]]
            if len(positions) < len(row):
                kept[tensor_axis] = positions
        return kept

    # ------------------------------------------------------------------ tensors
    def plan(self, counts: Counts, device) -> Dict[str, list]:
        """tensor name -> [(axis, operator)] taking the full tensor to ``counts`` (cached)."""
        cache = (self.key(counts), str(device))
        if cache not in self._plans:
            plan: Dict[str, list] = {}
            for (name, axis), kept in self.kept_positions(counts).items():
                plan.setdefault(name, []).append((axis, self._axis_operator((name, axis), kept, counts, device)))
            self._plans[cache] = plan
        return self._plans[cache]

    def _axis_operator(self, tensor_axis: TensorAxis, kept: List[int], counts: Counts, device):
        """What ``_apply`` does along one axis: here, the kept positions."""
        return torch.tensor(kept, dtype=torch.long, device=device)

    @staticmethod
    def _apply(tensor: torch.Tensor, axis: int, operator) -> torch.Tensor:
        return tensor.index_select(axis, operator)

    def map_tensors(self, counts: Counts, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Full-width ``tensors`` (any of the model's, by name) at ``counts``, differentiably;
        a tensor no narrowed group touches is passed through as is (the same object)."""
        if not tensors:
            return {}
        device = next(iter(tensors.values())).device
        plan = self.plan(counts, device)
        out = {}
        for name, tensor in tensors.items():
            for axis, operator in plan.get(name, ()):
                tensor = self._apply(tensor, axis, operator)
            out[name] = tensor
        return out

    def full_tensors(self, exclude: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
        """The model's parameters and buffers by name (the live objects), minus ``exclude``."""
        skip = set(exclude)
        return {n: t for n, t in _named_tensors(self.model).items() if n not in skip}

    def __call__(self, counts: Counts, *inputs, narrow: Optional[Mapping[str, torch.Tensor]] = None,
                 exclude: Iterable[str] = (), training: Optional[bool] = None):
        """The network at ``counts`` on ``inputs``: the model's tensors (minus ``exclude``) sliced,
        plus ``narrow`` tensors already at ``counts`` (e.g. one width's private BatchNorm).

        In train mode a BatchNorm updates the running statistics it was given, in place: the
        model's own where nothing narrowed them, ``narrow``'s where given, else a discarded slice.
        """
        skeleton = self.skeleton(counts)
        skeleton.train(self.model.training if training is None else training)
        tensors = self.map_tensors(counts, self.full_tensors(exclude))
        tensors.update(narrow or {})
        return functional_call(skeleton, tensors, inputs, strict=True)

    def network(self, counts: Counts, narrow: Optional[Mapping[str, torch.Tensor]] = None,
                exclude: Iterable[str] = ()) -> nn.Module:
        """A standalone plain module at ``counts`` holding detached copies of the sliced tensors
        (``narrow`` as in ``__call__``), in eval mode, on the model's device."""
        module = copy.deepcopy(self.skeleton(counts))
        with torch.no_grad():
            tensors = self.map_tensors(counts, self.full_tensors(exclude))
            tensors.update(narrow or {})
            own = _named_tensors(module)
            missing = set(own) - set(tensors)
            if missing:
                raise KeyError(f"no tensors given for {', '.join(sorted(missing))}")
            device = next(iter(tensors.values())).device
            module.to(device)
            own = _named_tensors(module)
            for name, value in tensors.items():
                own[name].copy_(value)
        for p in module.parameters():
            p.requires_grad_(True)
        return module.eval()


def reslice(slicer: SlicedNetwork, tensors: Mapping[str, torch.Tensor], source: Counts,
            target: Counts) -> Dict[str, torch.Tensor]:
    """``tensors`` held at ``source`` counts cut to the channels kept at ``target``; every target
    channel must be kept at ``source`` too (a narrower width's tensors cannot be widened)."""
    src, dst = slicer.kept_positions(source), slicer.kept_positions(target)
    out = {}
    for name, tensor in tensors.items():
        for axis in range(tensor.dim()):
            full = len(slicer.owners.get((name, axis), ())) or tensor.shape[axis]
            have = src.get((name, axis), range(full))
            want = dst.get((name, axis), range(full))
            if len(have) == len(want):
                continue
            where = {p: i for i, p in enumerate(have)}
            if any(p not in where for p in want):
                raise ValueError(f"{name}: the target width keeps channels the source width lacks")
            index = torch.tensor([where[p] for p in want], dtype=torch.long, device=tensor.device)
            tensor = tensor.index_select(axis, index)
        out[name] = tensor
    return out


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------

def _batchnorms(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(module: nn.Module) -> bool:
    return any(m.track_running_stats for _, m in _batchnorms(module))


def batchnorm_tensors(module: nn.Module) -> List[str]:
    """Qualified names of every BatchNorm parameter and buffer (affine, running statistics,
    batch counter): what a switchable BatchNorm keeps per width."""
    names = []
    for mname, m in _batchnorms(module):
        prefix = f"{mname}." if mname else ""
        names += [prefix + n for n, t in m.named_parameters(recurse=False)]
        names += [prefix + n for n, t in m.named_buffers(recurse=False) if t is not None]
    return names


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, batches: Iterable, device="cpu") -> nn.Module:
    """Recompute every BatchNorm's running statistics of ``module`` from ``batches``, in place.

    The statistics are measured the way training normalises, in train mode (batch statistics),
    and accumulated as an exact average over the batches (``momentum=None``); every other
    module stays in eval mode and no weight changes. Returns the module in eval mode.
    """
    norms = [m for _, m in _batchnorms(module) if m.track_running_stats]
    module.eval()
    if not norms:
        return module
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            module(x.to(device))
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.eval()
    if seen == 0:
        raise ValueError("BatchNorm re-calibration needs at least one batch; got none")
    return module


# ----------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------

def step_batches(loader, steps: int) -> Iterator:
    """``steps`` batches of ``loader``, epoch after epoch (reshuffled through ``set_epoch``), as
    ``fit`` draws them (``train.endless_batches``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if len(loader) == 0:
        raise ValueError("the training loader gives no batches")
    yield from itertools.islice(endless_batches(loader), steps)


def first_batches(loader, count: int) -> List:
    """The first ``count`` batches of ``loader`` (calibration data)."""
    return list(itertools.islice(iter(loader), count))


def _named_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters())
    tensors.update((n, b) for n, b in module.named_buffers() if b is not None)
    return tensors
