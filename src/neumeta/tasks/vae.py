"""Image generation with a VAE: negative ELBO loss, NLL bound and reconstruction error.

The network returns ``(logits, mu, logvar)`` (the registry's ``vae``): Bernoulli logits of every
pixel and the Gaussian posterior of the latent. A batch is ``(input, target)``: ``target`` is
the image in [0, 1] the reconstruction should match, often the input itself before
normalisation (e.g. ``TensorLoader(x, x01)``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Sequence, Tuple

import torch
import torch.nn.functional as F


def _unpack(outputs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
        raise TypeError("VAETask: the network must return (logits, mu, logvar), "
                        f"not {type(outputs).__name__}")
    return outputs[0], outputs[1], outputs[2]


class VAETask:
    """Loss and metrics of a VAE with a Bernoulli decoder and a standard normal prior.

    ``loss`` is the negative ELBO per image in nats, BCE summed over pixels plus
    ``kl_weight`` x KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch.
    ``metric`` is ``"elbo"`` (= minus that loss with ``kl_weight`` 1; higher is better; it is
    a lower bound on log p(x), so ``-elbo`` is the usual NLL bound). There is no guessing
    level for it, so ``chance`` is None (``fit``'s collapse guard then only watches for NaN).
    In eval mode the registry's ``vae`` decodes ``mu``, so evaluated numbers are deterministic.
    """
    name = "vae"
    metric = "elbo"
    chance = None

    def __init__(self, kl_weight: float = 1.0):
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, not {kl_weight}")
        self.kl_weight = kl_weight

    @staticmethod
    def _check_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape != logits.shape:
            raise ValueError(f"VAETask: target {tuple(target.shape)} does not match the reconstruction "
                             f"{tuple(logits.shape)}; batches must be (input, target image in [0, 1])")
        return target.to(logits.dtype)

    @staticmethod
    def terms(outputs, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction BCE, KL), each summed within an image: shape [B]."""
        logits, mu, logvar = _unpack(outputs)
        target = VAETask._check_target(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        return bce, kl

    def loss(self, outputs, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        bce, kl = self.terms(outputs, batch[1])
        return (bce + self.kl_weight * kl).mean()

    def distill(self, student, teacher) -> torch.Tensor:
        """Output matching: MSE of the reconstructed images (probabilities), of mu and of logvar."""
        s, t = _unpack(student), _unpack(teacher)
        return (F.mse_loss(torch.sigmoid(s[0]), torch.sigmoid(t[0])) + F.mse_loss(s[1], t[1])
                + F.mse_loss(s[2], t[2]))

    @torch.no_grad()
    def evaluate(self, model: Callable, batches: Iterable[Sequence[torch.Tensor]], device="cpu") -> Dict[str, float]:
        """Per image, averaged: ``elbo`` (nats, higher is better), ``nll_bound`` = -elbo, its ``bce``
        and ``kl`` parts, ``mse`` (squared error of sigmoid(logits) to the target, summed over
        pixels) and ``loss`` (the training loss, with ``kl_weight``)."""
        sums = {"bce": 0.0, "kl": 0.0, "mse": 0.0}
        images = 0
        for batch in batches:
            x, target = batch[0].to(device), batch[1].to(device)
            outputs = model(x)
            bce, kl = self.terms(outputs, target)
            recon = torch.sigmoid(_unpack(outputs)[0])
            sums["bce"] += float(bce.sum())
            sums["kl"] += float(kl.sum())
            sums["mse"] += float((recon - target).pow(2).flatten(1).sum(1).sum())
            images += x.shape[0]
        if images == 0:
            raise ValueError("evaluate: no data")
        bce, kl, mse = (sums[k] / images for k in ("bce", "kl", "mse"))
        return {"elbo": -(bce + kl), "nll_bound": bce + kl, "bce": bce, "kl": kl, "mse": mse,
                "loss": bce + self.kl_weight * kl}
