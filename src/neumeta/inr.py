"""The implicit neural representation: Fourier features into per-tensor residual MLPs.

One MLP ("block") per parameter tensor, as in the paper. The blocks' weights are stacked in
single tensors so the same parameters run either as a loop over blocks (cheap on a CPU) or
batched (few kernel launches per layer on a GPU): blocks of similar row counts share one
padded batched matmul. Padding every block to the largest one, as a single bmm would, computes
5-6x the real rows for LeNet and ResNet-20 (a few large tensors beside many small ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn


FULL_WIDTH_SOURCES = ("best", "reference", "inr")
ENCODINGS = ("powers", "gaussian")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # INRConfig.precision: the matmuls' dtype


@dataclass(frozen=True)
class INRConfig:
    """Shape of the INR: ``depth`` linear layers (input, depth-2 residual hidden, output).

    residual: "none" (the INR outputs the weights), or the INR outputs a correction on top of the
        reference weights resampled to the width (``neumeta.resample``): "cells" (a channel is the
        mean of the full channels of its cell), "linear" (interpolated at its centre, continuous
        in the width) or "area" (weighted by cell overlap: continuous, skips no channel). The
        correction starts at zero, so full width is the reference network exactly until training
        moves it.
    full_width: what sampling gives at full width (every group at its full channel count):
        "reference", the network the manifold was built from, exactly; "inr", the INR's mean, as at
        every other width; "best" (default), whichever of the two ``fit`` measured better on its
        validation split (the reference before a fit, or without validation data): no accuracy
        is lost at width 1.0 when the base was the better network, none given away when the fit
        improved on it. Narrower widths are always the INR's: blending the reference's detail
        into them, or keeping its layers where only other groups narrow, measured 2-27 points
        worse on LeNet. Sampling only (``sample``, ``expected_parameters``); ``fit`` trains and
        validates the INR.
    detail: a free full-width table of what the INR does not hold (the reference minus the INR's
        mean full width, set when the pre-fit ends), resampled to each width by cell overlap and
        added to the INR's weights in and above the trained range; below it the table fades out
        linearly over ``detail_fade`` of width, leaving the INR alone, which ``fit`` also trains
        on its own for those widths. Full width is then the reference network exactly when the
        joint phase starts, and the table learns the task at the speed of ordinary weights.
    grid, grid_range, grid_alone: unset (None), the default recipe's: all three on (the grid alone in
        the trained range), unless ``detail`` or ``residual`` holds the plain weights; a ``grid`` set
        by hand leaves the other two off unless they are set. ``grid=False`` (the recipe ``inr``, the
        default until 2026-12-08) is the INR at every width. Measured on LeNet over 5 seeds
        (docs/recipe.md): the default is within 0.6 points of individual models given the
        manifold's data in the trained range and 1.3-2.4 above the base at full width, where the
        INR alone was 2-3 under them; below the range the two are the same to the last digit.
    grid: a learned table per tensor at its full channel resolution, read at each row's coordinates
        (jittered like the INR's, so it trains under the same coordinate noise) by bilinear
        interpolation over the (out, in) channel positions, and added to the INR's output at every
        width. Why: the INR learns more slowly per image than plain weights (docs/recipe.md, "The
        honest gap"); the table's entries are plain weights, and the noise that teaches the INR
        values between channels teaches the table the same, so a narrower or unseen width reads a
        blend of neighbouring channels scaled to its fan-in, as the coordinates do. Starts at zero
        (the INR alone). Measured on LeNet (seed 0, docs/recipe.md): it learns faster, settles at the
        INR's level in the trained range, and is 1.8 points lower at the unseen 75 %: an option for
        experiments. The detail table is the other way to hold plain weights: use one of them.
    grid_range: the grid serves the trained range only (needs ``grid``). There the INR and the grid
        are read at the channels' centres, without coordinate noise, and the grid is set when the
        pre-fit ends so that full width is the reference network. Below the range the grid fades out
        over ``detail_fade`` of width and the INR alone takes over, read with the noise, as in the
        default; ``fit`` trains that INR alone beside the grid, at every trained width, with the
        same teachers; calibrated sampling corrects the widths below the range to that INR alone's
        full width (``Reference.below``). Why: plain weights read without noise learn the trained
        widths as an INN-style network does (LeNet, seed 0: 2-3 validation points over the
        default), but give nothing below the range; the noisy INR is what reaches there
        (docs/recipe.md).
    grid_alone: with ``grid_range``, the trained range is the grid alone, the INR's values not added:
        a network of plain weights read at the centres (as the INN-style baseline reads its
        channels), set to the reference when the pre-fit ends. ``fit`` then trains the INR exactly as
        without a grid (its own noisy full width teaches its narrower widths) and the grid beside it
        as a network of its own on the same batches, every width taught by the grid's full width.
        Why: beside a grid that adds to it, the INR alone below the range held less than the
        default's (LeNet, seed 1: 2.4 points at 75 %); kept apart, neither pulls the other.
    encoding: how coordinates become the MLPs' input. "powers" (default, the paper's):
        sin/cos(2^k pi v) of each coordinate alone, k < ``frequencies``. "gaussian": random Fourier
        features that mix the in- and out-channel positions (``GaussianFeatures``), their
        frequencies scaled per tensor by its channel counts times ``encoding_scale``; the MLP's
        input keeps the same width. It holds large tensors better: ResNet-20 with every group
        morphing, 1,000 pre-fit steps, largest relative error 0.44 against 0.68
        (docs/benchmarks.md, "Reconstruction after the pre-fit").
    channel_features: when > 0, every tensor gets a learned vector of this many features per input
        and per output channel of its full width (``ChannelFeatures``), read at the coordinate by
        linear interpolation and appended to the encoding. Why: the MLP learns smooth functions of
        the coordinates first, so one channel's own weights move slowly; a feature of its own moves
        at the speed of an ordinary weight, and a narrower width reads the mean of its cell as the
        coordinates already do. 0 (default): the encoding alone.
    precision: "float32" (default) or "bfloat16": the dtype of the MLPs' matmuls (autocast; the
        parameters, Adam's state and the returned weights stay float32), in fitting and sampling
        alike, so the function sampled is the one trained. Why: on CPUs with AVX512-BF16 (this
        project's) and on GPUs a bfloat16 matmul runs 2-3x faster, and the INR's matmuls are a
        third to a half of a fit step. The cost: each generated value is rounded to bfloat16's 8
        significant bits (relative error up to 0.4 %), small beside what a pre-fit with coordinate
        noise holds (0.1-0.8) but not beside the exact pre-fit's 0.007.
    """
    hidden: int = 256
    depth: int = 5
    frequencies: int = 16
    encoding: str = "powers"
    encoding_scale: float = 0.15
    residual: str = "none"
    detail: bool = False
    detail_fade: float = 0.125
    grid: Optional[bool] = None        # None: the default recipe's grid (see below)
    grid_range: Optional[bool] = None
    grid_alone: Optional[bool] = None
    full_width: str = "best"
    channel_features: int = 0
    precision: str = "float32"

    def __post_init__(self):
        self._resolve_grid()
        if self.depth < 2 or self.hidden < 1 or self.frequencies < 0:
            raise ValueError(f"invalid INR config {self}: need depth >= 2, hidden >= 1, frequencies >= 0")
        if self.residual not in ("none", "cells", "linear", "area"):
            raise ValueError(f"residual must be none, cells, linear or area, not {self.residual!r}")
        if self.full_width not in FULL_WIDTH_SOURCES:
            raise ValueError(f"full_width must be one of {FULL_WIDTH_SOURCES}, not {self.full_width!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, not {self.encoding!r}")
        if not self.encoding_scale > 0:
            raise ValueError(f"encoding_scale must be > 0 (cycles per channel), not {self.encoding_scale}")
        if self.detail and self.residual != "none":
            raise ValueError("detail and residual are two ways of holding the reference's detail: use one of them")
        if self.grid and (self.detail or self.residual != "none"):
            raise ValueError("grid holds plain weights beside the INR, as detail and residual do: use one of them "
                             "(grid=False)")
        if self.grid_range and not self.grid:
            raise ValueError("grid_range says where the grid serves: it needs grid=True")
        if self.grid_alone and not self.grid_range:
            raise ValueError("grid_alone makes the trained range the grid's alone: it needs grid=True, grid_range=True")
        if self.channel_features < 0:
            raise ValueError(f"channel_features must be >= 0, not {self.channel_features}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, not {self.precision!r}")
        if not self.detail_fade > 0:
            raise ValueError(f"detail_fade must be > 0 (a width fraction), not {self.detail_fade}")

    def _resolve_grid(self):
        """Unset grid options take the default recipe's: the grid alone in the trained range, unless
        ``detail`` or ``residual`` holds the plain weights. A ``grid`` set by hand turns the unset
        ``grid_range`` and ``grid_alone`` off, so ``grid=True`` is the grid at every width, as it was
        before the grid alone became the default."""
        chosen = self.grid is None
        grid = (self.detail is False and self.residual == "none") if chosen else self.grid
        grid_range = (grid and chosen) if self.grid_range is None else self.grid_range
        grid_alone = (grid_range and chosen) if self.grid_alone is None else self.grid_alone
        for name, value in (("grid", grid), ("grid_range", grid_range), ("grid_alone", grid_alone)):
            object.__setattr__(self, name, bool(value))


# the grid options of a configuration written before the grid existed, or before it became the
# default: off (a saved manifold or result that lacks them had none)
NO_GRID = {"grid": False, "grid_range": False, "grid_alone": False}


class FourierFeatures(nn.Module):
    """[v, sin(2^k pi v), cos(2^k pi v)] for k < frequencies (the paper's positional encoding)."""

    def __init__(self, frequencies: int):
        super().__init__()
        self.register_buffer("bands", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32),
                             persistent=False)

    def out_dim(self, in_dim: int) -> int:
        return in_dim * (1 + 2 * self.bands.numel())

    def forward(self, v: torch.Tensor, block: int = 0) -> torch.Tensor:
        angles = (v.unsqueeze(-1) * self.bands).flatten(-2)
        return torch.cat([v, torch.sin(angles), torch.cos(angles)], dim=-1)


class GaussianFeatures(nn.Module):
    """[v, sin(2 pi (v * c_t) B), cos(2 pi (v * c_t) B)] with B ~ N(0, scale^2), fixed.

    Why: a tensor's weights are a 2-D table over (out channel, in channel); powers of two encode
    each axis alone and leave the MLP to build every product of the two, random directions give
    it mixed frequencies directly. ``channel_scale`` c_t [blocks, dim] multiplies each
    coordinate by that tensor's full channel count along it, so a feature's period spans the
    same number of channels in a 16-channel layer as in a 64-channel one (without it the
    frequencies that resolve 64 channels turn a 16-channel layer's coordinate noise into
    random phases). B is drawn from a fixed seed and saved with the manifold.
    """

    def __init__(self, dim: int, features: int, scale: float, channel_scale: torch.Tensor, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("B", 2 * math.pi * scale * torch.randn(dim, features, generator=generator))
        self.register_buffer("channel_scale", channel_scale.float())

    def out_dim(self, in_dim: int) -> int:
        return in_dim + 2 * self.B.shape[1]

    def forward(self, v: torch.Tensor, block: int = 0) -> torch.Tensor:
        angles = (v * self.channel_scale[block]) @ self.B
        return torch.cat([v, torch.sin(angles), torch.cos(angles)], dim=-1)


def neighbours(v: torch.Tensor, count: int, offset: float = 0.5):
    """For positions ``v`` [R] in [0, 1] over ``count`` channels at (j + offset)/count: the lower
    and upper channel of each and the weight of the upper one ([R, 1]), clamped at the ends, so
    a channel's own position reads it alone (linear interpolation along one axis)."""
    t = (v * count - offset).clamp(0, count - 1)
    low = t.floor().long().clamp(max=max(count - 2, 0))
    return low, (t - low).unsqueeze(-1), (low + 1).clamp(max=count - 1)


class ChannelFeatures(nn.Module):
    """An encoding followed by learned per-channel features of each tensor.

    Block b has tables [C_in(b), dim] and [C_out(b), dim] over its full channel counts (a bias has
    one input "channel"). A coordinate v in [0, 1] reads the table at v * C - 1/2 by linear
    interpolation, so channel j's centre (j + 1/2)/C reads row j exactly and a jittered or narrower
    coordinate reads a blend of its neighbours. The tables start at zero: before training the
    features add nothing to the encoding.
    """

    def __init__(self, encoding: nn.Module, channels: Sequence[Sequence[int]], dim: int):
        super().__init__()
        self.encoding, self.dim = encoding, dim
        self.inputs = nn.ParameterList([nn.Parameter(torch.zeros(max(1, c_in), dim)) for c_in, _ in channels])
        self.outputs = nn.ParameterList([nn.Parameter(torch.zeros(max(1, c_out), dim)) for _, c_out in channels])

    def out_dim(self, in_dim: int) -> int:
        return self.encoding.out_dim(in_dim) + 2 * self.dim

    @staticmethod
    def read(table: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``table`` [C, dim] linearly interpolated at positions ``v`` [R] (channel centres at (j + 1/2)/C)."""
        low, frac, high = neighbours(v, table.shape[0])
        return table[low] * (1 - frac) + table[high] * frac

    def forward(self, v: torch.Tensor, block: int = 0) -> torch.Tensor:
        return torch.cat([self.encoding(v, block), self.read(self.inputs[block], v[:, 1]),
                          self.read(self.outputs[block], v[:, 2])], dim=-1)


def _mlp(x: torch.Tensor, w_in, b_in, w_hidden, b_hidden, w_out, b_out) -> torch.Tensor:
    """One residual MLP on rows ``x`` [R, in_dim]."""
    h = torch.relu(torch.addmm(b_in, x, w_in))
    for w, b in zip(w_hidden.unbind(0), b_hidden.unbind(0)):
        h = h + torch.relu(torch.addmm(b, h, w))
    return torch.addmm(b_out, h, w_out)


def row_buckets(rows: Sequence[int], ratio: float) -> List[List[int]]:
    """Indices of ``rows`` grouped so that within a group the largest row count is at most
    ``ratio`` times the smallest: padding one group to its largest member wastes < 1 - 1/ratio
    of its rows. ``ratio=inf`` is one group (every block padded to the largest)."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i])
    buckets: List[List[int]] = []
    for i in order:
        if buckets and rows[buckets[-1][0]] <= ratio * max(1, rows[i]):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


class BlockMLP(nn.Module):
    """``blocks`` independent residual MLPs with stacked weights.

    bucket_ratio: in the batched forward, blocks whose row counts lie within this factor share
        one padded batched matmul (``row_buckets``); ``inf`` pads every block to the largest.
    """

    def __init__(self, blocks: int, in_dim: int, out_dim: int, config: INRConfig, bucket_ratio: float = 1.5):
        super().__init__()
        if not bucket_ratio >= 1:
            raise ValueError(f"bucket_ratio must be >= 1, not {bucket_ratio}")
        self.bucket_ratio = bucket_ratio
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
        # unbind once: indexing the stacked weights per block (or per bucket) would make autograd
        # build a full-size zero gradient for every index
        per_block = list(zip(*(t.unbind(0) for t in self._stacked())))
        if not batched:
            return [_mlp(x, *per_block[b]) for x, b in zip(inputs, block_ids)]
        outputs: List[torch.Tensor] = [None] * len(inputs)
        for bucket in row_buckets([x.shape[0] for x in inputs], self.bucket_ratio):
            if len(bucket) == 1:  # nothing to batch with: no padding, no copy of the weights
                i = bucket[0]
                outputs[i] = _mlp(inputs[i], *per_block[block_ids[i]])
                continue
            weights = [torch.stack(ws) for ws in zip(*(per_block[block_ids[i]] for i in bucket))]
            out = _padded_mlp(nn.utils.rnn.pad_sequence([inputs[i] for i in bucket], batch_first=True), *weights)
            for k, i in enumerate(bucket):
                outputs[i] = out[k, :inputs[i].shape[0]]
        return outputs


def _padded_mlp(x: torch.Tensor, w_in, b_in, w_hidden, b_hidden, w_out, b_out) -> torch.Tensor:
    """``_mlp`` of B blocks at once on padded rows ``x`` [B, R, in_dim] (padding rows give junk
    that the caller drops; they never mix with real rows)."""
    h = torch.relu(torch.baddbmm(b_in.unsqueeze(1), x, w_in))
    for k in range(w_hidden.shape[1]):
        h = h + torch.relu(torch.baddbmm(b_hidden[:, k].unsqueeze(1), h, w_hidden[:, k]))
    return torch.baddbmm(b_out.unsqueeze(1), h, w_out)
