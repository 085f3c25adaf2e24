"""Knowledge distillation: a narrow network trained from scratch to mimic the full one.

The student is an individual registry model at the manifold's channel counts; its loss mixes the
teacher's softened class distribution (Hinton et al. 2015) with the labels. The training loop is
``train_supervised``'s: distillation only changes the loss, so it is given as a task.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.nn as nn

from ..experiment import Data, train_base
from ..models import width_kwargs


class DistillationTask:
    """``task`` with its loss replaced by ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) *
    task.loss``; evaluation, metric and the rest are ``task``'s. T^2 keeps the soft term's
    gradients at the scale of the hard one's whatever the temperature."""

    def __init__(self, task, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, not {temperature!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"distillation alpha (the soft loss's share) must be in [0, 1], not {alpha!r}")
        self.task, self.teacher, self.temperature, self.alpha = task, teacher, float(temperature), float(alpha)

    def __getattr__(self, name):
        if name == "task":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        with torch.no_grad():
            targets = self.teacher(batch[0])
        t = self.temperature
        soft = self.task.distill(outputs / t, targets / t) * t * t
        hard = self.task.loss(outputs, batch)
        return self.alpha * soft + (1 - self.alpha) * hard


def train_distilled(model_name: str, counts: Mapping[str, int], teacher: nn.Module, data: Data, epochs: int,
                    lr: float = 1e-3, temperature: float = 4.0, alpha: float = 0.9, seed: int = 0, device="cpu",
                    progress: bool = True, keep_best: bool = False, desc: str = "distill",
                    **model_kwargs) -> nn.Module:
    """A ``model_name`` network at channel ``counts``, trained from scratch (seeded like
    ``train_base``) on ``data`` with ``teacher`` distilled into it; the teacher is used in eval mode,
    without gradients, and left in the mode it was in. The student's other constructor arguments
    are the teacher's where it is the same registry model (``model_kwargs`` override them)."""
    kwargs = dict(getattr(teacher, "neumeta_kwargs", {})) if getattr(teacher, "neumeta_name", None) == model_name else {}
    kwargs.update(width_kwargs(model_name, dict(counts)), **model_kwargs)
    was_training = teacher.training
    teacher.to(device).eval()
    try:
        task = DistillationTask(data.task, teacher, temperature, alpha)
        return train_base(model_name, dataclasses.replace(data, task=task), epochs, lr, seed, device, progress,
                          desc=desc, keep_best=keep_best, **kwargs)
    finally:
        teacher.train(was_training)
