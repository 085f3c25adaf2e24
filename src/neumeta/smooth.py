"""Smoothing permutation: reorder the channels of every channel group so that neighbours are alike.

An INR learns a network's weights as a function of the channel coordinate. Channel order is
arbitrary after training, so that function is noise unless the channels are reordered first.
For each coupled channel group (paper, section 3.3) we stack, for every channel, the slices
that all of the group's tensors hold on that channel (a conv's weight rows and bias, the
BatchNorm statistics after it, the next layers' weight columns, ...). The *total variation*
(TV) of the group is the summed L1 distance between neighbouring channels. Finding the order
with the smallest TV is a shortest open Hamiltonian path (``neumeta.tsp``). Every coupled tensor
is permuted by the same order, so the network computes exactly the same function.

Proposition 1 of the paper ("axis alignment"): permuting one axis of a tensor does not change
the distances between its slices along another axis. So every group is solved on its own, in
any order, and the TV of the whole network is the sum of the groups' TVs. A path has two
directions of equal TV; we align it so that the channel with the smaller feature norm comes
first, which makes the result a function of the weights alone.

``neumeta.graph`` says which tensors are coupled, read from torch-pruning's ``DependencyGraph``
exactly as ``WidthSpace`` reads it. Each coupling lists positions along one tensor axis and the
group channel ("root") each position belongs to; a layer after a flatten has several positions
per channel, and a concatenation maps each part of a consumer's input to the channels of its
own producer.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .graph import ChannelGroup, _as_tuple, _tensors as _flatten, channel_graph, group_named
from .tsp import path_length, solve_open_path

__all__ = ["GroupTV", "SmoothReport", "TotalVariation", "smooth", "total_variation"]


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TotalVariation:
    """TV of a network: per channel group, and their sum."""
    total: float
    groups: Dict[str, float]


@dataclass(frozen=True)
class GroupTV:
    """One group's smoothing. ``order[i]`` is the old index of the channel now at position i."""
    channels: int
    tv_before: float
    tv_after: float
    order: Tuple[int, ...]


@dataclass
class SmoothReport:
    tv_before: float
    tv_after: float
    groups: Dict[str, GroupTV] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        """A markdown table: one row per group, then the totals."""
        def change(before, after):
            return f"{100 * (after - before) / before:+.1f} %" if before else "0.0 %"

        lines = ["| group | channels | TV before | TV after | change |",
                 "|---|---:|---:|---:|---:|"]
        for name, g in self.groups.items():
            lines.append(f"| {name} | {g.channels} | {g.tv_before:.6g} | {g.tv_after:.6g} | "
                         f"{change(g.tv_before, g.tv_after)} |")
        channels = sum(g.channels for g in self.groups.values())
        lines.append(f"| **total** | {channels} | {self.tv_before:.6g} | {self.tv_after:.6g} | "
                     f"{change(self.tv_before, self.tv_after)} |")
        lines.append(f"\n{len(self.groups)} groups smoothed in {self.seconds:.3f} s")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def total_variation(model: nn.Module, example_inputs, groups: Optional[Sequence[str]] = None,
                    fixed: Sequence[str] = ()) -> TotalVariation:
    """TV of ``model`` along each channel group (all of them, or the ``groups`` named).

    For a group of C channels, TV is the sum over every tensor slice of the group of the L1
    distance between the slices of neighbouring channels: a conv's output rows, its bias, the
    BatchNorm parameters and running statistics after it, the consumers' input columns (every
    column a channel owns after a flatten). The model is not modified. ``fixed`` as in ``smooth``.
    """
    plan = _trace(copy.deepcopy(model), example_inputs, groups, fixed)
    per_group = {g.name: _group_tv(g, np.arange(g.size)) for g in plan}
    return TotalVariation(sum(per_group.values()), per_group)


def smooth(model: nn.Module, example_inputs, seed: int = 0,
           groups: Optional[Sequence[str]] = None, time_limit: Optional[float] = None,
           check: bool = True, fixed: Sequence[str] = ()) -> Tuple[nn.Module, SmoothReport]:
    """A copy of ``model`` with the channels of every group reordered to lower TV; same function.

    For each group: the feature vector of a channel is every coupled tensor's slice on that
    channel, concatenated; the order is a short open path through the L1 distances between them
    (``solve_open_path``). A path can be walked either way at the same TV, so the direction is
    chosen by *axis alignment*: the channel with the smaller feature L2 norm comes first (first
    norm <= last norm). Every deployment of the same weights thus gets the same orientation, and
    the INR sees channels roughly ordered from small to large weights. If the path is not
    shorter than the current order the current order is kept (still aligned), so TV never rises.

    Where a group spans a concatenation (e.g. a depthwise conv fed by ``cat([a, b])``) channels
    cannot move between a's and b's part; each part is then ordered (and aligned) on its own.
    GroupNorm groups are kept together the same way.

    Args:
        model: any traceable ``nn.Module``; BatchNorm need not be folded. Not modified.
        example_inputs: a tensor, or tuple of tensors, for tracing.
        seed: seed of the path search; the result is deterministic for a seed (without
            ``time_limit``).
        groups: names of the groups to smooth (a group is named after the module whose output
            channels are its root, e.g. ``"conv1"``; a member module's name works too).
            ``None`` smooths every group except the output layers' (class logits, images).
        time_limit: seconds for all path searches together, shared in proportion to group
            size; the result then depends on the machine's speed.
        check: run ``example_inputs`` through both networks (eval mode) and raise ValueError,
            naming the group, if an output changed: a safety net for models whose coupling
            torch-pruning does not trace correctly (e.g. a residual add of the raw input).
        fixed: names of layers whose output channels are never permuted, on top of the output
            layers found automatically; needed where the output is computed in a way the
            reader cannot follow (it says so), as for ``WidthSpace(fixed=...)``.

    Returns:
        The permuted copy (same training mode as ``model``) and a ``SmoothReport``.
    """
    start = time.perf_counter()
    smoothed = copy.deepcopy(model)
    plan = _trace(smoothed, example_inputs, groups, fixed)
    reference = _outputs(smoothed, example_inputs) if check else None

    deadline = None if time_limit is None else start + time_limit
    channels_left = sum(g.size for g in plan)
    results: Dict[str, GroupTV] = {}
    for group in plan:
        budget = None
        if deadline is not None:
            budget = max(0.0, deadline - time.perf_counter()) * group.size / channels_left
        channels_left -= group.size
        order, tv_before, tv_after = _best_order(group, seed, budget)
        _apply(smoothed, group, order)
        results[group.name] = GroupTV(group.size, tv_before, tv_after, tuple(order.tolist()))

    if check:
        _check(model, smoothed, plan, results, reference, example_inputs)
    report = SmoothReport(tv_before=sum(r.tv_before for r in results.values()),
                          tv_after=sum(r.tv_after for r in results.values()),
                          groups=results, seconds=time.perf_counter() - start)
    return smoothed, report


# ----------------------------------------------------------------------------------------------
# The plan: which slices of which tensors belong to which channel
# ----------------------------------------------------------------------------------------------

@dataclass
class _Slice:
    """One tensor axis's share of a channel group.

    ``positions[k]`` are the positions along ``axis`` owned by the k-th channel in the order it
    appears along the axis (several after a flatten); ``roots[k]`` is that channel's index in the
    group; ``row_of[root]`` is the inverse (-1 where this tensor does not hold the channel).
    ``matrix[k]`` is the channel's slice, flattened, in float64.
    """
    name: str
    axis: int
    positions: np.ndarray
    roots: np.ndarray
    row_of: np.ndarray
    matrix: torch.Tensor


@dataclass
class _Group:
    name: str
    size: int
    slices: List[_Slice]
    blocks: List[np.ndarray]  # channels that may only move among themselves
    members: List[str]        # modules whose output channels are in the group


def _trace(model: nn.Module, example_inputs, wanted: Optional[Sequence[str]],
           fixed: Sequence[str] = ()) -> List[_Group]:
    """The channel groups of ``model`` (``neumeta.graph``, as WidthSpace reads them) chosen by
    ``wanted``, with every coupled tensor's slices.

    Everything the reader couples to a group is permuted with it: layer weights and biases,
    norm statistics and affine vectors, PReLU slopes, loose parameters. A coupling that cannot
    be permuted is an error only in a group that is smoothed.
    """
    graph = channel_graph(model, example_inputs, fixed)
    modules = dict(model.named_modules())
    claimed: Dict[Tuple[int, int], Dict[int, str]] = {}  # (tensor id, axis) -> position -> group
    plan = []
    for group in _select(list(graph.groups), wanted):
        slices, sets, seen = [], [], {}
        for coupling in group.couplings:
            if coupling.problem:
                raise ValueError(f"{coupling.problem}; cannot smooth group {group.name!r} "
                                 "(leave it out with groups=[...])")
            pairs = list(zip(coupling.positions, coupling.channels))
            if not pairs:
                continue
            if isinstance(modules.get(coupling.module), nn.GroupNorm):
                sets += _norm_blocks(modules[coupling.module], pairs)
            for tname, axis in coupling.tensors:
                tensor = _tensor(model, tname)
                key = (id(tensor), axis)
                if key in seen:  # the same tensor reached twice (depthwise conv, tied weights)
                    if seen[key] != sorted(pairs):
                        raise ValueError(f"group {group.name!r}: {tname!r} axis {axis} is reached with "
                                         "two different channel maps; cannot smooth it")
                    continue
                owners = claimed.setdefault(key, {})
                for pos, _ in pairs:
                    if owners.setdefault(pos, group.name) != group.name:
                        raise ValueError(f"{tname!r} axis {axis} position {pos} belongs to groups "
                                         f"{owners[pos]!r} and {group.name!r}; cannot smooth them")
                seen[key] = sorted(pairs)
                slices.append(_make_slice(tname, tensor, axis, pairs, group.size, group.name))
        sets += [s.roots for s in slices]
        plan.append(_Group(group.name, group.size, slices, _blocks(group.size, sets), list(group.producers)))
    return plan


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _norm_blocks(module: nn.Module, pairs) -> List[np.ndarray]:
    """GroupNorm normalises blocks of channels together: a channel may not leave its block."""
    if not isinstance(module, nn.GroupNorm) or module.num_groups in (1, module.num_channels):
        return []
    per_block = module.num_channels // module.num_groups
    roots = {}
    for pos, root in pairs:
        roots.setdefault(pos // per_block, []).append(root)
    return [np.array(r) for r in roots.values()]


def _make_slice(name, tensor, axis, pairs, size, gname) -> _Slice:
    """Group the positions of one tensor axis by channel and copy out each channel's slice."""
    positions = np.array([p for p, _ in pairs], dtype=np.intp)
    roots = np.array([r for _, r in pairs], dtype=np.intp)
    length = tensor.shape[axis]
    if positions.min() < 0 or positions.max() >= length or len(set(positions.tolist())) != len(positions):
        raise ValueError(f"group {gname!r}: torch-pruning maps its channels to positions outside "
                         f"axis {axis} of {name!r} (length {length}); the dependency graph does "
                         "not describe this model correctly")
    channels, counts = np.unique(roots, return_counts=True)
    if counts.min() != counts.max() or channels.max() >= size:
        raise ValueError(f"group {gname!r}: the channels own unequal numbers of positions along "
                         f"axis {axis} of {name!r}; cannot smooth it")
    by_channel = positions[np.lexsort((positions, roots))].reshape(len(channels), -1)
    along = np.argsort(by_channel[:, 0], kind="stable")  # channels in the order of the axis
    positions, roots = by_channel[along], channels[along]
    row_of = np.full(size, -1, dtype=np.intp)
    row_of[roots] = np.arange(len(roots))
    index = torch.as_tensor(positions.ravel(), device=tensor.device)
    matrix = tensor.detach().movedim(axis, 0)[index].reshape(len(roots), -1)
    return _Slice(name, axis, positions, roots, row_of, matrix.to("cpu", torch.float64))


def _blocks(size: int, sets: List[np.ndarray]) -> List[np.ndarray]:
    """Split the channels into blocks that every tensor (and GroupNorm) holds all or none of.

    A channel can only take another's place if exactly the same tensors hold both; usually
    that is all channels of the group, one block.
    """
    member = np.zeros((size, len(sets)), dtype=bool)
    for column, roots in enumerate(sets):
        member[roots, column] = True
    _, block_of = np.unique(member, axis=0, return_inverse=True)
    blocks = [np.flatnonzero(block_of.ravel() == b) for b in np.unique(block_of)]
    return sorted(blocks, key=lambda block: block[0])


def _select(groups: List[ChannelGroup], wanted: Optional[Sequence[str]]) -> List[ChannelGroup]:
    """The groups named in ``wanted`` (a group's name, or the name of a layer producing it)."""
    if wanted is None:
        return groups
    chosen = {group_named(name, groups) for name in wanted}
    return [g for g in groups if g.name in chosen]


# ----------------------------------------------------------------------------------------------
# Total variation, ordering, permuting
# ----------------------------------------------------------------------------------------------

def _group_tv(group: _Group, order: np.ndarray) -> float:
    """TV of the group if channel ``order[i]`` is moved to position i."""
    total = 0.0
    for s in group.slices:
        rows = torch.as_tensor(s.row_of[order[s.roots]])
        m = s.matrix[rows]
        total += float((m[1:] - m[:-1]).abs().sum())
    return total


def _features(group: _Group, block: np.ndarray) -> torch.Tensor:
    """Each channel of ``block``: all its slices, concatenated (the TSP's cities)."""
    held = [s for s in group.slices if s.row_of[block[0]] >= 0]
    return torch.cat([s.matrix[torch.as_tensor(s.row_of[block])] for s in held], dim=1)


def _aligned(path: np.ndarray, norms: torch.Tensor) -> np.ndarray:
    """Walk the path from its end with the smaller feature norm (axis alignment)."""
    return path[::-1].copy() if norms[path[0]] > norms[path[-1]] else path


def _best_order(group: _Group, seed: int, budget: Optional[float]):
    """(order, TV before, TV after): the solver's order, aligned; else the current order,
    aligned if that costs no TV; else the current order."""
    solved, current = np.arange(group.size), np.arange(group.size)
    dist = None
    for block in group.blocks:
        if len(block) < 2:
            continue
        feats = _features(group, block)
        norms = feats.norm(dim=1)
        dist = torch.cdist(feats, feats, p=1).numpy()
        limit = None if budget is None else budget * len(block) / group.size
        path = solve_open_path(dist, seed=seed, time_limit=limit)
        solved[block] = block[_aligned(path, norms)]
        current[block] = block[_aligned(np.arange(len(block)), norms)]

    # With one block, laid out in channel order along every axis, the group's TV is the path's
    # length in the distance matrix; otherwise it is summed tensor by tensor.
    identity = np.arange(group.size)
    one_path = dist is not None and len(group.blocks) == 1 and all(
        np.array_equal(s.roots, identity) for s in group.slices)

    def tv(order):
        return path_length(dist, order) if one_path else _group_tv(group, order)

    tv_before = tv(identity)
    for order in (solved, current):
        tv_after = tv(order)
        if tv_after <= tv_before * (1 + 1e-12):  # reversing a path only reorders the same sums
            return order, tv_before, tv_after
    return identity, tv_before, tv_before


@torch.no_grad()
def _apply(model: nn.Module, group: _Group, order: np.ndarray) -> None:
    """Move channel ``order[i]`` to position i in every tensor of the group, in place."""
    for s in group.slices:
        owner, _, attr = s.name.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attr)
        source = np.arange(tensor.shape[s.axis])
        source[s.positions.ravel()] = s.positions[s.row_of[order[s.roots]]].ravel()
        index = torch.as_tensor(source, device=tensor.device)
        tensor.copy_(tensor.index_select(s.axis, index))


# ----------------------------------------------------------------------------------------------
# The safety net
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def _outputs(model: nn.Module, example_inputs) -> List[torch.Tensor]:
    """The model's outputs in eval mode, with the random generators seeded (for sampling models)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return [t.detach().clone() for t in _flatten(model(*_as_tuple(example_inputs)))]
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _same(outputs: List[torch.Tensor], reference: List[torch.Tensor]) -> bool:
    """Equal up to float round-off (relative to each output's largest value)."""
    for new, ref in zip(outputs, reference):
        if not ref.is_floating_point():
            if not torch.equal(new, ref):
                return False
            continue
        finite = ref[torch.isfinite(ref)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        tol = max(1e-4, 64 * torch.finfo(ref.dtype).eps) * scale + torch.finfo(ref.dtype).tiny
        if not torch.allclose(new, ref, rtol=0.0, atol=tol, equal_nan=True):
            return False
    return True


def _check(model, smoothed, plan, results, reference, example_inputs) -> None:
    """Raise, naming the culprit groups, if the permuted model computes something else."""
    if _same(_outputs(smoothed, example_inputs), reference):
        return
    culprits = []
    for group in plan:  # each group's permutation alone, on a fresh copy
        single = copy.deepcopy(model)
        _apply(single, group, np.array(results[group.name].order))
        if not _same(_outputs(single, example_inputs), reference):
            culprits.append(group.name)
    raise ValueError(
        f"smooth: permuting channel group(s) {', '.join(map(repr, culprits)) or '(several together)'} "
        "changes the network's output: torch-pruning's dependency graph does not capture all of "
        "their coupling (e.g. a residual add of the raw input, a channel shuffle). Leave them "
        "out with groups=[...], or pass check=False to skip this test.")
