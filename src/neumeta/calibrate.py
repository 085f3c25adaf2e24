"""Statistics calibration of a sampled network: its activations get the full width's statistics.

A narrower network sampled from the manifold reads the weight function at fewer, coarser points:
one channel of a 25 % network stands for the four full-width channels of its cell. When those
channels differ, the coarse network's pre-activations come out with other means and spreads than
the full network's (the variance collapse seen when averaging dissimilar neurons, as in REPAIR,
Jordan et al. 2022). Calibration restores them: layer by layer in forward order, every output
channel of a morphed layer gets an affine correction ``z' = a (z - mu) + mu_target`` folded into
its weight and bias, where ``mu, sigma`` are the channel's statistics on a few unlabelled input
batches and ``mu_target, sigma_target`` the mean statistics of the full-width channels whose
coordinates fall in its cell (``a = sigma_target / sigma``). No labels and no gradient step: it
is the BatchNorm re-calibration slimmable networks do per width, for networks without BatchNorm.

Layers with fixed outputs fed by morphed channels (a classifier) are corrected channel to channel.
At full width every cell holds its own channel and the correction is the identity. Measured on
LeNet / Fashion-MNIST (the recipe benchmark's three default fits, validation split): +1.2 to +4.9
points at the unseen 25 % width, within ±0.4 at the trained widths.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .groups import MorphLayer, WidthSpace


@dataclass
class CalibrationReport:
    layers: List[str] = field(default_factory=list)   # corrected layers, in forward order
    batches: int = 0
    max_scale: float = 1.0   # the largest |log| deviation of a channel's scale, as the scale itself
    skipped: List[str] = field(default_factory=list)  # morphed layers not corrected, and why


@dataclass
class Reference:
    """The full-width network's per-channel statistics on fixed calibration inputs: measured once,
    it calibrates any number of widths (``WeightManifold.calibration_reference``)."""
    inputs: List[torch.Tensor]
    statistics: Dict[str, tuple]  # layer name -> (mean, std) per output channel
    # a manifold whose grid serves the trained range only (INRConfig.grid_range): the INR alone's full
    # width on the same inputs, which the widths below the range are the networks of
    below: Optional["Reference"] = None

    def blended(self, weight: float) -> "Reference":
        """These statistics times ``weight`` plus ``below``'s times ``1 - weight``: the reference of a
        network in the fade between the two (``weight`` 1: these, 0: ``below``'s)."""
        if self.below is None or weight >= 1.0:
            return self
        if weight <= 0.0:
            return self.below
        mix = {name: tuple(weight * a + (1 - weight) * b for a, b in zip(stats, self.below.statistics[name]))
               for name, stats in self.statistics.items()}
        return Reference(self.inputs, mix)


def measure_reference(full: nn.Module, space: WidthSpace, batches: Iterable, num_batches: int = 20) -> Reference:
    """``full``'s statistics at every calibratable layer on the first ``num_batches`` of ``batches``."""
    inputs = _inputs(batches, num_batches)
    return Reference(inputs, channel_statistics(full, [layer.name for layer in calibratable(space)], inputs))


def _inputs(batches: Iterable, limit: int) -> List[torch.Tensor]:
    """The first ``limit`` input tensors of ``batches`` (a batch may be a tuple: input first)."""
    out = []
    for batch in batches:
        if len(out) >= limit:
            break
        out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    if not out:
        raise ValueError("calibration needs at least one batch of inputs; got an empty iterable")
    return out


DEFAULT_BATCHES = 20  # of 128 training images: the recipe benchmark's setting


def calibration_inputs(loader, num_batches: int = 20) -> List[torch.Tensor]:
    """The first ``num_batches`` inputs of ``loader`` in its epoch 0 order, whatever epoch training
    left it at (a loader with ``set_epoch``), so a calibration is the same after any history."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    return _inputs(loader, num_batches)


def calibratable(space: WidthSpace) -> List[MorphLayer]:
    """Generated conv/linear layers whose output channels are one segment, in forward order: the
    morphed ones (cells of the full width) and the fixed outputs fed by a morphed group, e.g. the
    classifier (channel to channel). Chosen on validation: the classifier's correction added
    +0.7 points at the unseen 25 % width and +3.6 at 12.5 % (LeNet, 3 seeds), -0.1 at 75 %."""
    return [layer for layer in sorted(space.layers, key=lambda l: l.index)
            if layer.morphs and layer.kind in ("conv", "linear") and not layer.depthwise and len(layer.out) == 1
            and layer.out[0].repeat == 1]


def _channel_dims(output: torch.Tensor) -> list:
    """Every dimension of a layer's output but the channels' (1): batch and spatial ones."""
    return [0] + list(range(2, output.dim()))


def _out_channels(layer: MorphLayer, counts: Mapping[str, int]) -> int:
    """``layer``'s output channels in the network sampled at ``counts`` (a fixed segment keeps its own)."""
    group = layer.out[0].group
    return counts[group] if group is not None else layer.out[0].channels


@torch.no_grad()
def channel_statistics(net: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]
                       ) -> Dict[str, tuple]:
    """Per output channel (mean, std) of each named module's output over ``inputs``."""
    sums: Dict[str, list] = {n: [0.0, 0.0, 0] for n in names}
    hooks = []
    for name in names:
        def record(_module, _args, output, name=name):
            dims = _channel_dims(output)
            entry = sums[name]
            entry[0] = entry[0] + output.double().mean(dims)
            entry[1] = entry[1] + output.double().pow(2).mean(dims)
            entry[2] += 1
        hooks.append(net.get_submodule(name).register_forward_hook(record))
    try:
        device = next(net.parameters()).device
        for x in inputs:
            net(x.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    stats = {}
    for name, (first, second, n) in sums.items():
        mean = first / n
        stats[name] = (mean, (second / n - mean.pow(2)).clamp_min(0).sqrt())
    return stats


def cell_targets(values: torch.Tensor, count: int, positions: str = "center") -> torch.Tensor:
    """Full-width channel values pooled into ``count`` cells: the mean over the full channels whose
    coordinate lies in each cell (narrower), or the full channel at each cell's coordinate (wider).
    ``positions`` as in ``CoordConfig``: channel j of C sits at (j + 1/2)/C ("center") or j/C ("index")."""
    if positions not in ("center", "index"):
        raise ValueError(f"positions must be 'center' or 'index', not {positions!r}")
    full = values.numel()
    offset = 0.5 if positions == "center" else 0.0
    # on the values' own device: a fit calls this every step (train_calibrated), so no round trip to the host
    index = torch.arange(max(count, full), dtype=torch.float64, device=values.device)
    if count >= full:
        return values[((index[:count] + offset) * full / count).long().clamp(max=full - 1)]
    cell = ((index + offset) * count / full).long().clamp(max=count - 1)
    total = torch.zeros(count, dtype=values.dtype, device=values.device).index_add_(0, cell, values)
    return total / torch.bincount(cell, minlength=count).to(values.dtype)


@torch.no_grad()
def calibrate(net: nn.Module, reference: Union[nn.Module, Reference], space: WidthSpace, counts: Mapping[str, int],
              batches: Optional[Iterable] = None, num_batches: int = 20, positions: str = "center",
              eps: float = 1e-6) -> CalibrationReport:
    """Correct ``net`` (sampled at ``counts``) in place so that every morphed layer's output
    channels have the statistics of ``reference``'s (the full-width network) channels of their cell.

    ``reference``: the full-width network, or its ``Reference`` (statistics already measured, on its
    own inputs; ``batches`` is then not used). ``batches``: unlabelled inputs (e.g. the training
    loader; only the first element of a batch is used), ``num_batches`` of them. Layers are
    corrected in forward order, each measured with the earlier corrections in place. ``positions``: the manifold's channel coordinates, which decide
    which full-width channels share a cell.
    """
    if not isinstance(reference, Reference):
        if batches is None:
            raise ValueError("calibrate: pass the calibration batches, or a Reference that holds them")
        reference = measure_reference(reference, space, batches, num_batches)
    inputs, targets = reference.inputs, reference.statistics
    layers = calibratable(space)
    report = CalibrationReport(batches=len(inputs))
    report.skipped = [f"{l.name} (its output channels are not one conv/linear segment)" for l in space.layers
                      if l.morphs and l not in layers]
    for layer in layers:
        count = _out_channels(layer, counts)
        module = net.get_submodule(layer.name)
        if module.weight.shape[0] != count:
            raise ValueError(f"calibrate: layer {layer.name} has {module.weight.shape[0]} output channels, but "
                             f"counts[{layer.out[0].group!r}] = {count}; pass the counts the network was sampled at")
        mean_target, std_target = (cell_targets(t, count, positions) for t in targets[layer.name])
        mean, std = channel_statistics(net, [layer.name], inputs)[layer.name]
        # a dead channel (no spread) keeps its scale; only its mean moves
        scale = torch.where(std > eps, std_target / std.clamp_min(eps), torch.ones_like(std))
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(scale.view(shape).to(module.weight.dtype))
        bias = module.bias if module.bias is not None else torch.zeros_like(mean)
        new_bias = (scale * (bias.double() - mean) + mean_target).to(module.weight.dtype)
        if module.bias is None:
            module.bias = nn.Parameter(new_bias)
        else:
            module.bias.copy_(new_bias)
        report.layers.append(layer.name)
        deviation = scale.clamp_min(eps).log().abs().max().exp().item()
        report.max_scale = max(report.max_scale, deviation)
    return report


# --- the same correction during training -------------------------------------------------------
# ``fit(config=FitConfig(train_calibrated=True))`` trains every narrower width as calibrated
# sampling will give it: inside ``normalized_to`` each calibratable layer's output is normalised
# per batch and given the full width's statistics of its cell (measured on the same batch by
# ``recorded_statistics`` around the full-width forward), as BatchNorm in train mode would with
# the full width's statistics for affine parameters. Gradients flow through the batch's own
# statistics (as in BatchNorm), not through the full width's (a teacher, detached).

TRAIN_EPS = 1e-5  # added to the batch variance, as BatchNorm does


def batch_statistics(output: torch.Tensor) -> tuple:
    """Per channel (dimension 1) mean and standard deviation (biased variance + ``TRAIN_EPS``, as
    BatchNorm normalises) over every other dimension."""
    var, mean = torch.var_mean(output, _channel_dims(output), correction=0)
    return mean, var.add(TRAIN_EPS).sqrt()


@torch.no_grad()
def teacher_statistics(output: torch.Tensor) -> tuple:
    """``batch_statistics`` of a teacher's output (no gradient), read from BatchNorm's fused kernel:
    with momentum 1 its running buffers become the batch mean and the unbiased variance, rescaled
    here to the biased one. 1.5-2.5x faster than ``torch.var_mean`` over the batch and spatial
    dimensions of ResNet-20's activations on this project's CPU (9 % of an every-layer fit step)."""
    count = output.numel() // output.shape[1]
    if count < 2:  # the kernel refuses one value per channel in train mode
        return batch_statistics(output)
    mean = output.new_zeros(output.shape[1])
    var = output.new_ones(output.shape[1])
    F.batch_norm(output, mean, var, training=True, momentum=1.0, eps=TRAIN_EPS)
    return mean, var.mul_((count - 1) / count).add_(TRAIN_EPS).sqrt_()


def normalized_output(output: torch.Tensor, mean_target: torch.Tensor, std_target: torch.Tensor) -> torch.Tensor:
    """``(output - mean) / std * std_target + mean_target`` per channel, with the batch's own
    ``batch_statistics``: BatchNorm in train mode with the targets as its affine parameters, and
    computed by its fused kernel (3x faster forward and backward than the same arithmetic in
    separate ops on this project's CPU, at ResNet-20's 128x16x32x32 activations)."""
    if output.numel() == output.shape[1]:  # one value per channel: the kernel refuses it in train mode
        flat = output.reshape(1, -1)
        mean, std = batch_statistics(flat)
        return ((flat - mean) / std * std_target + mean_target).view_as(output)
    return F.batch_norm(output, None, None, std_target.to(output.dtype), mean_target.to(output.dtype),
                        training=True, momentum=0.0, eps=TRAIN_EPS)


@contextmanager
def recorded_statistics(net: nn.Module, space: WidthSpace) -> Iterator[Dict[str, tuple]]:
    """Within the block, every forward of ``net`` (the full width) records each calibratable
    layer's per-channel (mean, std) of that batch, detached, into the yielded dict."""
    stats: Dict[str, tuple] = {}
    hooks = []
    for layer in calibratable(space):
        def record(_module, _args, output, name=layer.name):
            stats[name] = teacher_statistics(output)  # detached: a teacher's
        hooks.append(net.get_submodule(layer.name).register_forward_hook(record))
    try:
        yield stats
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def normalized_to(net: nn.Module, space: WidthSpace, counts: Mapping[str, int], targets: Mapping[str, tuple],
                  positions: str = "center") -> Iterator[None]:
    """Within the block, every forward of ``net`` (sampled at ``counts``) replaces each calibratable
    layer's output z by ``(z - mean) / std * std_target + mean_target``: its batch statistics
    replaced by ``targets``' (full-width statistics per layer, as ``recorded_statistics`` gives them)
    pooled into the cells of its channels, as ``calibrate`` does after the fact."""
    hooks = []
    for layer in calibratable(space):
        count = _out_channels(layer, counts)
        mean_target, std_target = (cell_targets(t, count, positions) for t in targets[layer.name])

        def normalize(_module, _args, output, mean_target=mean_target, std_target=std_target):
            return normalized_output(output, mean_target, std_target)
        hooks.append(net.get_submodule(layer.name).register_forward_hook(normalize))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
