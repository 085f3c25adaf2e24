"""Coordinates: where each weight sits in the model space, as the INR's input.

Every row addresses one (output channel, input channel) pair of one tensor (a bias: one output
channel). Columns: ``[l/L, c_in/C_in, c_out/C_out]`` and, with ``size_terms`` (the paper's
Eq. 3), ``[L/N, C_in/N, C_out/N]``, where N is the largest channel count of the full network.
The layer column is an exact label: rows are routed to their tensor's INR block by integer id,
and noise never touches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch

from .groups import MorphLayer, WidthSpace

POSITIONS = ("center", "index")


@dataclass(frozen=True)
class CoordConfig:
    """How channel positions are written down.

    size_terms: add the paper's three size columns. Measured in DESIGN.md to hurt stability and
        unseen widths, so off by default; the paper preset turns it on.
    positions: "center" puts channel j of C at (j + 1/2)/C, the middle of its cell, so a width's
        cells tile [0, 1] exactly; "index" is the paper's j/C.
    noise: half-width ``a`` of the uniform coordinate noise, in units of one channel's cell
        (1/C); 0.5 makes the noise cover exactly the channel's own cell.
    """
    size_terms: bool = False
    positions: str = "center"
    noise: float = 0.5

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, not {self.positions!r}")
        if self.noise < 0:
            raise ValueError(f"coordinate noise must be >= 0, not {self.noise}")

    @property
    def dim(self) -> int:
        return 6 if self.size_terms else 3


def _positions(count: int, how: str) -> torch.Tensor:
    j = torch.arange(count, dtype=torch.float32)
    return (j + 0.5) / count if how == "center" else j / count


def tensor_coordinates(space: WidthSpace, layer: MorphLayer, counts: Mapping[str, int],
                       bias: bool, config: CoordConfig,
                       noise_counts: Optional[Mapping[str, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coordinate rows of one tensor at ``counts`` and the per-column noise scale.

    Rows are output-major (row = c_out * C_in + c_in), matching the weight's canonical layout.
    The noise is ``config.noise`` cells of the channel's own width, but never wider than a cell
    at ``noise_counts`` (the narrowest counts training drew): a network narrower than any trained
    one is jittered only as far as training jittered.
    """
    c_in, c_out = space.layer_channels(layer, counts)
    cell_in, cell_out = c_in, c_out
    if noise_counts is not None:
        min_in, min_out = space.layer_channels(layer, noise_counts)
        cell_in, cell_out = max(c_in, min_in), max(c_out, min_out)
    num_layers, n = len(space.layers), float(space.max_channels)
    out_pos = _positions(c_out, config.positions)
    if bias:
        in_pos = torch.zeros(1)
        c_in_eff = 1
    else:
        in_pos = _positions(c_in, config.positions)
        c_in_eff = c_in
    grid_out = out_pos.repeat_interleave(c_in_eff)
    grid_in = in_pos.repeat(c_out)
    rows = grid_out.numel()
    cols = [torch.full((rows,), layer.index / num_layers), grid_in, grid_out]
    scale = [0.0, 0.0 if bias else 1.0 / cell_in, 1.0 / cell_out]
    if config.size_terms:
        cols += [torch.full((rows,), num_layers / n), torch.full((rows,), c_in / n),
                 torch.full((rows,), c_out / n)]
        scale += [0.0, 1.0 / n, 1.0 / n]
    return torch.stack(cols, dim=1), torch.tensor(scale) * config.noise


def tensor_channel_scale(space: WidthSpace, layer: MorphLayer, config: CoordConfig) -> torch.Tensor:
    """Per coordinate column, the layer's full channel count along it (0 for the layer label,
    1 for size terms): multiplied into the coordinates, one unit is one channel of this tensor,
    what ``GaussianFeatures`` scales its frequencies by."""
    c_in, c_out = space.layer_channels(layer, space.full)
    scale = [0.0, float(c_in), float(c_out)] + ([1.0, 1.0, 1.0] if config.size_terms else [])
    return torch.tensor(scale)
