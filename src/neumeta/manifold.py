"""WeightManifold: the INR that turns a requested width into a network's weights.

``generate`` gives differentiable parameters (used by ``fit`` through
``torch.func.functional_call``); ``sample`` gives a standalone, really narrower ``nn.Module``.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import AbstractSet, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .calibrate import Reference, calibrate, measure_reference
from .coords import CoordConfig, tensor_channel_scale, tensor_coordinates
from .groups import MorphLayer, Width, WidthSpace
from .inr import BlockMLP, ChannelFeatures, FourierFeatures, GaussianFeatures, INRConfig, PRECISIONS, neighbours
from .resample import apply_resampling, resampling, resampled_rows


@dataclass(frozen=True)
class TensorSpec:
    """One generated parameter tensor: its layer, whether it is the bias, its row layout."""
    block: int
    layer: MorphLayer
    bias: bool
    out_repeat: int
    in_repeat: int

    @property
    def name(self) -> str:
        return self.layer.bias_name if self.bias else self.layer.weight_name

    @property
    def elements(self) -> int:
        """Values per row: kernel taps times flatten repeats."""
        if self.bias:
            return self.out_repeat
        return self.out_repeat * self.in_repeat * math.prod(self.layer.kernel)


def _uniform_repeat(segments, where: str) -> int:
    repeats = {s.repeat for s in segments}
    if len(repeats) != 1:
        raise ValueError(f"{where}: segments with different flatten sizes {sorted(repeats)} are not supported")
    return repeats.pop()


def _crop_index(spec: TensorSpec, out_dim: int) -> torch.Tensor:
    """Which of the INR's ``out_dim`` outputs this tensor uses: a centred crop for smaller kernels."""
    e = spec.elements
    kernel = spec.layer.kernel
    if e == out_dim:
        return torch.arange(e)
    if e == 1:
        return torch.tensor([out_dim // 2])
    if not spec.bias and kernel and e == math.prod(kernel) and len(set(kernel)) == 1:
        n, k = len(kernel), kernel[0]
        side = round(out_dim ** (1.0 / n))
        if side ** n == out_dim and (side - k) % 2 == 0:
            off = (side - k) // 2
            grid = torch.arange(out_dim).view([side] * n)
            for d in range(n):
                grid = grid.narrow(d, off, k)
            return grid.reshape(-1)
    return torch.arange(e)


class WeightManifold(nn.Module):
    """An INR of the weights of every width of ``space``'s network.

    Only layers that a morphable group touches are generated; the others (e.g. everything but
    the last block of layer3 with ``WidthSpace(groups="paper")``) keep the reference weights.

    Args:
        space: the ``WidthSpace`` (folded model + channel groups) to represent.
        inr: INR shape (hidden width, depth, Fourier frequencies).
        coords: coordinate convention and training noise.
        batched: run blocks of similar row counts as padded batched matmuls (``BlockMLP``: fewer
            kernel launches, for GPUs; on a CPU no faster than the loop); default: on CUDA only.
    """

    def __init__(self, space: WidthSpace, inr: INRConfig = INRConfig(), coords: CoordConfig = CoordConfig(),
                 batched: Optional[bool] = None):
        super().__init__()
        self.space, self.inr_config, self.coord_config, self.batched = space, inr, coords, batched
        specs: List[TensorSpec] = []
        for layer in space.layers:
            if not layer.morphs:  # same shape at every width: the reference weights are used as they are
                continue
            so = _uniform_repeat(layer.out, f"{layer.name} outputs")
            si = _uniform_repeat(layer.inp, f"{layer.name} inputs")
            specs.append(TensorSpec(len(specs), layer, False, so, si))
            if layer.has_bias:
                specs.append(TensorSpec(len(specs), layer, True, so, si))
        if not specs:
            raise ValueError("WeightManifold: no layer has a morphable channel group; check WidthSpace(groups=...)")
        self.specs = specs
        self.out_dim = max(s.elements for s in specs)
        self.fourier = FourierFeatures(inr.frequencies) if inr.encoding == "powers" else \
            GaussianFeatures(coords.dim, coords.dim * inr.frequencies, inr.encoding_scale,
                             torch.stack([tensor_channel_scale(space, s.layer, coords) for s in specs]))
        if inr.channel_features:
            full_channels = [space.layer_channels(s.layer, space.full) for s in specs]
            channels = [(1 if s.bias else c_in, c_out) for s, (c_in, c_out) in zip(specs, full_channels)]
            self.fourier = ChannelFeatures(self.fourier, channels, inr.channel_features)
        self.inr = BlockMLP(len(specs), self.fourier.out_dim(coords.dim), self.out_dim, inr)
        for s in specs:
            self.register_buffer(f"crop_{s.block}", _crop_index(s, self.out_dim), persistent=False)
        # A fixed per-tensor output scale, so every block learns values of order one.
        original = self.original_parameters()
        full = space.full
        scale = []
        for s in specs:
            w = original[s.name].detach().double()
            fan = 1 if s.bias else space.layer_channels(s.layer, full)[0]
            scale.append(max(float(w.std()) if w.numel() > 1 else float(w.abs().mean()), 1e-3) * fan)
        self.register_buffer("output_scale", torch.tensor(scale, dtype=torch.float32))
        if inr.residual != "none":  # a correction that starts at zero: full width is the reference exactly
            with torch.no_grad():
                self.inr.w_out.zero_()
                self.inr.b_out.zero_()
        self._coord_cache: Dict[tuple, list] = {}
        self._base_cache: Dict[tuple, list] = {}
        self._detail_maps: Dict[tuple, list] = {}
        self._noise_counts: Optional[Dict[str, int]] = None
        self.noise_fraction = 1.0  # of the coordinate noise in row_values; fit ramps it (FitConfig.noise_ramp)
        self.full_width_choice: Optional[str] = None  # fit's choice for INRConfig(full_width="best")
        self.trained_calibrated = False  # fit trained the narrower widths calibrated (FitConfig.train_calibrated)
        self.detail: Optional[nn.ParameterList] = None
        self.grid: Optional[nn.ParameterList] = None
        if inr.detail:  # full width is the reference exactly from the start (and again after the pre-fit)
            self.detail = nn.ParameterList([nn.Parameter(torch.zeros_like(r)) for r in self.original_rows()])
            self.anchor_detail()
        if inr.grid:  # [C_out, C_in (1 for a bias), elements] at full width, in weight units; zero: the INR alone
            self.grid = self._zero_grid()

    def _zero_grid(self) -> nn.ParameterList:
        """A grid (``INRConfig.grid``) of zeros: one table per tensor, [C_out, C_in (1 for a bias),
        elements] at full width."""
        shapes = [(c_out, 1 if s.bias else c_in, s.elements)
                  for s in self.specs for c_in, c_out in [self.space.layer_channels(s.layer, self.space.full)]]
        return nn.ParameterList([nn.Parameter(torch.zeros(shape)) for shape in shapes])

    @torch.no_grad()
    def add_range_grid(self) -> None:
        """Give a fitted manifold a grid that serves its trained range only (``INRConfig(grid=True,
        grid_range=True)``), set so that its full width at the centres is the reference network.
        Below the range every network stays the INR's as fitted; ``FitConfig.refine_steps`` then
        trains the grid alone on the trained widths (``neumeta.refine``)."""
        if self.grid is not None:
            raise ValueError("add_range_grid: this manifold has a grid already")
        if self.detail is not None or self.inr_config.residual != "none":
            raise ValueError("add_range_grid: a grid holds plain weights beside the INR, as the detail table and "
                             "the residual INRs do: this manifold has one of those")
        self.inr_config = replace(self.inr_config, grid=True, grid_range=True)
        self.grid = self._zero_grid().to(self.device)
        self.anchor_grid()

    @contextmanager
    def without_grid(self) -> Iterator["WeightManifold"]:
        """The manifold as if it had no grid, the INR alone everywhere (restored on exit): how ``fit``
        validates the INR of a grid alone in the range (``INRConfig.grid_alone``) as the default's."""
        grid, self.grid = self.grid, None
        try:
            yield self
        finally:
            self.grid = grid

    @property
    def grid_alone(self) -> bool:
        """The trained range is the grid alone (``INRConfig.grid_alone``)."""
        return self.grid is not None and self.inr_config.grid_alone

    @property
    def grid_range(self) -> bool:
        """The grid serves the trained range only (``INRConfig.grid_range``)."""
        return self.grid is not None and self.inr_config.grid_range

    @property
    def full_width_source(self) -> str:
        """What sampling gives at full width: "reference" or "inr" (``INRConfig.full_width``; with
        "best", ``fit``'s choice on validation, ``full_width_choice``, else the reference)."""
        if self.inr_config.full_width != "best":
            return self.inr_config.full_width
        return self.full_width_choice or "reference"

    @property
    def noise_counts(self) -> Optional[Dict[str, int]]:
        """The narrowest channel counts training drew (``fit`` sets them; saved with the manifold).

        A narrower network's coordinate noise, in training and in ``expected_parameters``, is no
        wider than a cell at these counts: the INR was never asked to be smooth over a wider
        window, and averaging it over the whole of a wide unseen cell blurs several trained
        channels into one (measured: several points lower at the unseen 25 % width of LeNet).
        ``None``: always a whole cell of the network's own width.
        """
        return self._noise_counts

    @noise_counts.setter
    def noise_counts(self, counts: Optional[Mapping[str, int]]):
        if counts is not None:
            unknown = set(counts) - set(self.space.groups)
            if unknown:
                raise ValueError(f"noise_counts names unknown channel group(s) {sorted(unknown)}; groups: "
                                 f"{list(self.space.groups)}")
            counts = {name: int(counts.get(name, size)) for name, size in self.space.full.items()}
        self._noise_counts = counts
        self._coord_cache.clear()

    # ----------------------------------------------------------------- helpers
    def _apply(self, fn, *args, **kwargs):
        """Keep the reference network on the same device/dtype as the INR."""
        self.space.model._apply(fn, *args, **kwargs)
        self._coord_cache.clear()
        self._base_cache.clear()
        self._detail_maps.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.output_scale.device

    def original_parameters(self) -> Dict[str, torch.Tensor]:
        """The reference (folded, possibly permuted) weights the manifold reconstructs at full width."""
        state = dict(self.space.model.named_parameters())
        return {s.name: state[s.name] for s in self.specs}

    def _coordinates(self, counts: Mapping[str, int]):
        def build():
            tables = []
            for s in self.specs:
                coords, noise = tensor_coordinates(self.space, s.layer, counts, s.bias, self.coord_config,
                                                   self._noise_counts)
                tables.append((coords.to(self.device), noise.to(self.device)))
            return tables
        return _per_width(self._coord_cache, counts, build)

    def _base_rows(self, counts: Mapping[str, int]) -> List[torch.Tensor]:
        """The reference weights resampled to ``counts``, row layout (what a residual INR corrects)."""
        return _per_width(self._base_cache, counts, lambda: [
            resampled_rows(s.layer, rows, counts, s.bias, self.inr_config.residual)
            for s, rows in zip(self.specs, self.original_rows())])

    def _rows_to_tensor(self, s: TensorSpec, rows: torch.Tensor, counts: Mapping[str, int]) -> torch.Tensor:
        c_in, c_out = self.space.layer_channels(s.layer, counts)
        if s.bias:
            return rows.reshape(c_out * s.out_repeat)
        kernel = s.layer.kernel
        w = rows.reshape((c_out, c_in, s.out_repeat, s.in_repeat) + kernel)
        w = w.transpose(1, 2).reshape((c_out * s.out_repeat, c_in * s.in_repeat) + kernel)
        return w.transpose(0, 1) if s.layer.kind == "conv_transpose" else w

    # ----------------------------------------------------------------- generation
    def _tensor_to_rows(self, s: TensorSpec, w: torch.Tensor, counts: Mapping[str, int]) -> torch.Tensor:
        """Inverse of ``_rows_to_tensor``: a parameter tensor as [rows, elements]."""
        c_in, c_out = self.space.layer_channels(s.layer, counts)
        if s.bias:
            return w.reshape(c_out, s.out_repeat)
        if s.layer.kind == "conv_transpose":
            w = w.transpose(0, 1)
        kernel = s.layer.kernel
        w = w.reshape((c_out, s.out_repeat, c_in, s.in_repeat) + kernel).transpose(1, 2)
        return w.reshape(c_out * c_in, s.elements)

    def original_rows(self) -> List[torch.Tensor]:
        """The reference weights in row layout, one [rows, elements] tensor per generated tensor."""
        original, full = self.original_parameters(), self.space.full
        return [self._tensor_to_rows(s, original[s.name].detach(), full) for s in self.specs]

    def row_values(self, counts: Mapping[str, int], noise: bool = False,
                   generator: Optional[torch.Generator] = None,
                   rows: Optional[Sequence[torch.Tensor]] = None, detail: bool = True,
                   grad_tensors: Optional[AbstractSet[int]] = None, grid: bool = True) -> List[torch.Tensor]:
        """The INR's values for every tensor at ``counts`` as [rows, elements] (or only ``rows[i]``).

        With ``noise``, every continuous coordinate is jittered by U(-a, a) (cross-model
        smoothness); the layer label never is, and rows always go to their own tensor's block.
        ``detail=False`` leaves the detail table out (``INRConfig.detail``), ``grid=False`` the
        grid (``INRConfig.grid``): the INR alone. With ``INRConfig.grid_range`` the grid is read at
        the centres, whatever ``noise``.
        ``grad_tensors``: indices into ``specs`` whose INR blocks run with autograd; the others
        run under ``no_grad`` (same values, same noise draw, no backward): ``fit``'s
        ``tensor_subset``. None: all of them.
        """
        tables = self._coordinates(counts)
        if self.grid_alone and grid:
            return self._grid_alone_values(tables, counts, rows)
        feats, reads = [], []
        for i, (coords, scale) in enumerate(tables):
            if rows is not None:
                coords = coords[rows[i]]
            centres = coords
            if noise and self.coord_config.noise > 0 and self.noise_fraction > 0:
                coords = coords + (2 * self._uniform(coords, generator) - 1) * (scale * self.noise_fraction)
            feats.append(self.fourier(coords, self.specs[i].block))
            if self.grid is not None and grid:
                reads.append(self.grid_values(i, centres if self.inr_config.grid_range else coords))
        values = self._finish(self._inr_outputs(feats, grad_tensors), counts, rows, reads or None)
        return self.with_detail(values, counts, rows) if detail else values

    def _grid_alone_values(self, tables, counts: Mapping[str, int],
                           rows: Optional[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        """Row values of the grid alone at the centres (``INRConfig.grid_alone``): no INR evaluated."""
        return [self._per_fan_in(self.specs[i], self.grid_values(i, coords if rows is None else coords[rows[i]]),
                                 counts) for i, (coords, _) in enumerate(tables)]

    def _per_fan_in(self, spec, value: torch.Tensor, counts: Mapping[str, int]) -> torch.Tensor:
        """A weight's row value divided by its fan-in channels at ``counts`` (the INR and the grid hold
        weights times the fan-in, so a narrower width's weights grow as its inputs fall); a bias as it is."""
        return value if spec.bias else value / self.space.layer_channels(spec.layer, counts)[0]

    def grid_values(self, i: int, coords: torch.Tensor) -> torch.Tensor:
        """Tensor ``i``'s grid (``INRConfig.grid``) at coordinate rows ``coords``: bilinear over its
        full-width (out, in) channel positions, so a channel's centre reads its own entry and a
        jittered or narrower coordinate a blend of its neighbours; a weight's value times its full
        fan-in channels, the units ``_finish`` divides by the fan-in of the width sampled."""
        table = self.grid[i]
        offset = 0.5 if self.coord_config.positions == "center" else 0.0
        o_low, o_frac, o_high = neighbours(coords[:, 2], table.shape[0], offset)
        i_low, i_frac, i_high = neighbours(coords[:, 1], table.shape[1], offset)
        value = ((table[o_low, i_low] * (1 - i_frac) + table[o_low, i_high] * i_frac) * (1 - o_frac)
                 + (table[o_high, i_low] * (1 - i_frac) + table[o_high, i_high] * i_frac) * o_frac)
        return value if self.specs[i].bias else value * table.shape[1]

    @staticmethod
    def _uniform(coords: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """U(0, 1) of ``coords``' shape: from ``generator`` (on the CPU, so a seed draws the same
        noise on every device) or the global generator."""
        u = torch.rand(coords.shape, generator=generator, device="cpu" if generator else coords.device)
        return u.to(coords.device)

    def _finish(self, outputs: Sequence[torch.Tensor], counts: Mapping[str, int],
                rows: Optional[Sequence[torch.Tensor]] = None,
                grid: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """The INR's raw outputs as row values: cropped to each tensor's kernel, scaled, plus the
        grid's values (``grid_values``), weights divided by their fan-in channels, plus the
        resampled reference of a residual INR."""
        base = self._base_rows(counts) if self.inr_config.residual != "none" else None
        values = []
        for i, (s, out) in enumerate(zip(self.specs, outputs)):
            v = out.index_select(1, getattr(self, f"crop_{s.block}")) * self.output_scale[s.block]
            if grid is not None:
                v = v + grid[i]
            v = self._per_fan_in(s, v, counts)
            if base is not None:
                v = v + (base[i] if rows is None else base[i][rows[i]])
            values.append(v)
        return values

    def _inr_outputs(self, feats: Sequence[torch.Tensor], grad_tensors: Optional[AbstractSet[int]]) -> List[torch.Tensor]:
        """Each tensor's features through its block; those outside ``grad_tensors`` without autograd."""
        batched = self.batched if self.batched is not None else self.device.type == "cuda"
        blocks = [s.block for s in self.specs]
        if grad_tensors is None:
            return self._run_inr(feats, blocks, batched)
        outputs: List[Optional[torch.Tensor]] = [None] * len(feats)
        for tracked in (False, True):
            chosen = [i for i in range(len(feats)) if (i in grad_tensors) == tracked]
            if not chosen:
                continue
            with torch.set_grad_enabled(tracked and torch.is_grad_enabled()):
                for i, out in zip(chosen, self._run_inr([feats[i] for i in chosen], [blocks[i] for i in chosen],
                                                        batched)):
                    outputs[i] = out
        return outputs

    def _run_inr(self, feats: Sequence[torch.Tensor], blocks: Sequence[int], batched: bool) -> List[torch.Tensor]:
        """The blocks' MLPs, their matmuls in ``INRConfig.precision``; the values come back float32."""
        dtype = PRECISIONS[self.inr_config.precision]
        if dtype == torch.float32:
            return self.inr(feats, blocks, batched=batched)
        with torch.autocast(self.device.type, dtype=dtype):
            outputs = self.inr(feats, blocks, batched=batched)
        return [out.float() for out in outputs]

    # ----------------------------------------------------------------- the detail table
    def detail_gate(self, spec: TensorSpec, counts: Mapping[str, int]) -> float:
        """How much of the detail table a tensor gets at ``counts``: 1 in and above the trained
        range (``noise_counts``, the narrowest widths ``fit`` trained; everywhere before a fit),
        falling linearly to 0 over ``detail_fade`` of width below it, per channel group the
        tensor touches. Continuous in the width, so the manifold stays one."""
        if self._noise_counts is None:
            return 1.0
        fade = self.inr_config.detail_fade
        gate = 1.0  # a bias follows its layer's weight (a classifier's bias too, though its size is fixed)
        for group in {seg.group for seg in (*spec.layer.out, *spec.layer.inp) if seg.group is not None}:
            full = self.space.full[group]
            trained = self._noise_counts[group] / full
            gate *= min(1.0, max(0.0, (counts[group] / full - (trained - fade)) / fade))
        return gate

    def with_detail(self, values: Sequence[torch.Tensor], counts: Mapping[str, int],
                    rows: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """INR row values at ``counts`` plus the detail table resampled there (cell overlaps),
        times its gate; the values themselves where there is no table."""
        if self.detail is None:
            return list(values)
        maps = _per_width(self._detail_maps, counts,
                          lambda: [resampling(s.layer, counts, s.bias, "area") for s in self.specs])
        out = []
        for i, (s, v) in enumerate(zip(self.specs, values)):
            gate = self.detail_gate(s, counts)
            if gate > 0:
                d = apply_resampling(maps[i], self.detail[i])
                v = v + gate * (d if rows is None else d[rows[i]])
            out.append(v)
        return out

    @torch.no_grad()
    def anchor_detail(self, samples: int = 50, seed: int = 0) -> None:
        """Set the detail table to the reference minus the INR's full width averaged over the
        noisy draws ``sample(1.0, samples, seed)`` takes: that full width is then the reference
        network exactly (to float rounding). ``fit`` calls it when the pre-fit ends."""
        if self.detail is None:
            raise ValueError("anchor_detail: this manifold has no detail table (INRConfig(detail=True))")
        mean = self.mean_row_values(self.space.full, samples, seed, detail=False)
        for table, reference, inr in zip(self.detail, self.original_rows(), mean):
            table.copy_(reference - inr)

    @torch.no_grad()
    def mean_row_values(self, counts: Mapping[str, int], samples: int = 50, seed: int = 0,
                        detail: bool = True, batch_rows: Optional[int] = None, grid: bool = True) -> List[torch.Tensor]:
        """``row_values`` at ``counts`` averaged over ``samples`` noisy coordinate draws from
        ``seed`` (Eq. 9 of the paper; the noise-free centres where there is one draw or no noise).

        With ``batch_rows`` the draws go through the INR together, as many per call as keep each
        tensor's stacked rows within it (a few large matmuls instead of K small ones: fewer
        launches on a GPU); 0 runs them one by one. Default: 2**17 on a GPU, 0 on a CPU, where
        stacking measured from 1.9x faster to 2x slower with the load. Either way the noise is
        the same, drawn in ``row_values``' order. ``grid=False``: the INR alone, as in ``row_values``."""
        if self.grid_range and grid:
            return self._grid_range_values(counts, samples, seed, batch_rows)
        if samples == 1 or self.coord_config.noise == 0:
            return self.row_values(counts, noise=False, detail=detail, grid=grid)
        if batch_rows is None:
            batch_rows = 1 << 17 if self.device.type == "cuda" else 0
        gen = torch.Generator().manual_seed(seed)
        tables = self._coordinates(counts)
        largest = max(coords.shape[0] for coords, _ in tables)
        per_call = max(1, min(samples, batch_rows // largest)) if batch_rows > 0 else 1
        total, grid_sum = None, None
        for start in range(0, samples, per_call):
            draws = min(per_call, samples - start)
            noise = [[self._uniform(coords, gen) for coords, _ in tables] for _ in range(draws)]
            jittered = [torch.cat([coords + (2 * noise[d][i] - 1) * scale for d in range(draws)])
                        for i, (coords, scale) in enumerate(tables)]
            feats = [self.fourier(c, self.specs[i].block) for i, c in enumerate(jittered)]
            outputs = [out.reshape(draws, -1, out.shape[-1]).sum(0) for out in self._inr_outputs(feats, None)]
            total = outputs if total is None else [a + b for a, b in zip(total, outputs)]
            if self.grid is not None and grid:
                reads = [self.grid_values(i, c).reshape(draws, -1, self.grid[i].shape[-1]).sum(0)
                         for i, c in enumerate(jittered)]
                grid_sum = reads if grid_sum is None else [a + b for a, b in zip(grid_sum, reads)]
        # every step after the INR is linear, and a residual's reference is the same in every draw:
        # finishing the mean once is finishing each draw and averaging
        values = self._finish([t / samples for t in total], counts,
                              grid=None if grid_sum is None else [g / samples for g in grid_sum])
        return self.with_detail(values, counts) if detail else values

    def _grid_range_values(self, counts: Mapping[str, int], samples: int, seed: int,
                           batch_rows: Optional[int]) -> List[torch.Tensor]:
        """``mean_row_values`` with ``INRConfig.grid_range``: in the trained range the INR and the grid
        at the centres, below it the INR alone averaged over the noisy draws, in the fade between the
        two blended by ``detail_gate`` (continuous in the width)."""
        gates = [self.detail_gate(s, counts) for s in self.specs]
        centred = self.row_values(counts, noise=False)
        if min(gates) == 1.0:
            return centred
        alone = self.mean_row_values(counts, samples, seed, batch_rows=batch_rows, grid=False)
        return [g * c + (1 - g) * a for g, c, a in zip(gates, centred, alone)]

    @torch.no_grad()
    def anchor_grid(self) -> None:
        """Set the grid so that the noise-free full width (the INR and the grid at the centres, or the
        grid alone with ``INRConfig.grid_alone``) is the reference network exactly (to float rounding).
        ``fit`` calls it when the pre-fit ends, with ``INRConfig.grid_range``."""
        if self.grid is None:
            raise ValueError("anchor_grid: this manifold has no grid (INRConfig(grid=True))")
        now = self.row_values(self.space.full, noise=False)
        for table, reference, value in zip(self.grid, self.original_rows(), now):
            table.add_((reference - value).reshape(table.shape))

    def generate(self, width: Width = 1.0, noise: bool = False,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Differentiable parameters of the network at ``width`` (name -> tensor)."""
        counts = width if _is_counts(width, self.space) else self.space.resolve(width)
        return self.params_from_rows(self.row_values(counts, noise, generator), counts)

    def params_from_rows(self, values: Sequence[torch.Tensor], counts: Mapping[str, int]) -> Dict[str, torch.Tensor]:
        """``row_values`` output at ``counts`` as parameter tensors (name -> tensor)."""
        return {s.name: self._rows_to_tensor(s, v, counts) for s, v in zip(self.specs, values)}

    @torch.no_grad()
    def expected_parameters(self, width: Width, samples: int = 50, seed: int = 0,
                            full_width: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Weights averaged over ``samples`` noisy coordinate draws (Eq. 9 of the paper); at full
        width the reference network's own weights where ``full_width`` (default: this manifold's
        ``full_width_source``) is "reference"."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, not {samples}")
        counts = self.space.resolve(width) if not _is_counts(width, self.space) else width
        if (full_width or self.full_width_source) == "reference" and dict(counts) == dict(self.space.full):
            return {name: w.detach().clone() for name, w in self.original_parameters().items()}
        return self.params_from_rows(self.mean_row_values(counts, samples, seed), counts)

    @torch.no_grad()
    def calibration_reference(self, batches, samples: int = 50, seed: int = 0, num_batches: int = 20) -> Reference:
        """The full width (sampled like ``sample(1.0, samples, seed)``) measured on the first
        ``num_batches`` of ``batches``: ``sample(width, calibration=reference)`` for any width."""
        # the INR's own full width, also where sampling gives the reference there: narrower widths are
        # the INR's, and it is the INR's statistics they are corrected to (the reference's measured
        # 2-3 points worse at every calibrated width of LeNet)
        reference = measure_reference(self.sample(self.space.full, samples, seed, full_width="inr"), self.space,
                                      batches, num_batches)
        if self.grid_range:  # below the range the networks are the INR alone's: so is their reference
            alone = self._module(self.space.full, self.params_from_rows(
                self.mean_row_values(self.space.full, samples, seed, grid=False), self.space.full))
            reference.below = measure_reference(alone, self.space, reference.inputs, len(reference.inputs))
        return reference

    @torch.no_grad()
    def sample(self, width: Width = 1.0, samples: int = 50, seed: int = 0, calibration=None,
               calibration_batches: int = 20, full_width: Optional[str] = None) -> nn.Module:
        """A standalone network at ``width``: a multiplier of every morphable group (1.0 = full),
        or ``{group: channels (int) or multiplier (float)}``. Widths above 1.0 extrapolate.

        ``calibration``: unlabelled input batches (e.g. the training loader); the first
        ``calibration_batches`` of them give every morphed layer the full width's activation
        statistics (``neumeta.calibrate``): a no-op at full width and in the range of a grid
        alone (``INRConfig.grid_alone``, sampled as it trained), several points at unseen narrower
        widths. Sampling several widths, pass ``calibration_reference(batches, samples,
        seed)`` instead: the full width is then sampled and measured once.

        ``full_width``: "reference" or "inr", what full width is (default: ``full_width_source``);
        the reference network is returned as it is, never calibrated.
        """
        counts = self.space.resolve(width)
        source = full_width or self.full_width_source
        if self.space.is_extrapolation(counts):
            warnings.warn(f"width {width} is wider than the trained network: extrapolating outside the "
                          f"trained range", stacklevel=2)
        if calibration is not None and not (source == "reference" and dict(counts) == dict(self.space.full)):
            if not isinstance(calibration, Reference):
                calibration = self.calibration_reference(calibration, samples, seed, calibration_batches)
            module = self._build(counts, samples, seed, source)
            if self.grid_range:  # the grid's full width in the range, the INR alone's below it, blended between
                gates = [self.detail_gate(s, counts) for s in self.specs]
                if self.grid_alone and min(gates) == 1.0:
                    # the grid alone's range is sampled as it trained, uncalibrated (on LeNet calibration
                    # cost it 0.5-0.8 validation points there; docs/recipe.md)
                    return module
                calibration = calibration.blended(sum(gates) / len(gates))
            module.neumeta_calibration = calibrate(module, calibration, self.space, counts,
                                                   positions=self.coord_config.positions)
            return module
        if self.trained_calibrated and dict(counts) != dict(self.space.full):
            warnings.warn(f"width {width}: this manifold's narrower widths were trained calibrated "
                          "(FitConfig.train_calibrated); sampled without calibration they are not the networks it "
                          "learned: pass calibration= (a few training batches)", UncalibratedWarning, stacklevel=2)
        return self._build(counts, samples, seed, source)

    def _build(self, counts: Mapping[str, int], samples: int, seed: int, source: str) -> nn.Module:
        """The module at ``counts`` with the expected weights, uncalibrated."""
        return self._module(counts, self.expected_parameters(counts, samples=samples, seed=seed, full_width=source))

    def _module(self, counts: Mapping[str, int], params: Mapping[str, torch.Tensor]) -> nn.Module:
        """A standalone module at ``counts`` holding ``params``."""
        module = self.space.build(counts)
        for name, value in params.items():
            mname, pname = name.rsplit(".", 1)
            getattr(module.get_submodule(mname), pname).copy_(value)
        # every channel group of the architecture, the ones not morphed at the reference's size,
        # so save_model can rebuild a custom-width base model restricted to a few groups
        module.neumeta_widths = {**{g: c.size for g, c in self.space.all_groups.items()}, **counts}
        return module.to(self.device)

    def save(self, path, extra: Optional[dict] = None):
        """Write the manifold (INR + reference network + metadata) to one safetensors file."""
        from .io import save_manifold
        return save_manifold(self, path, extra)


class UncalibratedWarning(UserWarning):
    """A manifold trained calibrated (``FitConfig.train_calibrated``) sampled without calibration."""


def _per_width(cache: Dict[tuple, list], counts: Mapping[str, int], build) -> list:
    """``cache``'s entry for the channel counts ``counts``, built by ``build()`` the first time;
    the cache is emptied past 64 widths (a fit draws a new one every step)."""
    key = tuple(sorted(counts.items()))
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = build()
    return cache[key]


def _is_counts(width, space: WidthSpace) -> bool:
    """True when ``width`` is already a full, resolved ``{group: int}`` dict."""
    return isinstance(width, Mapping) and set(width) == set(space.groups) and \
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in width.values())
