"""The reference weights resampled to any width: what a residual INR corrects.

With ``INRConfig(residual="cells")`` the manifold's weights are ``resample(W0, width) + INR(coords)``.
``resample`` is the identity at full width, so there the INR only has to output zero (and starts
at zero), and the network the manifold was built from comes back exactly. At a narrower width
each channel stands for the full channels of its cell, as the coordinates already say (channel
``j`` of ``C`` sits at ``(j + 1/2)/C``): its outgoing weights are their mean, and a consumer's
weights on it are their sum, so a cell of similar channels (what smoothing makes neighbours)
keeps its pre-activations. At a wider width (extrapolation) each channel copies the full channel
at its coordinate and consumers share that channel's weight among its copies.
``residual="linear"`` interpolates at the channel centres instead (inputs scaled by C/c, the
quadrature weight), which moves continuously with the width where cells jump; ``"area"``
weighs every full channel by the length its cell shares with the narrower cell: continuous, and
no full channel is skipped however narrow the width.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .groups import MorphLayer, Segment


def membership(count: int, full: int) -> torch.Tensor:
    """[count, full] 0/1: which full-width channels each of ``count`` channels stands for."""
    if count <= full:  # narrower: full channel j falls in the cell of its centre
        cell = ((torch.arange(full, dtype=torch.float64) + 0.5) * count / full).long().clamp(max=count - 1)
        rows, cols = cell, torch.arange(full)
    else:  # wider: each channel copies the full channel at its centre
        rows = torch.arange(count)
        cols = ((torch.arange(count, dtype=torch.float64) + 0.5) * full / count).long().clamp(max=full - 1)
    b = torch.zeros(count, full, dtype=torch.float64)
    b[rows, cols] = 1.0
    return b


def interpolation(count: int, full: int) -> torch.Tensor:
    """[count, full]: each of ``count`` channels as the linear interpolation of the full channels
    at its centre (rows sum to 1; the identity at ``count == full``). Unlike cell membership it
    changes continuously with the width, so the correction the INR learns can too."""
    x = ((torch.arange(count, dtype=torch.float64) + 0.5) * full / count - 0.5).clamp(0, full - 1)
    low = x.floor().long().clamp(max=full - 1)
    high = (low + 1).clamp(max=full - 1)
    frac = x - low
    m = torch.zeros(count, full, dtype=torch.float64)
    m[torch.arange(count), low] += 1 - frac
    m[torch.arange(count), high] += frac
    return m


def overlap(count: int, full: int) -> torch.Tensor:
    """[count, full]: the length each of ``count`` cells shares with each full-width cell, over
    [0, 1]. Continuous in the width, and a narrower cell takes in every full channel it covers."""
    a = torch.arange(count + 1, dtype=torch.float64) / count
    b = torch.arange(full + 1, dtype=torch.float64) / full
    return (torch.minimum(a[1:, None], b[None, 1:]) - torch.maximum(a[:-1, None], b[None, :-1])).clamp(min=0)


RESAMPLINGS = ("cells", "linear", "area")


def _dimension(segments: Sequence[Segment], counts: Mapping[str, int], outgoing: bool, how: str) -> torch.Tensor:
    """Block-diagonal [channels at counts, full channels] map of one weight dimension: the mean
    over a cell (or the interpolation) for a layer's outputs, the sum for its inputs."""
    blocks = []
    for seg in segments:
        if seg.group is None:
            blocks.append(torch.eye(seg.channels, dtype=torch.float64))
            continue
        count = counts[seg.group]
        if how == "area":  # outputs: the overlap-weighted mean; inputs: the overlap-weighted sum
            o = overlap(count, seg.channels)
            blocks.append(o * count if outgoing else o * seg.channels)
            continue
        if how == "linear":  # inputs: the same interpolation, times the quadrature weight C/c
            m = interpolation(count, seg.channels)
            blocks.append(m if outgoing else m * (seg.channels / count))
            continue
        b = membership(count, seg.channels)
        blocks.append(b / b.sum(1, keepdim=True) if outgoing else b / b.sum(0, keepdim=True))
    return torch.block_diag(*blocks)


def resampling(layer: MorphLayer, counts: Mapping[str, int], bias: bool, how: str = "cells") -> tuple:
    """The maps (outputs, inputs or None) that ``apply_resampling`` multiplies a tensor's full-width
    rows with: built once per width and reused, since only the rows change in training."""
    if how not in RESAMPLINGS:
        raise ValueError(f"resample must be one of {RESAMPLINGS}, not {how!r}")
    out = _dimension(layer.out, counts, True, how)
    if bias or layer.depthwise:  # one row per output channel (a depthwise kernel reads one input)
        return out, None
    return out, _dimension(layer.inp, counts, False, how)


def apply_resampling(maps: tuple, rows: torch.Tensor) -> torch.Tensor:
    """Full-width rows ``[C_out * C_in, elements]`` (a bias: ``[C_out, elements]``) at the width
    of ``maps`` (``resampling``)."""
    out, inp = maps
    out = out.to(rows)
    if inp is None:
        return out @ rows
    inp = inp.to(rows)
    c_out, c_in = out.shape[1], inp.shape[1]
    w = rows.reshape(c_out, c_in, -1)
    return torch.einsum("oj,ik,jke->oie", out, inp, w).reshape(out.shape[0] * inp.shape[0], -1)


def resampled_rows(layer: MorphLayer, rows: torch.Tensor, counts: Mapping[str, int], bias: bool,
                   how: str = "cells") -> torch.Tensor:
    """Full-width rows ``[C_out * C_in, elements]`` of one tensor (a bias: ``[C_out, elements]``)
    as rows at ``counts``: the outputs averaged over their cell, the inputs summed (``how="cells"``),
    or both linearly interpolated at the channel centres (``"linear"``), or weighted by cell
    overlap (``"area"``)."""
    return apply_resampling(resampling(layer, counts, bias, how), rows)
