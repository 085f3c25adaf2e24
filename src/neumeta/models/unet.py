"""U-Net with a ResNet18-style encoder, as the paper's segmentation network.

The encoder is ``resnet18`` without its classifier (stem 7x7/2, max-pool, four stages of
basic blocks; features at strides 2, 4, 8, 16, 32). The decoder has five blocks; each doubles
the resolution (nearest upsampling), concatenates the encoder feature of that stride
(``torch.cat``, channel axis) where there is one, and applies two 3x3 conv + BN + ReLU. A 3x3
head gives ``num_classes`` logits per pixel at the input resolution. Inputs must have sides
divisible by 32.

Widths, all constructor arguments named after their channel group: the encoder's ``stem``
(= layer1's stream), ``stages``, ``inner`` as in ``resnet18``; per decoder block,
``decoder_inner`` (its first conv) and ``decoder`` (its second conv = the block's output).
``base`` scales the encoder's defaults (64) and ``decoder_base`` the decoder's (16, giving
256/128/64/32/16 as in common U-Net decoders).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model
from .resnet_imagenet import ImageNetResNet, _check, _width_args as _resnet_width_args

_BLOCKS = (2, 2, 2, 2)


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip (if any), two 3x3 conv + BN + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, inner: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv1 = nn.Conv2d(in_channels + skip_channels, inner, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class UNetResNet18(nn.Module):
    def __init__(self, num_classes: int = 21, in_channels: int = 3, base: int = 64, decoder_base: int = 16,
                 stem: Optional[int] = None, stages: Optional[Sequence[int]] = None,
                 inner: Optional[Sequence[int]] = None, decoder: Optional[Sequence[int]] = None,
                 decoder_inner: Optional[Sequence[int]] = None):
        super().__init__()
        if int(decoder_base) < 1:
            raise ValueError(f"decoder_base must be at least 1, not {decoder_base}")
        self.encoder = ImageNetResNet(_BLOCKS, bottleneck=False, num_classes=1, in_channels=in_channels,
                                      base=base, stem=stem, stages=stages, inner=inner)
        del self.encoder.fc  # features only
        enc = self.encoder
        default = [decoder_base * 2 ** (4 - i) for i in range(5)]
        decoder = _check("decoder", decoder if decoder is not None else default, 5, "one per decoder block")
        decoder_inner = _check("decoder_inner", decoder_inner if decoder_inner is not None else decoder, 5,
                               "one per decoder block")
        # skips, deepest first: layer3 (stride 16), layer2 (8), layer1 (4), stem (2), none (1)
        skips = [enc.layer3[-1].conv2.out_channels, enc.layer2[-1].conv2.out_channels,
                 enc.layer1[-1].conv2.out_channels, enc.conv1.out_channels, 0]
        width, blocks = enc.layer4[-1].conv2.out_channels, []
        for skip, mid, out in zip(skips, decoder_inner, decoder):
            blocks.append(DecoderBlock(width, skip, mid, out))
            width = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, num_classes, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for side in (x.shape[-2], x.shape[-1]):  # torch._assert keeps the model fx-traceable
            torch._assert(side % 32 == 0, "unet_r18: input height and width must be divisible by 32")
        x0, x1, x2, x3, x4 = self.encoder.features(x)
        y = x4
        for block, skip in zip(self.decoder, (x3, x2, x1, x0, None)):
            y = block(y, skip)
        return self.head(y)


def _width_args(counts):
    """Group channel counts -> constructor arguments: the encoder's groups as ``resnet18``'s with an
    ``encoder.`` prefix; per decoder block ``decoder.i.conv1`` (-> ``decoder_inner``) and
    ``decoder.i.conv2`` (-> ``decoder``). Groups left out keep the default width."""
    prefix = "encoder."
    kwargs = _resnet_width_args(_BLOCKS, bottleneck=False)(
        {k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix)})
    kwargs["stem"] = kwargs["stages"][0]
    default = [16 * 2 ** (4 - i) for i in range(5)]
    kwargs["decoder"] = tuple(counts.get(f"decoder.{i}.conv2", d) for i, d in enumerate(default))
    kwargs["decoder_inner"] = tuple(counts.get(f"decoder.{i}.conv1", d) for i, d in enumerate(default))
    return kwargs


@register_model(input_shape=(3, 64, 64), width_args=_width_args)
def unet_r18(**kwargs) -> nn.Module:
    """U-Net, ResNet18-style encoder, concatenation skips; ``num_classes`` logits per pixel (default 21, VOC)."""
    return UNetResNet18(**kwargs)
