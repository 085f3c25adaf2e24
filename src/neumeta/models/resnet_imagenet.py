"""ImageNet-style ResNets (He et al. 2016): a 7x7 stride-2 stem, a max-pool, 4 stages.

``resnet18`` uses basic blocks (two 3x3 convs), ``resnet50`` bottlenecks (1x1 reduce, 3x3,
1x1 expand by 4). Every width is a constructor argument, one per channel group:

- ``stem``: the stem conv's output. With basic blocks it feeds layer1's identity shortcuts,
  so it *is* layer1's stream (``resnet18`` ties ``stem`` to ``stages[0]``).
- ``stages``: the residual stream of each stage, shared by every block of the stage.
- ``inner``: per block, the output of the block's ``conv1`` (basic: the width between its two
  convs; bottleneck: the 1x1 reduction).
- ``inner2``: bottleneck only, per block, the output of its 3x3 ``conv2``.

``base`` scales every default (64 in the paper); small values give fast test-size networks.
Pooling is adaptive, so any input of at least 32x32 works; the registry traces at 64x64.
Shortcuts that change width are 1x1 conv + BN, ordinary layers the dependency graph sees.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BasicBlock, shortcut
from .registry import register_model


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, inner: int, inner2: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner2, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(inner2)
        self.conv3 = nn.Conv2d(inner2, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _check(name: str, widths: Sequence[int], count: int, what: str) -> list:
    widths = [int(w) for w in widths]
    if len(widths) != count or min(widths) < 1:
        raise ValueError(f"{name} must give {count} positive widths ({what}), not {list(widths)}")
    return widths


class ImageNetResNet(nn.Module):
    """ResNet with ``blocks`` blocks per stage; ``bottleneck`` picks the block type."""

    def __init__(self, blocks: Sequence[int], bottleneck: bool, num_classes: int = 1000, in_channels: int = 3,
                 base: int = 64, stem: Optional[int] = None, stages: Optional[Sequence[int]] = None,
                 inner: Optional[Sequence[int]] = None, inner2: Optional[Sequence[int]] = None):
        super().__init__()
        if int(base) < 1:
            raise ValueError(f"base width must be at least 1, not {base}")
        expansion = 4 if bottleneck else 1
        planes = [base * 2 ** s for s in range(4)]
        stages = _check("stages", stages if stages is not None else [p * expansion for p in planes], 4,
                        "one per stage")
        stem = int(stem) if stem is not None else (base if bottleneck else stages[0])
        if stem < 1:
            raise ValueError(f"stem width must be at least 1, not {stem}")
        n = sum(blocks)
        default_inner = [p for p, b in zip(planes, blocks) for _ in range(b)]
        inner = _check("inner", inner if inner is not None else default_inner, n, "one per block")
        if bottleneck:
            inner2 = _check("inner2", inner2 if inner2 is not None else default_inner, n, "one per block")
        elif inner2 is not None:
            raise ValueError("inner2 is for bottleneck blocks only (resnet50); basic blocks have one inner width")

        self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        width, k, layers = stem, 0, []
        for s, (count, stage_width) in enumerate(zip(blocks, stages)):
            stage = []
            for b in range(count):
                stride = 2 if (s > 0 and b == 0) else 1
                if bottleneck:
                    stage.append(Bottleneck(width, inner[k], inner2[k], stage_width, stride))
                else:
                    stage.append(BasicBlock(width, inner[k], stage_width, stride))
                width, k = stage_width, k + 1
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(stages[3], num_classes)

    @property
    def neumeta_paper_groups(self):
        """``WidthSpace(groups="paper")``: by analogy with the CIFAR ResNets (last block of the last
        stage), the inner group(s) of the last block of layer4."""
        last = f"layer4.{len(self.layer4) - 1}"
        return [f"{last}.conv1"] + ([f"{last}.conv2"] if hasattr(self.layer4[-1], "conv3") else [])

    def features(self, x: torch.Tensor):
        """The stem's and every stage's output (strides 2, 4, 8, 16, 32), for dense heads."""
        x0 = F.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(F.max_pool2d(x0, 3, 2, 1))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return x0, x1, x2, x3, self.layer4(x3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)[-1]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _width_args(blocks: Sequence[int], bottleneck: bool, base: int = 64):
    """Group channel counts -> constructor arguments. Groups are named after their first producer:
    the stem ``conv1``; the streams ``layerS.0.conv2`` (basic) or ``layerS.0.conv3`` (bottleneck),
    except that with basic blocks layer1's stream is the stem's group; per block
    ``layerS.B.conv1`` (-> ``inner``) and, for bottlenecks, ``layerS.B.conv2`` (-> ``inner2``).
    Groups left out keep the default width (of ``base`` = 64)."""
    expansion = 4 if bottleneck else 1
    planes = [base * 2 ** s for s in range(4)]
    last = "conv3" if bottleneck else "conv2"
    stream = [f"layer{s + 1}.0.{last}" for s in range(4)]
    if not bottleneck:
        stream[0] = "conv1"
    block_names = [f"layer{s + 1}.{b}" for s, count in enumerate(blocks) for b in range(count)]
    block_planes = [p for p, count in zip(planes, blocks) for _ in range(count)]

    def translate(counts):
        kwargs = {"stages": tuple(counts.get(g, p * expansion) for g, p in zip(stream, planes))}
        if bottleneck:
            kwargs["stem"] = counts.get("conv1", base)
            kwargs["inner2"] = tuple(counts.get(f"{b}.conv2", p) for b, p in zip(block_names, block_planes))
        kwargs["inner"] = tuple(counts.get(f"{b}.conv1", p) for b, p in zip(block_names, block_planes))
        return kwargs
    return translate


@register_model(input_shape=(3, 64, 64), width_args=_width_args((2, 2, 2, 2), bottleneck=False))
def resnet18(**kwargs) -> nn.Module:
    """ResNet-18 (basic blocks 2-2-2-2), 11.7 M parameters at full width with 1000 classes."""
    return ImageNetResNet((2, 2, 2, 2), bottleneck=False, **kwargs)


@register_model(input_shape=(3, 64, 64), width_args=_width_args((3, 4, 6, 3), bottleneck=True))
def resnet50(**kwargs) -> nn.Module:
    """ResNet-50 (bottlenecks 3-4-6-3, expansion 4), 25.6 M parameters at full width with 1000 classes."""
    return ImageNetResNet((3, 4, 6, 3), bottleneck=True, **kwargs)
