"""Structured pruning at exact channel counts: the pruning baselines NeuMeta is compared with.

torch-pruning scores every channel of a group (its importance criteria), and the lowest-scoring
channels are removed until the group has exactly the count the manifold is sampled at; the
high-level pruners' ratio rounding (``int(C * (1 - r))``) would give other counts. Every group is
scored on the unpruned network, so the order the groups are pruned in changes nothing.
"""
from __future__ import annotations

import copy
import numbers
import zlib
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from ..progress import progress_bar
from .narrow import narrow_copy, pruning_groups
from .slicing import step_batches

# normalizer=None: a group's scores are only ranked against each other, and the default mean
# normalizer turns a group of all-zero scores (dead channels, zero gradients) into NaN
IMPORTANCES: Dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1, normalizer=None),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2, normalizer=None),
    "taylor": lambda: tp.importance.TaylorImportance(normalizer=None),
    "hessian": lambda: tp.importance.HessianImportance(normalizer=None),
    "random": lambda: tp.importance.RandomImportance(),
}
NEEDS_GRADIENTS = ("taylor", "hessian")


def channel_scores(model: nn.Module, example_inputs, importance: str = "l1", batches: Optional[Iterable] = None,
                   task=None, seed: int = 0, groups: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """{group: one ``importance`` score per channel} for ``groups`` (default: every group; a
    ``{group: count}`` mapping has its counts checked before any scoring), all on the unpruned
    ``model``: computed once, they rank the channels for any width. ``taylor`` and
    ``hessian`` need ``batches`` (a few training batches) and the ``task`` whose loss they
    differentiate. ``model`` is left as it was (gradients are taken on a copy)."""
    if importance not in IMPORTANCES:
        raise KeyError(f"unknown pruning importance {importance!r}; available: {', '.join(IMPORTANCES)}")
    if importance in NEEDS_GRADIENTS and (batches is None or task is None):
        raise ValueError(f"pruning importance {importance!r} needs training batches and a task (its loss "
                         f"is differentiated), got batches={batches!r}, task={task!r}")
    scored = copy.deepcopy(model)
    _, tp_groups = pruning_groups(scored, example_inputs)
    names = list(tp_groups) if groups is None else list(groups)
    _check_counts(groups if isinstance(groups, Mapping) else {name: 1 for name in names}, tp_groups)
    scorer = IMPORTANCES[importance]()
    if importance == "taylor":
        _loss_gradients(scored, batches, task)
    elif importance == "hessian":
        _squared_sample_gradients(scored, batches, task)
    scores = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for name in names:
            torch.manual_seed(seed + zlib.crc32(name.encode()))  # random scores: per group, in any order
            score = scorer(tp_groups[name])
            if score is None:
                raise ValueError(f"pruning importance {importance!r} gives no score for group {name!r} "
                                 "(it holds no layer the importance reads)")
            scores[name] = torch.nan_to_num(score.detach().float().cpu(), nan=-float("inf"))
    return scores


def highest(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> Dict[str, List[int]]:
    """{group: the ``counts[group]`` channels of highest score, ascending}; of equal scores the
    lower channel index is kept (a stable sort)."""
    kept = {}
    for name, count in counts.items():
        _check_count(name, count, len(scores[name]))
        order = torch.sort(scores[name], descending=True, stable=True).indices
        kept[name] = sorted(order[:count].tolist())
    return kept


def kept_channels(model: nn.Module, example_inputs, counts: Mapping[str, int], importance: str = "l1",
                  batches: Optional[Iterable] = None, task=None, seed: int = 0) -> Dict[str, List[int]]:
    """{group: the ``counts[group]`` channels of highest ``importance``, ascending}; what ``prune``
    keeps (``channel_scores`` of the groups in ``counts``, then ``highest``)."""
    return highest(channel_scores(model, example_inputs, importance, batches, task, seed, counts), counts)


def prune(model: nn.Module, example_inputs, counts: Mapping[str, int], importance: str = "l1",
          batches: Optional[Iterable] = None, task=None, seed: int = 0) -> nn.Module:
    """A copy of ``model`` where every group in ``counts`` keeps exactly ``counts[group]`` channels,
    those of highest ``importance`` (see ``IMPORTANCES``, ``kept_channels``); other groups keep all."""
    keep = kept_channels(model, example_inputs, counts, importance, batches, task, seed)
    return narrow_copy(model, example_inputs, keep)


def finetune(model: nn.Module, data, steps: int, lr: float = 1e-3, device="cpu", progress: bool = True,
             desc: str = "finetune") -> nn.Module:
    """``steps`` Adam steps on ``data.task``'s loss over ``data.train`` (epochs repeat as needed), in
    place: pruning's usual recovery, short so it stays a baseline and not a retraining. Returns
    ``model``, in eval mode."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"finetune steps must be a whole number >= 0, not {steps!r}")
    model.to(device)
    if steps == 0:
        return model.eval()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    bar = progress_bar(total=steps, desc=desc, disable=not progress, leave=False)
    for batch in step_batches(data.train, steps):
        batch = [t.to(device) for t in batch]
        loss = data.task.loss(model(batch[0]), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def _check_counts(counts: Mapping[str, int], groups: Mapping[str, tp.Group]) -> None:
    for name, count in counts.items():
        if name not in groups:
            raise KeyError(f"unknown channel group {name!r}; groups are: {', '.join(groups)}")
        _check_count(name, count, len(groups[name].items[0].idxs))


def _check_count(name: str, count, size: int) -> None:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 1 <= count <= size:
        raise ValueError(f"group {name!r} has {size} channels; cannot keep {count!r} (need 1..{size})")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loss_gradients(model: nn.Module, batches: Iterable, task) -> None:
    """Leave in every ``.grad`` the gradient of the task loss summed over ``batches`` (Taylor's
    first order term). Eval mode: BatchNorm statistics are read, not updated."""
    device, seen = _device(model), 0
    model.eval()
    model.zero_grad(set_to_none=False)
    with torch.enable_grad():
        for batch in batches:
            batch = [t.to(device) for t in batch]
            task.loss(model(batch[0]), batch).backward()
            seen += 1
    if not seen:
        raise ValueError("pruning importance 'taylor': no batches to take the loss gradient on")


def _squared_sample_gradients(model: nn.Module, batches: Iterable, task) -> None:
    """Leave in every ``.grad`` the mean over samples of the squared per-sample loss gradient: the
    diagonal (empirical Fisher) Hessian that ``HessianImportance`` reads from ``.grad``.

    Accumulated here rather than with ``HessianImportance.accumulate_grad``: in torch-pruning 1.6
    that looks parameters up by name in a dict keyed by tensor, so it keeps only the last sample.
    """
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    samples = 0
    model.eval()
    with torch.enable_grad():
        for batch in batches:
            batch = [t.to(device) for t in batch]
            outputs = model(batch[0])
            for i in range(len(batch[0])):
                one = [t[i:i + 1] for t in batch]
                grads = torch.autograd.grad(task.loss(outputs[i:i + 1], one), params, retain_graph=True,
                                            allow_unused=True)
                for acc, g in zip(total, grads):
                    if g is not None:
                        acc += g.pow(2)
                samples += 1
    if not samples:
        raise ValueError("pruning importance 'hessian': no samples to take per-sample gradients on")
    for p, acc in zip(params, total):
        p.grad = acc / samples
