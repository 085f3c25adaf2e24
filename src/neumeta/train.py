"""fit(): learn the weight manifold.

Each step samples one width configuration, generates that network's weights, runs the batch
through it with ``torch.func.functional_call`` and minimises

    task loss + recon_weight * L_recon + l2_weight * L_l2

    L_recon = sum over tensors t of mean_elements[(W_t - W0_t)^2 * (1 + W0_t^2 / mean(W0_t^2))]
              (generated full-width weights W against the reference weights W0; the factor
              weighs large weights more, the paper's ||W0||^2 weighting made per element;
              each step estimates it on a random ``recon_rows`` fraction of the rows)
    L_l2    = sum over tensors of sum(W^2) of the sampled width's generated weights

Adam with a constant-LR reconstruction-only pre-fit, then a linear warm-up and a cosine
decay; an EMA of the INR is what gets evaluated and returned. Checkpoints are written
atomically at every evaluation and ``resume=True`` continues from them. Under torchrun the
gradients are averaged over processes and rank 0 alone writes and prints.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch.func import functional_call
from tqdm.auto import tqdm

from .io import atomic_write
from .manifold import WeightManifold


@dataclass
class FitConfig:
    """Every knob of ``fit``; the CLI and YAML configs use the same names."""
    steps: int = 3000            # joint steps, after the pre-fit
    prefit_steps: int = 1000     # reconstruction-only steps first, so the task starts from W0
    lr: float = 1e-3
    warmup: float = 0.1          # fraction of joint steps with a linear LR warm-up
    min_width: float = 0.5       # narrowest trained width (compression gamma = 0.5)
    max_width: float = 1.0
    per_group: bool = True       # each group draws its own width (else one shared multiplier)
    recon_weight: float = 10.0   # lambda_1
    recon_rows: float = 0.25     # fraction of full-width rows in each step's L_recon estimate
    recon_noise: bool = True     # jitter coordinates in L_recon too: the INR then learns each
                                 # channel's value over its whole cell, which is what narrower
                                 # widths read (off: full width fits, other widths fall to chance)
    l2_weight: float = 1e-4      # lambda_2
    inplace_distill: bool = False  # the full width also learns the task; its detached outputs
                                   # teach the sampled width (KD) instead of the labels
    ema: float = 0.995
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_widths: Sequence[float] = (1.0, 0.75, 0.5)
    eval_samples: int = 1        # noisy draws averaged when evaluating (1 = noise-free centre)
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.min_width <= self.max_width:
            raise ValueError(f"need 0 < min_width <= max_width, got {self.min_width}, {self.max_width}")
        if self.steps < 0 or self.prefit_steps < 0:
            raise ValueError("steps and prefit_steps must be >= 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), not {self.ema}")
        self.eval_widths = tuple(float(w) for w in self.eval_widths)


@dataclass
class FitResult:
    manifold: WeightManifold        # the EMA manifold with the best validation score
    best_score: float
    best_step: int
    history: List[dict] = field(default_factory=list)


def rank_and_world() -> tuple:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reconstruction_loss(manifold: WeightManifold, targets: Sequence[torch.Tensor], fraction: float = 1.0,
                        noise: bool = True) -> torch.Tensor:
    """L_recon at full width, estimated on a random ``fraction`` of each tensor's rows (unbiased)."""
    full = manifold.space.full
    rows = None
    if fraction < 1:
        rows = [torch.randperm(t.shape[0], device=t.device)[:max(1, min(t.shape[0], max(64, int(fraction * t.shape[0]))))]
                for t in targets]
    values = manifold.row_values(full, noise=noise, rows=rows)
    total = 0.0
    for i, (v, t) in enumerate(zip(values, targets)):
        energy = t.pow(2).mean().clamp_min(1e-12)
        if rows is not None:
            t = t[rows[i]]
        total = total + ((v - t).pow(2) * (1 + t.pow(2) / energy)).mean()
    return total


def l2_loss(generated: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum(w.pow(2).sum() for w in generated.values())


def inplace_distillation(task, student_outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> torch.Tensor:
    """The sampled width learns the generated full width's (detached) outputs, as in universally
    slimmable networks; zero when both networks are the same."""
    return task.distill(student_outputs, teacher_outputs.detach())


def sample_widths(manifold: WeightManifold, config: FitConfig, rng: random.Random) -> Dict[str, int]:
    """One training configuration: channel counts drawn uniformly in [min_width, max_width]."""
    shared = rng.uniform(config.min_width, config.max_width)
    counts = {}
    for name, size in manifold.space.full.items():
        lo = max(1, math.ceil(size * config.min_width - 1e-9))
        hi = max(lo, int(round(size * config.max_width)))
        counts[name] = rng.randint(lo, hi) if config.per_group else min(hi, max(lo, round(size * shared)))
    return counts


def evaluate_widths(manifold: WeightManifold, task, batches, widths: Sequence, samples: int = 1,
                    device=None) -> Dict[float, Dict[str, float]]:
    """Task metrics of the generated network at each width (no module is built)."""
    device = device or manifold.device
    template = manifold.space.model
    results = {}
    for width in widths:
        params = manifold.expected_parameters(width, samples=samples)
        results[width] = task.evaluate(lambda x: functional_call(template, params, (x,)), batches, device)
    return results


def _batches(loader, start_step: int = 0) -> Iterator:
    """Endless batches; starting at ``start_step`` replays the same epoch order as an unbroken run."""
    per_epoch = max(1, len(loader))
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def _schedule(config: FitConfig):
    warm = max(1, int(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < config.prefit_steps:
            return 1.0
        s = step - config.prefit_steps
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, config.steps - warm))))
    return factor


def fit(manifold: WeightManifold, task, train_loader, val_loader=None, config: FitConfig = FitConfig(),
        checkpoint: Optional[str] = None, resume: bool = False, progress: bool = True) -> FitResult:
    """Train ``manifold`` on ``task``; returns the best EMA manifold on the validation data.

    ``train_loader`` yields batches whose first element is the network's input; ``task`` gives
    ``loss(outputs, batch)``, ``evaluate(fn, batches, device)``, ``metric`` (higher is better).
    """
    rank, world = rank_and_world()
    device = manifold.device
    torch.manual_seed(config.seed + rank)
    rng = random.Random(config.seed * 1000 + rank)
    template = manifold.space.model
    targets = [t.to(device) for t in manifold.original_rows()]
    full = manifold.space.full
    ema = copy.deepcopy(manifold, memo={id(manifold.space): manifold.space})
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(manifold.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    total = config.prefit_steps + config.steps
    state = {"step": 0, "best_score": -math.inf, "best_step": -1, "best": None, "history": []}

    if resume and checkpoint and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        manifold.load_state_dict(saved["inr"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]

    def evaluate_and_save(step: int):
        if val_loader is not None:
            scores = evaluate_widths(ema, task, val_loader, config.eval_widths, config.eval_samples, device)
            row = {"step": step, **{f"val_{task.metric}@{w:g}": m[task.metric] for w, m in scores.items()}}
            score = sum(m[task.metric] for m in scores.values()) / len(scores)
            state["history"].append(row)
            if score > state["best_score"]:
                state.update(best_score=score, best_step=step,
                             best={k: v.detach().clone() for k, v in ema.state_dict().items()})
            if rank == 0 and progress:
                tqdm.write("step %d: " % step + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))
        state["step"] = step
        if checkpoint and rank == 0:
            payload = {"inr": manifold.state_dict(), "ema": ema.state_dict(),
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "state": state,
                       "config": dataclasses.asdict(config)}
            atomic_write(checkpoint, lambda tmp: torch.save(payload, tmp))

    batches = _batches(train_loader, state["step"])
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total, desc="fit",
               disable=not progress or rank != 0, dynamic_ncols=True)
    manifold.train()
    for step in bar:
        batch = [t.to(device) for t in next(batches)]
        prefit = step < config.prefit_steps
        recon = reconstruction_loss(manifold, targets, config.recon_rows, config.recon_noise)
        if prefit:
            loss, task_loss, counts = config.recon_weight * recon, torch.zeros(()), full
        else:
            counts = sample_widths(manifold, config, rng)
            params = manifold.generate(counts, noise=True)
            outputs = functional_call(template, params, (batch[0],))
            if config.inplace_distill:
                teacher = functional_call(template, manifold.generate(full, noise=True), (batch[0],))
                task_loss = task.loss(teacher, batch)
                loss = task_loss + inplace_distillation(task, outputs, teacher)
            else:
                task_loss = task.loss(outputs, batch)
                loss = task_loss
            loss = loss + config.recon_weight * recon + config.l2_weight * l2_loss(params)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fit: non-finite loss {float(loss)} at step {step} (widths {counts})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in manifold.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(manifold.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # the EMA warms up, so short runs are not dominated by the initial INR
            decay = min(config.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), manifold.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(task=f"{task_loss.item():.3f}", recon=f"{recon.item():.2e}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}")
        done = step + 1
        if done >= config.prefit_steps and (done % config.eval_every == 0 or done == total):
            evaluate_and_save(done)
    bar.close()
    if state["best"] is not None:
        ema.load_state_dict(state["best"])
    manifold.eval()
    ema.eval()
    return FitResult(ema, state["best_score"], state["best_step"], state["history"])
