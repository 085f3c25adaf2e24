"""A network with only some channels of each group: what every slicing baseline builds on.

torch-pruning removes the channels, so everything coupled to a group follows (BatchNorm
statistics, the consumers' input columns, a linear layer after a flatten, residual streams).
Groups are named as ``WidthSpace`` and ``smooth`` name them (``neumeta.graph``): the same
groups, at the same channel counts, as the manifold they are compared with.
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Sequence

import torch.nn as nn

from ..graph import _group_name, dependency_groups


def pruning_groups(model: nn.Module, example_inputs, fixed: Sequence[str] = ()):
    """(torch-pruning's dependency graph of ``model``, {group name: its torch-pruning group});
    the output layers' channels (found as ``WidthSpace`` finds them) are in no group."""
    _, graph, groups = dependency_groups(model, example_inputs, fixed)
    names = {m: n for n, m in model.named_modules()}
    return graph, {_group_name(g, names): g for g in groups}


def narrow_copy(model: nn.Module, example_inputs, keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` keeping, in each group named in ``keep``, only the listed channels (in
    their original order); groups not named keep every channel."""
    model = copy.deepcopy(model)
    _, groups = pruning_groups(model, example_inputs)
    for name, channels in keep.items():
        if name not in groups:
            raise KeyError(f"unknown channel group {name!r}; groups are: {', '.join(groups)}")
        size = len(groups[name].items[0].idxs)
        kept = sorted(set(int(c) for c in channels))
        if not kept or kept[0] < 0 or kept[-1] >= size:
            raise ValueError(f"group {name!r} has channels 0..{size - 1}; cannot keep {list(channels)[:8]}")
        removed = [c for c in range(size) if c not in set(kept)]
        if removed:
            groups[name].prune(idxs=removed)
    return model


def first_channels(counts: Mapping[str, int]) -> Dict[str, range]:
    """``keep`` for slimmable networks: the first ``count`` channels of every group."""
    return {name: range(count) for name, count in counts.items()}
