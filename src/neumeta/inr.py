"""The implicit neural representation: Fourier features into per-tensor residual MLPs.

One MLP ("block") per parameter tensor, as in the paper. The blocks' weights are stacked in
single tensors so the same parameters run either as a loop over blocks (cheap on a CPU) or as
one batched matmul over padded rows (one kernel launch per layer on a GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn as nn


@dataclass(frozen=True)
class INRConfig:
    """Shape of the INR: ``depth`` linear layers (input, depth-2 residual hidden, output).

    residual: "none" (the INR outputs the weights), or the INR outputs a correction on top of the
        reference weights resampled to the width (``neumeta.resample``): "cells" (a channel is the
        mean of the full channels of its cell), "linear" (interpolated at its centre, continuous
        in the width) or "area" (weighted by cell overlap: continuous, skips no channel). The correction starts at zero, so full width is the reference network
        exactly until training moves it.
    """
    hidden: int = 256
    depth: int = 5
    frequencies: int = 16
    residual: str = "none"

    def __post_init__(self):
        if self.depth < 2 or self.hidden < 1 or self.frequencies < 0:
            raise ValueError(f"invalid INR config {self}: need depth >= 2, hidden >= 1, frequencies >= 0")
        if self.residual not in ("none", "cells", "linear", "area"):
            raise ValueError(f"residual must be none, cells, linear or area, not {self.residual!r}")


class FourierFeatures(nn.Module):
    """[v, sin(2^k pi v), cos(2^k pi v)] for k < frequencies (the paper's positional encoding)."""

    def __init__(self, frequencies: int):
        super().__init__()
        self.register_buffer("bands", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32),
                             persistent=False)

    def out_dim(self, in_dim: int) -> int:
        return in_dim * (1 + 2 * self.bands.numel())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        angles = (v.unsqueeze(-1) * self.bands).flatten(-2)
        return torch.cat([v, torch.sin(angles), torch.cos(angles)], dim=-1)


def _mlp(x: torch.Tensor, w_in, b_in, w_hidden, b_hidden, w_out, b_out) -> torch.Tensor:
    """One residual MLP on rows ``x`` [R, in_dim]."""
    h = torch.relu(torch.addmm(b_in, x, w_in))
    for w, b in zip(w_hidden.unbind(0), b_hidden.unbind(0)):
        h = h + torch.relu(torch.addmm(b, h, w))
    return torch.addmm(b_out, h, w_out)


class BlockMLP(nn.Module):
    """``blocks`` independent residual MLPs with stacked weights."""

    def __init__(self, blocks: int, in_dim: int, out_dim: int, config: INRConfig):
        super().__init__()
        h, hidden_layers = config.hidden, config.depth - 2
        self.w_in = nn.Parameter(torch.empty(blocks, in_dim, h))
        self.b_in = nn.Parameter(torch.empty(blocks, h))
        self.w_hidden = nn.Parameter(torch.empty(blocks, hidden_layers, h, h))
        self.b_hidden = nn.Parameter(torch.empty(blocks, hidden_layers, h))
        self.w_out = nn.Parameter(torch.empty(blocks, h, out_dim))
        self.b_out = nn.Parameter(torch.empty(blocks, out_dim))
        for w, b, fan_in in ((self.w_in, self.b_in, in_dim), (self.w_hidden, self.b_hidden, h),
                             (self.w_out, self.b_out, h)):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def _stacked(self):
        return self.w_in, self.b_in, self.w_hidden, self.b_hidden, self.w_out, self.b_out

    def forward(self, inputs: Sequence[torch.Tensor], block_ids: Sequence[int],
                batched: bool = False) -> List[torch.Tensor]:
        """Each ``inputs[i]`` goes through block ``block_ids[i]`` (never a neighbouring block)."""
        if not batched:
            # unbind once: indexing the stacked weights per block would make autograd build a
            # full-size zero gradient for every index
            per_block = list(zip(*(t.unbind(0) for t in self._stacked())))
            return [_mlp(x, *per_block[b]) for x, b in zip(inputs, block_ids)]
        ids = torch.as_tensor(list(block_ids), device=self.w_in.device)
        w_in, b_in, w_hidden, b_hidden, w_out, b_out = (t[ids] for t in self._stacked())
        rows = max(x.shape[0] for x in inputs)
        padded = torch.stack([nn.functional.pad(x, (0, 0, 0, rows - x.shape[0])) for x in inputs])
        h = torch.relu(torch.baddbmm(b_in.unsqueeze(1), padded, w_in))
        for k in range(w_hidden.shape[1]):
            h = h + torch.relu(torch.baddbmm(b_hidden[:, k].unsqueeze(1), h, w_hidden[:, k]))
        out = torch.baddbmm(b_out.unsqueeze(1), h, w_out)
        return [out[i, :x.shape[0]] for i, x in enumerate(inputs)]
