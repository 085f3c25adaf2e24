"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3 stages of basic blocks, 16/32/64 channels.

Widths are constructor arguments: ``stages`` sets each stage's residual-stream width (the
stream is one channel group, shared by every block of the stage), ``inner`` optionally sets
the width inside each block (one group per block; default: the stage width). Shortcuts that
change width are 1x1 conv + BN, so every coupling is an ordinary conv the dependency graph sees.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BasicBlock
from .registry import register_model


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 stages: Sequence[int] = (16, 32, 64), inner: Optional[Sequence[int]] = None):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, ...), not {depth}")
        blocks = (depth - 2) // 6
        if len(stages) != 3 or min(stages) < 1:
            raise ValueError(f"stages must be three positive widths, not {stages}")
        inner = list(inner) if inner is not None else [w for w in stages for _ in range(blocks)]
        if len(inner) != 3 * blocks or min(inner) < 1:
            raise ValueError(f"inner must give {3 * blocks} positive widths (one per block), not {inner}")
        self.conv1 = nn.Conv2d(in_channels, stages[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0])
        layers, width, k = [], stages[0], 0
        for s, stage_width in enumerate(stages):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(width, inner[k], stage_width, 2 if (s > 0 and b == 0) else 1))
                width, k = stage_width, k + 1
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(stages[2], num_classes)

    @property
    def neumeta_paper_groups(self):
        """``WidthSpace(groups="paper")``: the paper's release morphs only the last block of layer3."""
        return [f"layer3.{len(self.layer3) - 1}.conv1"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _width_args(blocks: int):
    """Group channel counts -> ``stages`` / ``inner``: the stage streams are named after their
    first producer (``conv1``, ``layer2.0.conv2``, ``layer3.0.conv2``), the block groups after
    ``layerS.B.conv1``. Groups left out keep the default width."""
    def translate(counts):
        full = (16, 32, 64)
        stream = ("conv1", "layer2.0.conv2", "layer3.0.conv2")
        kwargs = {"stages": tuple(counts.get(g, w) for g, w in zip(stream, full))}
        kwargs["inner"] = tuple(counts.get(f"layer{s + 1}.{b}.conv1", full[s])
                                for s in range(3) for b in range(blocks))
        return kwargs
    return translate


@register_model(input_shape=(3, 32, 32), width_args=_width_args(3))
def resnet20(**kwargs) -> nn.Module:
    """ResNet-20 for 32x32 images (0.27 M parameters at full width)."""
    return CifarResNet(depth=20, **kwargs)


@register_model(input_shape=(3, 32, 32), width_args=_width_args(9))
def resnet56(**kwargs) -> nn.Module:
    """ResNet-56 for 32x32 images (0.85 M parameters at full width)."""
    return CifarResNet(depth=56, **kwargs)
