"""Semantic segmentation: per-pixel cross-entropy, mean IoU and pixel accuracy."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.nn.functional as F


class SegmentationTask:
    """Loss and metrics of a network giving ``[B, num_classes, H, W]`` logits for ``[B, H, W]`` labels.

    Pixels labelled ``ignore_index`` (255: VOC's object borders) count nowhere. ``metric`` is
    ``"miou"``: the IoU of every class, averaged over the classes present in the labels or the
    predictions of the evaluated data. ``chance`` is ``1 / (2 * num_classes - 1)``, the mIoU of a
    network guessing uniformly at random on balanced classes (each class: overlap p/K, union
    p + 1/K - p/K with p = 1/K).
    """
    name = "segmentation"
    metric = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, not {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.chance = 1.0 / (2 * num_classes - 1)

    def loss(self, outputs: torch.Tensor, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy averaged over the labelled pixels."""
        return F.cross_entropy(outputs, batch[1], ignore_index=self.ignore_index)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) of every pixel's class distribution, averaged over pixels."""
        kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none")
        return kl.sum(1).mean()

    @torch.no_grad()
    def evaluate(self, model: Callable[[torch.Tensor], torch.Tensor],
                 batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device="cpu") -> Dict[str, float]:
        """mIoU, pixel accuracy and mean loss per labelled pixel of ``model`` (x -> logits) over ``batches``."""
        k = self.num_classes
        confusion = torch.zeros(k, k, dtype=torch.int64)  # rows: label, columns: prediction
        loss_sum, pixels = 0.0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            if logits.shape[-2:] != y.shape[-2:]:
                raise ValueError(f"segmentation: logits {tuple(logits.shape)} do not match labels {tuple(y.shape)}")
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="sum"))
            keep = y != self.ignore_index
            labels, predicted = y[keep].cpu(), logits.argmax(1)[keep].cpu()
            confusion += torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
            pixels += int(keep.sum())
        if pixels == 0:
            raise ValueError("evaluate: no labelled pixels")
        overlap = confusion.diag().double()
        union = confusion.sum(0).double() + confusion.sum(1).double() - overlap
        present = union > 0
        return {"miou": float((overlap[present] / union[present]).mean()),
                "pixel_accuracy": float(overlap.sum() / pixels),
                "loss": loss_sum / pixels}
