"""Universally slimmable networks (Yu & Huang 2019): every width in [min_width, 1] at once.

One set of weights; a width is the first channels of every group at one multiplier. Each step
follows the sandwich rule: the largest and the smallest width bound the performance of all the
others, so both are trained every step, with ``n_random`` widths drawn between them. In-place
distillation: the largest width learns from the labels, the others from its (detached)
predictions, which are free and softer targets.

BatchNorm affine parameters are shared (sliced like the weights); running statistics are not:
no single set serves every width, so training normalises with batch statistics only and a
width's statistics are measured after training (``calibrate``), in train mode over a few
batches (an eval-mode pass reads the running statistics and never updates them, so "calibrating"
in eval mode would leave the stale ones in place).
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..groups import WidthSpace
from ..progress import progress_bar
from .slicing import SlicedNetwork, first_batches, has_batchnorm, recalibrate_batchnorm, step_batches

__all__ = ["USNet"]


class USNet:
    """A universally slimmable network over group-uniform multipliers in [``min_width``, 1].

    ``model`` is copied; ``groups``/``fixed`` as in ``WidthSpace``. ``n_random``: widths drawn
    uniformly per step besides the largest and the smallest (the paper: 2). ``distill``: in-place
    distillation through ``task.distill`` (off: every width learns from the labels).
    ``calibration_batches``: how many training batches ``network`` calibrates on by default.
    """

    _resampler = SlicedNetwork  # how a width is read off the full weights
    _desc = "us-net"

    def __init__(self, model: nn.Module, example_inputs, groups=None, min_width: float = 0.25,
                 n_random: int = 2, distill: bool = True, fixed: Sequence[str] = (),
                 calibration_batches: int = 16):
        if not 0 < min_width <= 1:
            raise ValueError(f"min_width must be in (0, 1], not {min_width}")
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.space = WidthSpace(self.model, example_inputs, groups=groups, fixed=fixed)
        self.slicer = self._resampler(self.model, example_inputs, fixed=fixed)
        self.space.resolve(min_width)  # refuses a width that leaves a group empty
        self.min_width, self.n_random, self.distill = float(min_width), int(n_random), distill
        self.calibration_batches = calibration_batches
        self._calibration_source = None

    def forward(self, counts, x: torch.Tensor) -> torch.Tensor:
        """The network at ``counts`` on ``x``, differentiable in the shared weights."""
        return self.slicer(self.space.resolve(counts), x)

    def sample_widths(self, generator: torch.Generator) -> List[float]:
        """One step's widths, largest first: 1, ``min_width`` and ``n_random`` drawn between."""
        drawn = torch.rand(self.n_random, generator=generator) * (1.0 - self.min_width) + self.min_width
        return [1.0, self.min_width] + [float(w) for w in drawn]

    def train(self, data, steps: int, lr: float = 1e-3, device="cpu", progress: bool = True,
              seed: int = 0) -> List[Dict]:
        """Adam for ``steps`` sandwich steps. Returns one record per step: its widths, largest
        first, and their losses (the largest's task loss, then the distillation losses)."""
        if self.distill and not hasattr(data.task, "distill"):
            raise ValueError(f"task {type(data.task).__name__} has no distill(); pass distill=False")
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.model.to(device).train()
        optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self._calibration_source = data.train
        history = []
        bar = progress_bar(total=steps, desc=self._desc, disable=not progress, leave=False)
        for step, batch in enumerate(step_batches(data.train, steps)):
            batch = [t.to(device) for t in batch]
            widths = self.sample_widths(generator)
            optimizer.zero_grad(set_to_none=True)
            losses, teacher = [], None
            for width in widths:
                out = self.forward(width, batch[0])
                if teacher is None or not self.distill:
                    loss = data.task.loss(out, batch)
                else:
                    loss = data.task.distill(out, teacher)
                if teacher is None:
                    teacher = out.detach()
                loss.backward()  # one graph at a time; the gradients sum over the widths
                losses.append(loss.item())
            optimizer.step()
            history.append({"step": step + 1, "widths": widths, "losses": losses})
            bar.update()
            bar.set_postfix(loss=f"{losses[0]:.3f}", refresh=False)
        bar.close()
        self.model.eval()
        return history

    def calibrate(self, counts, batches: Iterable, device=None) -> nn.Module:
        """The standalone network at ``counts`` with BatchNorm statistics measured on
        ``batches`` (train-mode, cumulative); the shared weights are not touched."""
        module = self.slicer.network(self.space.resolve(counts))
        return recalibrate_batchnorm(module, batches, device or next(self.model.parameters()).device)

    def network(self, counts, calibration_batches: Optional[Iterable] = None, device=None) -> nn.Module:
        """A standalone module at ``counts`` (or a multiplier), its BatchNorm calibrated on
        ``calibration_batches`` (by default the first training batches); without BatchNorm,
        the sliced weights."""
        if not has_batchnorm(self.model):
            return self.slicer.network(self.space.resolve(counts))
        if calibration_batches is None:
            if self._calibration_source is None:
                raise ValueError("a network with BatchNorm needs calibration_batches (or training "
                                 "first, whose first batches are used)")
            calibration_batches = first_batches(self._calibration_source, self.calibration_batches)
        return self.calibrate(counts, calibration_batches, device)
