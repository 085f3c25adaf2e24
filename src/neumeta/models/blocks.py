"""Residual building blocks shared by the ResNet-style models (CIFAR, ImageNet, U-Net encoder).

Shortcuts that change width or resolution are 1x1 conv + BN: ordinary layers the dependency
graph sees, so the residual stream couples every block of a stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv + BN where the block changes width or resolution."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``inner`` is the width between them (its own channel group)."""

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))
