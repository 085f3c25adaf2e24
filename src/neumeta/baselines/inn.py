"""An INN-style continuous network (after the idea of Integral Neural Networks, Solodskikh et
al. 2023): a width is a resampling of the weights, not a slice.

The full-width weights are read as samples of a function of the channel coordinate, channel
``i`` of ``C`` sitting at the centre of its cell, ``(i + 0.5) / C``. A network of ``c`` channels
samples the same function at ``(j + 0.5) / c`` (linear interpolation between the neighbouring
samples, the end samples held beyond the outer centres) along every coupled channel axis. An
axis a layer sums over (its input channels) is a quadrature of an integral over the channel
coordinate, so fewer samples each weigh more: those weights are scaled by ``C / c``. A network
whose weights do not vary along the channels then computes the same function at every width.

Per-channel vectors (BatchNorm affine and statistics, a bias) are resampled like output axes.
Running statistics are re-measured per width as US-Nets do (``bn="recalibrate"``), or kept as
resampled (``bn="resample"``, exact at full width). Training: each step the full width and
``n_random`` widths drawn in [``min_width``, 1], each on the task loss, gradients summed.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from .slicing import SlicedNetwork, TensorAxis, has_batchnorm
from .usnet import USNet

__all__ = ["INN", "ResampledNetwork"]


class ResampledNetwork(SlicedNetwork):
    """``SlicedNetwork`` whose narrowing along a channel axis is a linear resampling (see the
    module docstring); the narrow skeleton and the functional call are the same."""

    def _axis_operator(self, tensor_axis: TensorAxis, kept: List[int], counts, device):
        key = dict(self.key(counts))
        owners, position_of = self.owners[tensor_axis], self.position_of[tensor_axis]
        lo, hi, w_lo, w_hi = [], [], [], []
        for p in kept:
            owner = owners[p]
            if owner is None or key[owner[0]] == self.sizes[owner[0]]:
                lo.append(p), hi.append(p), w_lo.append(1.0), w_hi.append(0.0)
                continue
            group, j, slot = owner
            size, count = self.sizes[group], key[group]
            u = min(max((j + 0.5) * size / count - 0.5, 0.0), size - 1.0)  # in old channel indices
            below = int(u)
            above, frac = min(below + 1, size - 1), u - int(u)
            scale = size / count if tensor_axis in self.summed_axes else 1.0
            lo.append(position_of[(group, below, slot)])
            hi.append(position_of[(group, above, slot)])
            w_lo.append((1.0 - frac) * scale), w_hi.append(frac * scale)
        as_long = dict(dtype=torch.long, device=device)
        as_float = dict(dtype=torch.float32, device=device)
        return (torch.tensor(lo, **as_long), torch.tensor(hi, **as_long),
                torch.tensor(w_lo, **as_float), torch.tensor(w_hi, **as_float))

    @staticmethod
    def _apply(tensor: torch.Tensor, axis: int, operator) -> torch.Tensor:
        lo, hi, w_lo, w_hi = operator
        shape = [1] * tensor.dim()
        shape[axis] = -1
        w_lo, w_hi = w_lo.to(tensor.dtype).view(shape), w_hi.to(tensor.dtype).view(shape)
        return tensor.index_select(axis, lo) * w_lo + tensor.index_select(axis, hi) * w_hi


class INN(USNet):
    """A continuous-width network: weights resampled to any width in [``min_width``, 1].

    Trained like a US-Net step (shared tensors, one backward per width) but without in-place
    distillation or a forced smallest width: the full width and ``n_random`` random widths,
    each on the task loss. ``model`` is copied; ``groups``/``fixed`` as in ``WidthSpace``.
    """

    _resampler = ResampledNetwork
    _desc = "inn"

    def __init__(self, model: nn.Module, example_inputs, groups=None, min_width: float = 0.25,
                 n_random: int = 1, fixed=(), calibration_batches: int = 16):
        super().__init__(model, example_inputs, groups=groups, min_width=min_width, n_random=n_random,
                         distill=False, fixed=fixed, calibration_batches=calibration_batches)

    def sample_widths(self, generator: torch.Generator) -> List[float]:
        """One step's widths: the full width, then ``n_random`` drawn in [``min_width``, 1]."""
        drawn = torch.rand(self.n_random, generator=generator) * (1.0 - self.min_width) + self.min_width
        return [1.0] + [float(w) for w in drawn]

    def network(self, counts, bn: str = "recalibrate", calibration_batches: Optional[Iterable] = None,
                device=None) -> nn.Module:
        """A standalone module at ``counts`` (or a multiplier). ``bn="recalibrate"``: BatchNorm
        statistics measured on ``calibration_batches`` (by default the first training batches);
        ``bn="resample"``: the full width's statistics resampled (no data needed)."""
        if bn not in ("recalibrate", "resample"):
            raise ValueError(f"bn={bn!r}: choose 'recalibrate' or 'resample'")
        if bn == "resample" or not has_batchnorm(self.model):
            return self.slicer.network(self.space.resolve(counts))
        return super().network(counts, calibration_batches, device)
