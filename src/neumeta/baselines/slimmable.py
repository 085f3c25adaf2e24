"""Slimmable networks (Yu et al. 2019): shared weights, a private BatchNorm per trained width.

Every width ("switch") is the first channels of one set of weights, but the statistics of a
channel's input change with the width that feeds it, so each switch keeps its own BatchNorm:
running statistics and affine parameters, at that switch's channel counts. Each step trains
every switch on the same batch and sums their losses (their gradients, here: one backward per
switch keeps memory at one width). The paper trains 1.0x, 0.75x and 0.5x (and 0.25x).

A width that was never trained has no BatchNorm of its own: ``bn="nearest"`` borrows the one of
the nearest trained width with at least as many channels in every group (its first channels),
``bn="recalibrate"`` takes that switch's affine parameters and measures the running
statistics anew at the asked width. A model without BatchNorm is just the shared weights sliced.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..groups import WidthSpace
from ..progress import progress_bar
from .slicing import (SlicedNetwork, batchnorm_tensors, first_batches, recalibrate_batchnorm, reslice,
                      step_batches)

__all__ = ["Slimmable"]

PAPER_WIDTHS = (1.0, 0.75, 0.5)


class Slimmable:
    """A slimmable network trained at ``widths`` (anything ``WidthSpace.resolve`` reads).

    ``model`` is copied: the caller's network is never changed. ``groups``/``fixed`` choose and
    name the channel groups as ``WidthSpace`` does; the others keep every channel.
    ``calibration_batches``: how many training batches ``bn="recalibrate"`` uses by default.
    """

    def __init__(self, model: nn.Module, example_inputs, groups=None, widths: Sequence = PAPER_WIDTHS,
                 fixed: Sequence[str] = (), calibration_batches: int = 16):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.space = WidthSpace(self.model, example_inputs, groups=groups, fixed=fixed)
        self.slicer = SlicedNetwork(self.model, example_inputs, fixed=fixed)
        self.bn_names = batchnorm_tensors(self.model)
        self.switches: List[Dict[str, int]] = []
        for width in widths:
            counts = self.space.resolve(width)
            if all(counts != s for s in self.switches):
                self.switches.append(counts)
        if not self.switches:
            raise ValueError("a slimmable network needs at least one width to train")
        own = self.slicer.full_tensors()
        bn_full = {n: own[n] for n in self.bn_names}
        # switch i's BatchNorm: parameters and buffers at its own channel counts, trained separately
        self.switch_bn: List[Dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for counts in self.switches:
                state = {}
                for name, t in self.slicer.map_tensors(counts, bn_full).items():
                    t = t.detach().clone()
                    state[name] = nn.Parameter(t) if isinstance(own[name], nn.Parameter) else t
                self.switch_bn.append(state)
        self.calibration_batches = calibration_batches
        self._calibration_source = None

    def parameters(self) -> List[torch.Tensor]:
        """What training updates: the shared weights (not the model's own BatchNorm, never run)
        and every switch's BatchNorm parameters."""
        skip = set(self.bn_names)
        shared = [p for n, p in self.model.named_parameters() if n not in skip]
        return shared + [t for bn in self.switch_bn for t in bn.values() if isinstance(t, nn.Parameter)]

    def forward(self, switch: int, x: torch.Tensor) -> torch.Tensor:
        """Switch ``switch`` on ``x``, differentiable in the shared weights and its BatchNorm."""
        return self.slicer(self.switches[switch], x, narrow=self.switch_bn[switch], exclude=self.bn_names)

    def train(self, data, steps: int, lr: float = 1e-3, device="cpu", progress: bool = True,
              seed: int = 0) -> List[Dict]:
        """Adam for ``steps`` steps; each step sums the task loss of every switch on one batch.
        Returns one record per step: the loss of every switch."""
        torch.manual_seed(seed)
        self._to(device)
        self.model.train()
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self._calibration_source = data.train
        history = []
        bar = progress_bar(total=steps, desc="slimmable", disable=not progress, leave=False)
        for step, batch in enumerate(step_batches(data.train, steps)):
            batch = [t.to(device) for t in batch]
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for i in range(len(self.switches)):
                loss = data.task.loss(self.forward(i, batch[0]), batch)
                loss.backward()  # summed over switches in the gradients
                losses.append(loss.item())
            optimizer.step()
            history.append({"step": step + 1, "losses": losses})
            bar.update()
            bar.set_postfix(loss=f"{sum(losses):.3f}", refresh=False)
        bar.close()
        self.model.eval()
        return history

    def _to(self, device) -> None:
        self.model.to(device)
        with torch.no_grad():
            for bn in self.switch_bn:
                for name, t in bn.items():
                    t.data = t.data.to(device)

    # ------------------------------------------------------------------ networks
    def switch_of(self, counts: Mapping[str, int]) -> Optional[int]:
        """The trained switch at exactly ``counts``, or None."""
        key = self.slicer.key(counts)
        for i, s in enumerate(self.switches):
            if self.slicer.key(s) == key:
                return i
        return None

    def nearest_switch(self, counts: Mapping[str, int]) -> int:
        """The trained switch whose BatchNorm an untrained width borrows: among those with at
        least as many channels in every group, the one with the fewest extra channels (the first
        listed on a tie). Raises, naming the groups, where no trained width is wide enough."""
        want = dict(self.slicer.key(counts))
        wide_enough = []
        for i, s in enumerate(self.switches):
            have = dict(self.slicer.key(s))
            if all(have[g] >= c for g, c in want.items()):
                wide_enough.append((sum(have[g] - c for g, c in want.items()), i))
        if not wide_enough:
            widest = {g: max(dict(self.slicer.key(s))[g] for s in self.switches) for g in want}
            short = [f"{g} ({want[g]} > {widest[g]})" for g in want if want[g] > widest[g]]
            raise ValueError("no trained width has enough channels to lend its BatchNorm in group(s) "
                             + ", ".join(short) + "; train a wider switch")
        return min(wide_enough)[1]

    def network(self, counts, bn: str = "nearest", calibration_batches: Optional[Iterable] = None,
                device=None) -> nn.Module:
        """A standalone module at ``counts`` (or a multiplier): a trained width with its own
        BatchNorm; another width with the nearest wider switch's (``bn="nearest"``), or with that
        switch's affine parameters and statistics measured anew (``bn="recalibrate"``, on
        ``calibration_batches``, by default the first training batches). ``recalibrate`` at a
        trained width re-measures its statistics too."""
        if bn not in ("nearest", "recalibrate"):
            raise ValueError(f"bn={bn!r}: choose 'nearest' or 'recalibrate'")
        counts = self.space.resolve(counts)
        if not self.bn_names:
            return self.slicer.network(counts)
        source = self.switch_of(counts)
        if source is None:
            source = self.nearest_switch(counts)
        borrowed = reslice(self.slicer, self.switch_bn[source], self.switches[source], counts)
        module = self.slicer.network(counts, narrow=borrowed, exclude=self.bn_names)
        if bn == "recalibrate":
            batches = calibration_batches if calibration_batches is not None else self._default_batches()
            device = device or next(self.model.parameters()).device
            recalibrate_batchnorm(module, batches, device)
        return module

    def _default_batches(self):
        if self._calibration_source is None:
            raise ValueError("bn='recalibrate' needs calibration_batches (or a trained network, "
                             "whose first training batches are used)")
        return first_batches(self._calibration_source, self.calibration_batches)
