"""The refine stage (``FitConfig.refine_steps``): the trained range of a fitted manifold learned
further by a grid of plain weights, on top of the INR held as it is.

Why: the INR learns the task more slowly per image than the network's own weights (one Adam
step on the INR moves every weight it generates), so the trained widths end 1.5-3 points under
individual models given the same data; plain weights do not have that handicap. Holding the
INR keeps every width below the trained range exactly as the joint phase left it (the grid
fades out there, ``WeightManifold.detail_gate``), so the unseen widths lose nothing, and the
full width starts from the reference network (``WeightManifold.add_range_grid``).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

from .train import FitConfig, FitResult, fit


def refine_checkpoint(checkpoint: Optional[str]) -> Optional[str]:
    """The refine stage's own checkpoint beside the joint phase's (``fit.ckpt`` -> ``fit.refine.ckpt``)."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    return str(path.with_name(f"{path.stem}.refine{path.suffix}"))


def refine_config(config: FitConfig) -> FitConfig:
    """The refine stage's ``fit`` options: ``refine_steps`` joint steps, no pre-fit, the INR held;
    every other option (the teachers, the widths, the schedule's shape, ``grid_lr``) as given."""
    return dataclasses.replace(config, prefit_steps=0, steps=config.refine_steps, refine_steps=0, inr_frozen=True)


def refine(fitted: FitResult, task, train_loader, val_loader, config: FitConfig, checkpoint: Optional[str] = None,
           resume=False, overwrite: bool = False, progress: bool = True) -> FitResult:
    """``fitted`` (a finished joint phase) refined for ``config.refine_steps`` steps; the result
    combines both stages (history and steps in one count, seconds summed, ``step_seconds`` the
    joint phase's, ``refine_step_seconds`` the refine stage's)."""
    manifold = copy.deepcopy(fitted.manifold, memo={id(fitted.manifold.space): fitted.manifold.space})
    for p in manifold.parameters():
        p.requires_grad_(True)  # the EMA manifold fit returns holds none
    manifold.add_range_grid()
    stage = refine_config(config)
    refined = fit(manifold, task, train_loader, val_loader, stage, checkpoint=refine_checkpoint(checkpoint),
                  resume=resume, overwrite=overwrite, progress=progress)
    offset = config.prefit_steps + config.steps
    return dataclasses.replace(
        refined,
        best_step=offset + refined.best_step,
        history=fitted.history + [{**row, "step": offset + row["step"]} for row in refined.history],
        rollbacks=fitted.rollbacks + [{**r, "step": offset + r["step"], "to_step": offset + r["to_step"]}
                                      for r in refined.rollbacks],
        step_seconds=fitted.step_seconds, refine_step_seconds=refined.step_seconds,
        seconds=fitted.seconds + refined.seconds, warnings=fitted.warnings + refined.warnings,
        reconstruction=fitted.reconstruction)
