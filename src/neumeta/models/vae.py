"""A convolutional variational auto-encoder (Kingma & Welling 2014).

Encoder: stride-2 convs (each halving the side) -> flatten -> two linear heads, ``mu`` and
``logvar``, of size ``latent``. Decoder: the latent as a 1x1 image -> a transposed conv to a
``side x side`` map -> stride-2 transposed convs back to the image size -> logits of
``in_channels`` image channels (a Bernoulli decoder: ``sigmoid(logits)`` is the image).

``forward`` returns ``(logits, mu, logvar)``. In training mode the decoder reads
``z = mu + exp(logvar / 2) * noise``; in eval mode it reads ``mu``, so eval outputs are
deterministic. The latent size and the image channels are outputs the task needs and never
morph; every hidden width (``encoder`` convs, ``decoder`` transposed convs) is a constructor
argument named after its channel group.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class ConvVAE(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, latent: int = 16,
                 encoder: Sequence[int] = (32, 64), decoder: Sequence[int] = (64, 32)):
        super().__init__()
        encoder, decoder = [int(w) for w in encoder], [int(w) for w in decoder]
        if not encoder or len(decoder) != len(encoder) or min(encoder + decoder) < 1:
            raise ValueError(f"vae: encoder and decoder need the same number (>= 1) of positive widths, "
                             f"not {encoder} and {decoder}")
        if int(latent) < 1:
            raise ValueError(f"vae: latent size must be at least 1, not {latent}")
        down = 2 ** len(encoder)
        if image_size % down:
            raise ValueError(f"vae: image_size={image_size} must be divisible by {down} "
                             f"({len(encoder)} stride-2 layers)")
        self.side = image_size // down
        convs, width = [], in_channels
        for w in encoder:
            convs.append(nn.Conv2d(width, w, 4, 2, 1))
            width = w
        self.encoder = nn.ModuleList(convs)
        self.mu = nn.Linear(width * self.side ** 2, latent)
        self.logvar = nn.Linear(width * self.side ** 2, latent)
        self.project = nn.ConvTranspose2d(latent, decoder[0], self.side)  # 1x1 -> side x side
        ups, width = [], decoder[0]
        for w in decoder[1:] + [in_channels]:
            ups.append(nn.ConvTranspose2d(width, w, 4, 2, 1))
            width = w
        self.decoder = nn.ModuleList(ups)

    def encode(self, x: torch.Tensor):
        for conv in self.encoder:
            x = F.relu(conv(x))
        x = torch.flatten(x, 1)
        return self.mu(x), self.logvar(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.project(z[:, :, None, None]))
        for i, up in enumerate(self.decoder):
            x = up(x)
            if i < len(self.decoder) - 1:
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.decode(z), mu, logvar


def _width_args(counts):
    """Group channel counts -> ``encoder`` / ``decoder``: groups ``encoder.i`` and ``project``,
    ``decoder.i`` (the decoder's i-th width after the first). Groups left out keep the default."""
    full_enc, full_dec = (32, 64), (64, 32)
    return {"encoder": tuple(counts.get(f"encoder.{i}", w) for i, w in enumerate(full_enc)),
            "decoder": (counts.get("project", full_dec[0]),)
            + tuple(counts.get(f"decoder.{i}", w) for i, w in enumerate(full_dec[1:]))}


@register_model(input_shape=(1, 28, 28), width_args=_width_args)
def vae(**kwargs) -> nn.Module:
    """Convolutional VAE for 28x28 images: 2 stride-2 convs (32, 64), latent 16, mirrored decoder."""
    return ConvVAE(**kwargs)
