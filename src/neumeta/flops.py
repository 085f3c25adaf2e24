"""Cost of a network: parameters and floating-point operations of one forward pass.

FLOPs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products and convolutions, 2 FLOPs per multiply-add; element-wise ops, pooling and
normalisation are not counted), so a narrower sampled network's saving is measured, not
estimated from channel counts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_input) -> int:
    """FLOPs of one forward pass of ``model`` (eval mode) on ``example_input`` (a tensor or tuple).

    The count covers the whole batch of ``example_input``; pass a batch of one for per-sample FLOPs.
    """
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
