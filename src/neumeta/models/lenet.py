"""LeNet-5 style classifier: two convolutions, three linear layers.

The hidden widths are constructor arguments named after the layer that produces them
(``conv1``, ``conv2``, ``fc1``, ``fc2``), which are also the names of its channel groups, so
``create_model("lenet", **sampled_widths)`` rebuilds a sampled network's skeleton.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 conv1: int = 16, conv2: int = 32, fc1: int = 128, fc2: int = 64):
        super().__init__()
        for name, width in dict(conv1=conv1, conv2=conv2, fc1=fc1, fc2=fc2).items():
            if int(width) < 1:
                raise ValueError(f"lenet: width {name}={width} must be at least 1")
        self.conv1 = nn.Conv2d(in_channels, conv1, kernel_size=5)
        self.conv2 = nn.Conv2d(conv1, conv2, kernel_size=5)
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, two 2x2 pools
        if side < 1:
            raise ValueError(f"lenet: image_size={image_size} is too small (need at least 16)")
        self.fc1 = nn.Linear(conv2 * side * side, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@register_model
def lenet(**kwargs) -> nn.Module:
    """LeNet-5 style: conv(5x5) -> pool -> conv(5x5) -> pool -> 3 linear. Default widths 16/32/128/64."""
    return LeNet(**kwargs)
