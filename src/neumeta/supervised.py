"""Plain supervised training of one network: the base model and the individual baselines."""
from __future__ import annotations

from typing import Dict, List

import torch

from .progress import progress_bar


def train_supervised(model: torch.nn.Module, task, train_loader, epochs: int, lr: float = 1e-3,
                     val_loader=None, device="cpu", progress: bool = True, desc: str = "train",
                     keep_best: bool = False) -> List[Dict]:
    """Adam at ``lr`` for ``epochs`` epochs; returns per-epoch validation metrics (if given).

    ``keep_best`` (needs ``val_loader``) leaves the model at its best validation epoch, the same
    checkpoint selection a manifold gets.
    """
    if keep_best and val_loader is None:
        raise ValueError("keep_best needs a val_loader")
    best_score, best_state = -float("inf"), None
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, not {epochs}")
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    bar = progress_bar(total=epochs * len(train_loader), desc=desc, disable=not progress, leave=False)
    for epoch in range(epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        for batch in train_loader:
            batch = [t.to(device) for t in batch]
            loss = task.loss(model(batch[0]), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        row: Dict = {"epoch": epoch + 1}
        if val_loader is not None:
            model.eval()
            row.update({f"val_{k}": v for k, v in task.evaluate(model, val_loader, device).items()})
            model.train()
            if keep_best and row[f"val_{task.metric}"] > best_score:
                best_score = row[f"val_{task.metric}"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(row)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
