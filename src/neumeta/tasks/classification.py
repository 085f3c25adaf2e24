"""Image classification: cross-entropy loss, top-1 accuracy."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.nn.functional as F


class ClassificationTask:
    """Loss and metrics of a ``num_classes``-way classifier.

    ``metric`` names the number that selects checkpoints; ``chance`` is its value for a
    network that guesses.
    """
    name = "classification"
    metric = "accuracy"

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, not {num_classes}")
        self.num_classes = num_classes
        self.chance = 1.0 / num_classes

    def loss(self, outputs: torch.Tensor, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch[1])

    def distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) of the class distributions, averaged over the batch."""
        return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                        reduction="batchmean")

    @torch.no_grad()
    def evaluate(self, model: Callable[[torch.Tensor], torch.Tensor],
                 batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device="cpu") -> Dict[str, float]:
        """Accuracy and mean loss of ``model`` (any callable x -> logits) over ``batches``."""
        correct, total, loss_sum = 0, 0, 0.0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
        if total == 0:
            raise ValueError("evaluate: no data")
        return {"accuracy": correct / total, "loss": loss_sum / total}
