"""Train / validation / test splits as in-memory tensors, the validation split held out by seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

Split = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class Splits:
    """The three splits, each (images float32 [N, C, H, W] normalised, labels int64 [N])."""

    train: Split
    val: Split
    test: Split


def hold_out(train: Split, test: Split, val_size: int, seed: int) -> Splits:
    """Carve a seeded validation split out of the training images (model selection never sees
    the test split); each split keeps file order, the loaders shuffle anyway."""
    x, y = train
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if val_size >= len(x):
        raise ValueError(f"val_size {val_size} leaves no training images (only {len(x)} in total)")
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_index, train_index = permutation[:val_size].sort().values, permutation[val_size:].sort().values
    return Splits(train=(x[train_index], y[train_index]), val=(x[val_index], y[val_index]), test=test)
