"""fit(): learn the weight manifold.

Each step samples one width configuration (channel counts drawn uniformly in [min_width,
max_width], per channel group unless ``per_group`` is off), generates that network's weights,
runs the batch through it with ``torch.func.functional_call`` and minimises

    L_task + recon_weight * L_recon + l2_weight * L_l2

    L_recon = sum over tensors t of R_t[(W_t - W0_t)^2 * (1 + W0_t^2 / mean(W0_t^2))]
              R_t = mean over the tensor's elements (recon_reduction="mean", the default)
                    or their sum ("sum", the paper's squared norms); "relative" averages
                    mean / mean(W0_t^2) over the tensors instead of summing, so every tensor's
                    relative error counts alike whatever its scale (ResNet-20's folded biases
                    are 30-70x its layer3 weights in RMS); W are the generated
              full-width weights, W0 the reference weights; the factor weighs large weights
              more, the paper's ||W0||^2 weighting made per element; each step estimates it on
              a random ``recon_rows`` fraction of the rows (scaled to stay unbiased for "sum")
    L_l2    = sum over tensors of sum(W^2) of every trained width's generated weights
    L_task  = for each trained width s (the sampled one, and the narrowest one of the range
              with ``sandwich``):
                  CE(f_s, y)                       plain
                  KL(f_full || f_s) + CE(f_full, y) in-place distillation (the full width
                                                   learns the labels, once per step)
              plus KL(f_original || f_s) with ``original_distill`` (the default); with
              ``train_original`` f_original is a copy of the reference that goes on learning
              the labels of the same batches (plain Adam), else the reference as it is

Adam with a constant-LR reconstruction-only pre-fit, then a linear warm-up and a cosine
decay; an EMA of the INR is what gets evaluated and returned.

``tensor_subset`` < 1 (the paper's "random subset of layers" per step): each joint step draws
that fraction of the generated tensors from the fit's generator; only their INR blocks run with
autograd, the others are generated under ``no_grad`` from the same noise draw. Every trained
network is thus the same function as with all tensors, only the backward is cheaper, and the
gradient of every loss term (L_recon and L_l2 too) reaches the chosen blocks alone (a detail
table, plain weights that cost no backward through the INR, still learns everywhere). A
tensor's expected gradient shrinks by the fraction in every term alike, so their balance is
kept. The pre-fit always trains every tensor.

When the pre-fit ends, each tensor's relative reconstruction error at full width
(``reconstruction_errors``) goes into ``FitResult.reconstruction``; tensors above
``recon_warn`` are named in a ``PoorReconstructionWarning``: the joint phase starts from a
network that is not the reference there (too small an INR, or too short a pre-fit; with a
detail table, the INR alone is what the widths below the trained range get).

Checkpoints (``neumeta.checkpoint``: safetensors plus JSON, no pickle, so a crafted file is
refused rather than run) are written atomically at every evaluation, with the full training
state: INR, EMA, optimizer, schedule, every random generator (CPU and CUDA) and the history.
``resume=True`` continues one bit for bit on the CPU, ``"auto"`` if it exists, and a fresh fit
refuses to replace one unless ``overwrite``. A checkpoint records the fit options, a hash of
the base model's weights and the INR's shapes: resuming with other ones is refused.

Under torchrun every process starts from rank 0's INR and draws the same widths and noise;
only its data shard differs, and the gradients are averaged, so the run is one fit with a
world-times larger batch. Validation scores are per-example means over all ranks' shards
(uneven ones too), so every rank makes the same rollback and best-checkpoint decisions. Rank
0 alone writes and prints; every rank resumes from the same file.

The divergence guard keeps the last good state (in memory, and the checkpoint on disk): a
non-finite loss, or a validation score that falls to chance at a trained width, rolls
training back to it with the learning rate multiplied by ``guard_lr_factor``; after
``guard_retries`` rollbacks ``fit`` stops with ``DivergenceError`` naming the step and width.
A fit whose chosen checkpoint never left chance at a trained width (too short a schedule, most
often) is no divergence: there is nothing to roll back to, so ``fit`` returns it with
``FitResult.learned`` False and a ``NeverLearnedWarning`` that says how to train longer.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch.func import functional_call
from tqdm.auto import tqdm

from .calibrate import Reference, calibration_inputs, normalized_to, recorded_statistics
from .checkpoint import load_checkpoint, save_checkpoint
from .manifold import WeightManifold
from .progress import progress_bar


@dataclass
class FitConfig:
    """Every knob of ``fit``; the CLI and YAML configs use the same names."""
    steps: int = 3000            # joint steps, after the pre-fit
    prefit_steps: int = 1000     # reconstruction-only steps first, so the task starts from W0
    prefit_decay: bool = False   # cosine-decay the pre-fit's learning rate to zero (constant: it
                                 # levels off; ResNet-20's largest tensors stop near 0.12)
    lr: float = 1e-3
    joint_lr: Optional[float] = None  # peak learning rate of the joint phase (None: lr); an INR that
                                 # holds every tensor exactly (64 features, noise-free pre-fit) is
                                 # wrecked by 1e-3 in the joint phase but learns at 1e-4 (ResNet-20)
    grid_lr: Optional[float] = None  # peak joint-phase rate of the grid's plain weights (INRConfig.grid;
                                 # None: the INR's): plain weights learn at an individual model's rate
                                 # while the INR, which one step moves everywhere, may need less
    grid_only_in_range: bool = False  # with a grid in the trained range only (INRConfig.grid_range), the
                                 # in-range networks' gradients reach the grid alone: the INR learns only
                                 # as the INR alone with noise, the network below the range, as in the
                                 # default, and the grid learns what the range needs beyond it
    grid_widths: Optional[Sequence[float]] = None  # with the grid alone in the trained range
                                 # (INRConfig.grid_alone), widths the grid also trains on every joint step
                                 # besides the full, the narrowest and one drawn: a slimmable network's
                                 # switches, for the widths a user will deploy (each in [min_width,
                                 # max_width]). None: the middle of the range (0.75 of [0.5, 1]), which
                                 # took the grid within a point of data-matched models on 5 seeds
    grid_original_distill: bool = False  # the original model also teaches the grid alone's widths (with
                                 # original_distill); off (default), the grid learns as a slimmable network
                                 # does: labels at full width, its full width teaching the narrower ones.
                                 # Why off: the 4-epoch base as teacher held the grid at its level
    refine_steps: int = 0        # after the joint steps, steps in which a grid of plain weights that serves
                                 # the trained range learns on top of the fitted INR, held as it is
                                 # (neumeta/refine.py): the trained widths then learn at the speed of
                                 # plain weights, and every width below the range stays the fitted INR's
    inr_frozen: bool = False     # the INR's weights are held and only the grid learns: the refine
                                 # stage's own setting (needs a grid in the trained range, no pre-fit)
    warmup: float = 0.1          # fraction of joint steps with a linear LR warm-up
    fresh_optimizer: bool = False  # restart Adam's moment estimates when the joint phase begins: the
                                 # pre-fit ends on small reconstruction gradients, so the second-moment
                                 # estimate lags the task's and the first joint steps overshoot; on
                                 # LeNet it halved the fall after the pre-fit, but the whole recipe
                                 # ended level in range and 0.7 lower at 75 % (docs/recipe.md)
    noise_ramp: float = 0.0      # fraction of joint steps over which the coordinate noise grows
                                 # linearly from none to CoordConfig.noise (0: all of it at once);
                                 # for an INR pre-fitted without noise, which holds only the channel
                                 # centres: full noise at once sent ResNet-20 (every layer) to chance
    width_ramp: float = 0.0      # fraction of joint steps over which the trained range opens: its
                                 # lower end falls linearly from max_width to min_width (0: the whole
                                 # range at once); a curriculum for deep networks whose narrower
                                 # widths start at chance and whose losses then wreck the full width
    min_width: float = 0.5       # narrowest trained width (compression gamma = 0.5)
    max_width: float = 1.0
    per_group: bool = True       # each group draws its own width (else one shared multiplier)
    recon_weight: float = 1.0    # lambda_1 (chosen on validation over 3 seeds against 10: the same in
                                 # the trained range, better at the unseen narrower widths)
    recon_rows: float = 0.25     # fraction of full-width rows in each step's L_recon estimate
    recon_noise: bool = True     # jitter coordinates in L_recon too: the INR then learns each
                                 # channel's value over its whole cell, which is what narrower
                                 # widths read (off: full width fits, other widths fall to chance)
    prefit_noise: Optional[bool] = None  # coordinate noise in the pre-fit's L_recon (None: as recon_noise);
                                 # False: the pre-fit reconstructs the channels' centres exactly
                                 # (ResNet-20, every group: every tensor within 0.01), the joint
                                 # phase's noise then spreads them over their cells
    recon_reduction: str = "mean"  # "mean" per element of each tensor, "sum" (the paper's norms) or "relative"
    l2_weight: float = 1e-4      # lambda_2
    inplace_distill: bool = True   # the full width also learns the task; its detached outputs
                                   # teach the sampled width (KD) instead of the labels (chosen on
                                   # validation: better at every width, +3.7 points at the unseen 0.25)
    sandwich: bool = True        # also train the narrowest width of the range every step (chosen
                                 # on validation: the unseen narrower widths gain most)
    sandwich_every: int = 1      # ... on every this many joint steps only (1: every step): most of the
                                 # sandwich's hold on the narrowest width for a fraction of its cost
    sampled_every: int = 1       # the sampled width trains on every this many joint steps only (1: every
                                 # step); the full width, and the sandwich's narrowest on its own steps,
                                 # as before (inplace_distill). ResNet-20, every layer, k = 2 or 3: a step
                                 # 13-25 % cheaper, 1.3 points lower at width 0.75 (docs/benchmarks.md)
    sampled_widths: int = 1      # random widths drawn and trained per joint step, besides the full width
                                 # and the sandwich's narrowest (universally slimmable networks train
                                 # two): the middle of the range trained more often, each costing a
                                 # narrower network's forward and backward
    narrow_batch: float = 1.0    # fraction of each batch that each narrower trained network (sampled,
                                 # narrowest) runs on; the full width, its teacher, always runs on all of
                                 # it. Networks of one step take disjoint slices where the batch allows,
                                 # so the step still sees every image. Cost falls with the batch, where
                                 # on a CPU it barely falls with the width (0.75 wide: 93 % of a full
                                 # step); ResNet-20, every layer, 0.5: 2.45x a plain step instead of
                                 # 3.0x, 1.0 point lower at width 0.75 (docs/benchmarks.md)
    full_every: int = 1          # the full width learns the task on every this many joint steps only
                                 # (1: every step); on the others it runs forward-only, as the in-place
                                 # teacher (and statistics source) alone (inplace_distill). ResNet-20,
                                 # every layer, k = 2: 3-4 points lower; the teacher must keep learning
    original_distill: bool = True   # the reference (pre-trained) network's outputs also teach
                                    # every trained width (KD); chosen on validation over 3 seeds:
                                    # +0.35 at full width, +0.37 at 0.5, +0.41 at the unseen 0.25
    original_fade: float = 0.0      # fraction of the joint steps over which that distillation fades out
                                    # linearly, full weight to none (0: it never fades): it keeps the start
                                    # of the joint phase stable, and the widths may then pass the reference
    train_original: bool = False    # that teacher is a copy of the reference that goes on learning
                                    # the same batches (Adam at lr, constant), as an individual model
                                    # would; the reference itself (full width, L_recon) stays. On
                                    # LeNet a teacher 2 points better left the trained widths level
                                    # and 0.6 lower at 75 % (docs/recipe.md)
    guard: bool = True           # roll back on NaN/inf or a collapse to chance
    guard_retries: int = 3       # rollbacks before giving up
    guard_lr_factor: float = 0.5  # learning rate multiplier at each rollback
    collapse_margin: float = 0.05  # "at chance": metric <= chance + margin * (1 - chance)
    ema: float = 0.995
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_widths: Sequence[float] = (1.0, 0.75, 0.5)
    select_widths: Optional[Sequence[float]] = None  # widths whose mean validation score picks the
                                                     # checkpoint (None: eval_widths); validated too
    eval_samples: int = 1        # noisy draws averaged when evaluating (1 = noise-free centre)
    train_calibrated: bool = False  # every narrower trained network runs with its layers' outputs
                                 # normalised per batch to the full width's statistics of their cells
                                 # (the in-place teacher's, same batch): the network calibrated sampling
                                 # gives (neumeta.calibrate), trained as such; validation calibrates too.
                                 # For deep networks without normalisation layers (folded BatchNorm),
                                 # whose narrower widths otherwise start at chance
    calibration_batches: int = 4  # training batches that calibrate each validated width (train_calibrated)
    tensor_subset: float = 1.0   # fraction of the generated tensors whose INR blocks get gradients each
                                 # joint step (the rest generated without autograd, their blocks and Adam
                                 # moments left as they are); 1.0 = all. For measurements: 0.25 and
                                 # 0.5 break LeNet and ResNet-20 fits (docs/recipe.md)
    recon_warn: float = 0.75     # warn after the pre-fit about tensors whose relative full-width
                                 # reconstruction error ||W - W0|| / ||W0|| exceeds this: one the
                                 # pre-fit has barely moved (measured, LeNet after the default 1,000
                                 # steps: 0.05-0.67, full width at 87 % against the base's 88.5 %)
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.min_width <= self.max_width:
            raise ValueError(f"need 0 < min_width <= max_width, got {self.min_width}, {self.max_width}")
        if self.steps < 0 or self.prefit_steps < 0:
            raise ValueError("steps and prefit_steps must be >= 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), not {self.ema}")
        if self.recon_reduction not in ("mean", "sum", "relative"):
            raise ValueError(f"recon_reduction must be 'mean', 'sum' or 'relative', not {self.recon_reduction!r}")
        bad = [w for w in self.grid_widths or () if not self.min_width <= w <= self.max_width]
        if bad:
            raise ValueError(f"grid_widths {bad} lie outside the trained range [{self.min_width}, {self.max_width}]")
        if self.grid_lr is not None and not self.grid_lr > 0:
            raise ValueError(f"grid_lr must be > 0 (or None: the INR's joint rate), not {self.grid_lr}")
        if self.joint_lr is not None and not self.joint_lr > 0:
            raise ValueError(f"joint_lr must be > 0 (or None: lr), not {self.joint_lr}")
        if not 0 < self.guard_lr_factor < 1:
            raise ValueError(f"guard_lr_factor must be in (0, 1), not {self.guard_lr_factor}")
        if not 0 <= self.original_fade <= 1:
            raise ValueError(f"original_fade must be in [0, 1] (a fraction of the joint steps), "
                             f"not {self.original_fade}")
        if self.original_fade and not self.original_distill:
            raise ValueError("original_fade fades out original-model distillation: it needs original_distill")
        if not 0 <= self.noise_ramp <= 1:
            raise ValueError(f"noise_ramp must be in [0, 1] (a fraction of the joint steps), not {self.noise_ramp}")
        if not 0 <= self.width_ramp <= 1:
            raise ValueError(f"width_ramp must be in [0, 1] (a fraction of the joint steps), not {self.width_ramp}")
        if self.train_calibrated and not self.inplace_distill:
            raise ValueError("train_calibrated needs inplace_distill: the full width's forward on each batch gives "
                             "the statistics the narrower widths are normalised to")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, not {self.calibration_batches}")
        # (option, its pass, why it needs inplace_distill when above 1; None: it does not)
        for name, passes, needs_teacher in (
                ("sandwich_every", "narrowest-width passes", None),
                ("sampled_every", "sampled-width passes", "without it a step may train no network"),
                ("full_every", "full-width task updates",
                 "without it the full width is not one of the step's trained networks")):
            every = getattr(self, name)
            if every < 1:
                raise ValueError(f"{name} must be >= 1 (joint steps between two {passes}), not {every}")
            if every > 1 and needs_teacher and not self.inplace_distill:
                raise ValueError(f"{name} > 1 needs inplace_distill: {needs_teacher}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, not {self.refine_steps}")
        if self.inr_frozen and self.prefit_steps:
            raise ValueError(f"inr_frozen holds the INR, which the pre-fit trains: prefit_steps must be 0, "
                             f"not {self.prefit_steps}")
        if self.inr_frozen and self.refine_steps:
            raise ValueError("inr_frozen is the refine stage itself: it cannot have refine_steps of its own")
        if self.sampled_widths < 1:
            raise ValueError(f"sampled_widths must be >= 1 (random widths trained per joint step), "
                             f"not {self.sampled_widths}")
        if self.full_every > 1 and self.sampled_every > 1:
            raise ValueError(f"full_every ({self.full_every}) and sampled_every ({self.sampled_every}) cannot both "
                             f"be above 1: some steps would train no network")
        if not 0 < self.narrow_batch <= 1:
            raise ValueError(f"narrow_batch must be in (0, 1] (a fraction of each batch), not {self.narrow_batch}")
        if not 0 < self.tensor_subset <= 1:
            raise ValueError(f"tensor_subset must be in (0, 1] (a fraction of the tensors), not {self.tensor_subset}")
        self.eval_widths = tuple(float(w) for w in self.eval_widths)
        if self.select_widths is not None:
            self.select_widths = tuple(float(w) for w in self.select_widths)
            if not self.select_widths:
                raise ValueError("select_widths must name at least one width (or be None: the eval widths)")

    @property
    def validated_widths(self) -> tuple:
        """Every width validated during fit: the eval widths, then any other selection width."""
        extra = tuple(w for w in (self.select_widths or ()) if w not in self.eval_widths)
        return self.eval_widths + extra


class DivergenceError(RuntimeError):
    """``fit`` kept diverging (non-finite loss or collapse to chance) after every rollback;
    ``rollbacks`` lists them (step, step rolled back to, why), as ``FitResult.rollbacks`` would."""

    def __init__(self, message: str, rollbacks: Sequence[dict] = ()):
        super().__init__(message)
        self.rollbacks = list(rollbacks)


class NeverLearnedWarning(UserWarning):
    """The fit ended, but its chosen checkpoint sits at chance at a trained width: the manifold is
    returned (and a command writes it), yet it does not work there; it needs a longer schedule."""


class PoorReconstructionWarning(UserWarning):
    """After the pre-fit some tensors' full-width weights are still far from the reference's: the
    joint phase does not start from the reference network there."""


@dataclass
class FitResult:
    manifold: WeightManifold        # the EMA manifold with the best validation score
    best_score: float
    best_step: int
    history: List[dict] = field(default_factory=list)
    rollbacks: List[dict] = field(default_factory=list)  # the divergence guard's interventions
    step_seconds: float = float("nan")  # mean wall time of a joint (post-pre-fit) step
    seconds: float = 0.0            # the whole fit's wall time, summed over every process that resumed it
    learned: bool = True            # False: the chosen checkpoint never left chance at a trained width
    warnings: List[str] = field(default_factory=list)  # what fit warned about (NeverLearnedWarning)
    full_width: Optional[dict] = None  # INRConfig(full_width="best"): both scores and the choice
    reconstruction: Dict[str, float] = field(default_factory=dict)  # per tensor, when the pre-fit ended
                                                                     # (reconstruction_errors)
    refine_step_seconds: Optional[float] = None  # mean wall time of a refine step (FitConfig.refine_steps)
    best_inr_step: Optional[int] = None  # with the grid alone in the range (INRConfig.grid_alone): the step the
                                         # INR was kept from, chosen on the INR alone (best_step: the grid's)
    inr_history: List[dict] = field(default_factory=list)  # ... and the INR alone's validation scores


def rank_and_world() -> tuple:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reconstruction_loss(manifold: WeightManifold, targets: Sequence[torch.Tensor], fraction: float = 1.0,
                        noise: bool = True, reduction: str = "mean",
                        grad_tensors: Optional[AbstractSet[int]] = None) -> torch.Tensor:
    """L_recon at full width, estimated on a random ``fraction`` of each tensor's rows (unbiased);
    only the tensors in ``grad_tensors`` (None: all) carry a gradient."""
    rows = None
    if fraction < 1:
        rows = [torch.randperm(t.shape[0], device=t.device)[:max(1, min(t.shape[0], max(64, int(fraction * t.shape[0]))))]
                for t in targets]
    values = manifold.row_values(manifold.space.full, noise=noise, rows=rows, detail=False, grad_tensors=grad_tensors,
                                 grid=not manifold.grid_range)
    return reconstruction_from_values(values, targets, reduction, rows)


@torch.no_grad()
def reconstruction_errors(manifold: WeightManifold) -> Dict[str, float]:
    """Each generated tensor's relative error at full width, ||W - W0|| / ||W0|| (noise-free INR
    values, no detail table, no grid that serves the trained range only; the absolute ||W|| where W0
    is all zeros): which tensors the INR does not hold, whatever the loss's weighting hides."""
    values = manifold.row_values(manifold.space.full, noise=False, detail=False, grid=not manifold.grid_range)
    errors = {}
    for spec, v, w0 in zip(manifold.specs, values, manifold.original_rows()):
        w0 = w0.to(v)
        reference = float(w0.norm())
        errors[spec.name] = float((v - w0).norm()) / (reference if reference > 0 else 1.0)
    return errors


def poor_reconstruction(errors: Mapping[str, float], threshold: float, detail: bool = False) -> Optional[str]:
    """The warning for tensors above ``threshold`` in ``errors``, or None. ``detail``: the manifold
    has a detail table, which makes the full width exact whatever the INR holds."""
    poor = {name: e for name, e in errors.items() if e > threshold}
    if not poor:
        return None
    named = ", ".join(f"{name} {e:.2f}" for name, e in sorted(poor.items(), key=lambda kv: -kv[1]))
    where = ("the detail table makes the full width exact, but below the trained range, where it fades out, "
             "the INR is alone" if detail else "the joint phase does not start from the reference network there")
    return (f"after the pre-fit, the INR's values of {len(poor)} of {len(errors)} generated tensors are more than "
            f"{threshold:g} (relative error) from the reference at full width: {named}; {where}. A longer pre-fit "
            "(prefit_steps) or a larger INR (hidden) helps")


def draw_tensor_subset(manifold: WeightManifold, config: FitConfig, rng: random.Random) -> Optional[Set[int]]:
    """This joint step's tensors with gradients (indices into ``manifold.specs``), drawn from the
    fit's ``rng`` so a resumed fit draws the same ones; None (all) at ``tensor_subset=1``, which
    draws nothing, so such a fit's random stream is the one it always was."""
    if config.tensor_subset >= 1:
        return None
    n = len(manifold.specs)
    return set(rng.sample(range(n), max(1, round(config.tensor_subset * n))))


def idle_blocks(manifold: WeightManifold, subset: Optional[AbstractSet[int]]) -> List[int]:
    """The INR blocks that no tensor of ``subset`` runs through (none when every tensor trains)."""
    if subset is None:
        return []
    active = {manifold.specs[i].block for i in subset}
    return [b for b in range(len(manifold.specs)) if b not in active]  # one block per tensor


class IdleBlocksHeld:
    """Around ``optimizer.step()``: the INR's blocks outside this step's tensor subset keep their
    weights and Adam moments, as separate parameters without a gradient would. The blocks share
    stacked parameters, so Adam sees a zero gradient for them and, without this, goes on moving
    them on stale momentum while their tensors' losses go unseen, and decays their second
    moments so that their next real step is too large."""

    def __init__(self, manifold: WeightManifold, optimizer: torch.optim.Optimizer, idle: Sequence[int]):
        self.stacked = list(manifold.inr.parameters()) if idle else []
        self.optimizer = optimizer
        self.idle = torch.tensor(list(idle), dtype=torch.long, device=manifold.device)

    def __enter__(self):
        self.kept = []
        for p in self.stacked:
            state = {k: v.index_select(0, self.idle) for k, v in self.optimizer.state.get(p, {}).items()
                     if torch.is_tensor(v) and v.dim() and v.shape[0] == p.shape[0]}
            self.kept.append((p, p.detach().index_select(0, self.idle), state))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, value, state in self.kept:
                p.index_copy_(0, self.idle, value)
                for k, v in state.items():
                    self.optimizer.state[p][k].index_copy_(0, self.idle, v)
        return False


def reconstruction_from_values(values: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                               reduction: str = "mean", rows: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """L_recon of generated full-width row values (all rows, or the subset ``rows``)."""
    total = 0.0
    for i, (v, t) in enumerate(zip(values, targets)):
        energy = t.pow(2).mean().clamp_min(1e-12)
        scale = 1.0
        if rows is not None:
            scale = t.shape[0] / len(rows[i])
            t = t[rows[i]]
        err = (v - t).pow(2) * (1 + t.pow(2) / energy)
        if reduction == "sum":
            total = total + err.sum() * scale
        else:
            total = total + (err.mean() / energy if reduction == "relative" else err.mean())
    return total / len(values) if reduction == "relative" else total


def l2_loss(generated: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum(w.pow(2).sum() for w in generated.values())


def inplace_distillation(task, student_outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> torch.Tensor:
    """The sampled width learns the generated full width's (detached) outputs, as in universally
    slimmable networks; zero when both networks are the same."""
    return task.distill(student_outputs, teacher_outputs.detach())


def narrowest_widths(manifold: WeightManifold, config: FitConfig, min_width: Optional[float] = None) -> Dict[str, int]:
    """The sandwich rule's lower slice: every group at the narrowest width of the range (whose
    lower end is ``min_width`` if given, as ``trained_min_width`` opens it, else the config's)."""
    low = config.min_width if min_width is None else min_width
    return {name: max(1, math.ceil(size * low - 1e-9)) for name, size in manifold.space.full.items()}


def trained_min_width(step: int, config: FitConfig) -> float:
    """The trained range's lower end at ``step``: ``min_width``, or, over the first ``width_ramp``
    of the joint steps, a value falling linearly from ``max_width`` to it."""
    opened = ramp_progress(step, config.width_ramp, config)
    return config.max_width - opened * (config.max_width - config.min_width)


def sample_widths(manifold: WeightManifold, config: FitConfig, rng: random.Random,
                  min_width: Optional[float] = None) -> Dict[str, int]:
    """One training configuration: channel counts drawn uniformly in [min_width, max_width]
    (``min_width`` if given, else the config's), per group or (``per_group=False``) one
    multiplier for all."""
    low = config.min_width if min_width is None else min_width
    shared = rng.uniform(low, config.max_width)
    narrowest = narrowest_widths(manifold, config, low)
    counts = {}
    for name, size in manifold.space.full.items():
        lo = narrowest[name]
        hi = max(lo, int(round(size * config.max_width)))
        counts[name] = rng.randint(lo, hi) if config.per_group else min(hi, max(lo, round(size * shared)))
    return counts


def evaluate_widths(manifold: WeightManifold, task, batches, widths: Sequence, samples: int = 1,
                    device=None, full_width: Optional[str] = None, seed: int = 0,
                    calibration=None) -> Dict[float, Dict[str, float]]:
    """Task metrics of the generated network at each width (no module is built), its weights
    averaged over ``samples`` draws from ``seed``; at full width ``full_width`` ("reference" or
    "inr"; default: the manifold's choice, as ``sample`` gives it). With ``calibration`` (input
    batches, or the ``Reference`` measured on them) each width is sampled calibrated instead, as
    ``sample(calibration=...)``."""
    device = device or manifold.device
    template = manifold.space.model
    reference = calibration_reference(manifold, calibration, samples, seed)
    results = {}
    for width in widths:
        if reference is not None:
            net = manifold.sample(width, samples=samples, seed=seed, calibration=reference, full_width=full_width)
            results[width] = task.evaluate(net, batches, device)
            continue
        params = manifold.expected_parameters(width, samples=samples, seed=seed, full_width=full_width)
        results[width] = task.evaluate(lambda x: functional_call(template, params, (x,)), batches, device)
    return results


def calibration_reference(manifold: WeightManifold, calibration, samples: int, seed: int = 0) -> Optional[Reference]:
    """The full width's statistics on ``calibration`` (input batches; None: no calibration; a
    ``Reference`` is returned as it is)."""
    if calibration is None or isinstance(calibration, Reference):
        return calibration
    return manifold.calibration_reference(calibration, samples, seed, len(calibration))


class _CountingBatches:
    """Iterates ``batches`` and counts the examples (the first dimension of each batch's input),
    which tasks do not report but an exact mean over ranks' shards needs."""

    def __init__(self, batches):
        self.batches, self.examples = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.examples += int(batch[0].shape[0])
            yield batch


def validation_scores(manifold: WeightManifold, task, batches, widths: Sequence, samples: int = 1,
                      device=None, full_width: str = "inr",
                      calibration: Optional[Sequence[torch.Tensor]] = None) -> Dict[float, float]:
    """``task.metric`` at each width, over the validation data of every process. By default the
    fit's view, the INR as trained also at full width (the reference there would score the same
    at every validation and tell the checkpoint choice nothing). ``calibration``: input batches
    that calibrate each width (``evaluate_widths``).

    Under torch.distributed each rank evaluates its own shard (of any size, the CLI's loaders
    split unevenly) and the per-example mean is taken over all of them: sum(metric * examples)
    / sum(examples), all-reduced. Every rank thus gets the same numbers and makes the same
    rollback and best-checkpoint decisions. Exact for metrics that are means over examples
    (accuracy, ELBO); a ratio over pixels or classes (mIoU) is weighted by images instead.
    """
    _, world = rank_and_world()
    calibration = calibration_reference(manifold, calibration, samples)  # measured once for every width
    if world == 1:
        return {w: m[task.metric] for w, m in evaluate_widths(manifold, task, batches, widths, samples, device,
                                                              full_width=full_width,
                                                              calibration=calibration).items()}
    device = device or manifold.device
    sums, counts = [], []
    for width in widths:
        counted = _CountingBatches(batches)
        try:
            value = evaluate_widths(manifold, task, counted, [width], samples, device,
                                    full_width=full_width, calibration=calibration)[width][task.metric]
        except ValueError:
            if counted.examples:
                raise
            value = 0.0  # an empty shard: it adds nothing (the task refuses to evaluate no data)
        sums.append(value * counted.examples)
        counts.append(counted.examples)
    totals = torch.tensor(sums + counts, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    totals = totals.tolist()
    if not all(totals[len(widths):]):
        raise ValueError("validation: no process has any validation data")
    return {w: totals[i] / totals[len(widths) + i] for i, w in enumerate(widths)}


def endless_batches(loader, start_step: int = 0) -> Iterator:
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


def ramp_progress(step: int, fraction: float, config: FitConfig) -> float:
    """How far ``step`` is through a ramp over the first ``fraction`` of the joint steps, in (0, 1]:
    1 in the pre-fit, after the ramp, and always when ``fraction`` is 0 (no ramp)."""
    ramp = fraction * config.steps
    if step < config.prefit_steps or ramp <= 0:
        return 1.0
    return min(1.0, (step - config.prefit_steps + 1) / ramp)


def noise_fraction(step: int, config: FitConfig) -> float:
    """How much of the coordinate noise a step uses: all of it in the pre-fit (``prefit_noise``
    decides there) and after ``noise_ramp`` of the joint steps, growing linearly in between."""
    return ramp_progress(step, config.noise_ramp, config)


def original_weight(step: int, config: FitConfig) -> float:
    """The weight of original-model distillation at a joint step: 1, or falling linearly to 0 over
    ``original_fade`` of the joint steps (0 after them)."""
    if not config.original_fade or step < config.prefit_steps:
        return 1.0
    return 1.0 - ramp_progress(step, config.original_fade, config)


def _schedule(config: FitConfig):
    warm = max(1, int(config.warmup * config.steps))
    joint = 1.0 if config.joint_lr is None else config.joint_lr / config.lr  # the factor is of ``lr``

    def factor(step: int) -> float:
        if step < config.prefit_steps:
            return 0.5 * (1 + math.cos(math.pi * step / config.prefit_steps)) if config.prefit_decay else 1.0
        s = step - config.prefit_steps
        if s < warm:
            return joint * (s + 1) / warm
        return joint * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, config.steps - warm))))
    return factor


def optimizer_groups(manifold: WeightManifold, config: FitConfig):
    """(Adam's parameter groups, their rate schedules): one group, or with ``grid_lr`` the grid's
    plain weights in a second one whose joint phase peaks at that rate; with ``inr_frozen`` the
    grid alone."""
    if config.inr_frozen:
        if not manifold.grid_range:
            raise ValueError("inr_frozen trains a grid that serves the trained range on top of a fitted INR, and "
                             "this manifold has none: give it one with WeightManifold.add_range_grid(), or fit "
                             "with FitConfig(refine_steps=N), which does")
        rate = config if config.grid_lr is None else dataclasses.replace(config, joint_lr=config.grid_lr)
        return [{"params": list(manifold.grid.parameters())}], [_schedule(rate)]
    if config.grid_lr is None:
        return [{"params": list(manifold.parameters())}], [_schedule(config)]
    if manifold.grid is None:
        raise ValueError("grid_lr is the rate of the grid's plain weights, and this manifold has no grid "
                         "(INRConfig(grid=True), --grid)")
    return ([{"params": inr_parameters(manifold)}, {"params": list(manifold.grid.parameters())}],
            [_schedule(config), _schedule(dataclasses.replace(config, joint_lr=config.grid_lr))])


def batch_rows(value, index: int, count: int):
    """Rows ``[index * count, (index + 1) * count)`` of every tensor in ``value`` (a batch, a network's
    outputs: tensors in tuples, lists and dicts), wrapping to the first ``count`` rows when they run
    past the end; all of it when ``count`` covers it."""
    if isinstance(value, torch.Tensor):
        total = value.shape[0]
        if count >= total:
            return value
        start = index * count % total
        return value[start:start + count] if start + count <= total else value[:count]
    if isinstance(value, Mapping):
        return {k: batch_rows(v, index, count) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(batch_rows(v, index, count) for v in value)
    return value


def in_range_grad_tensors(manifold: WeightManifold, config: FitConfig,
                          grad_tensors: Optional[AbstractSet[int]]) -> Optional[AbstractSet[int]]:
    """The tensors whose INR blocks get gradients from the in-range networks (the INR and the grid at
    the centres, ``INRConfig.grid_range``): none with ``grid_only_in_range``, else ``grad_tensors``."""
    if not config.grid_only_in_range:
        return grad_tensors
    if not manifold.grid_range:
        raise ValueError("grid_only_in_range says who learns the trained range, the grid alone: it needs a grid "
                         "that serves the trained range only (INRConfig(grid=True, grid_range=True), "
                         "--grid --grid-range)")
    return frozenset()


def task_loss_terms(manifold: WeightManifold, task, batch, counts_list: Sequence[Mapping[str, int]],
                    config: FitConfig, original_outputs=None, full_params=None,
                    grad_tensors: Optional[AbstractSet[int]] = None, train_full: bool = True,
                    alone_full_params=None, original_weight: float = 1.0):
    """(task part of the loss, L_l2 part) for one step's trained widths; see the module docstring.

    With in-place distillation the full width's generated parameters can be passed in
    (``full_params``), so the step that also uses them for L_recon generates them once.
    ``grad_tensors``: the tensors whose INR blocks get gradients (``tensor_subset``; None: all).
    ``train_full`` False (``full_every``): the full width runs forward-only, a teacher alone.
    ``original_weight`` scales the original-model distillation terms (``original_fade``).

    A manifold with a detail table (``INRConfig.detail``) trains each width twice from one
    generation: with the table, and the INR alone, which is what the widths below the trained
    range get (the table fades out there), taught by the same teachers.

    With ``train_calibrated`` the full width's per-channel statistics of this batch are recorded
    and every other trained network runs normalised to them (``neumeta.calibrate.normalized_to``).

    ``narrow_batch`` below 1: the i-th narrower width runs on the i-th slice of that size
    (``batch_rows``), its teachers' outputs sliced alike.

    With a grid that serves the trained range only (``INRConfig.grid_range``) every network is
    the INR and the grid at the centres, and each narrower width trains a second time as the INR
    alone with coordinate noise, which is what the widths below the range get; so does the full
    width where the step generated it for L_recon (``alone_full_params``). The teachers are the
    same.
    """
    apart = manifold.grid_alone  # the grid trains on its own (grid_loss_terms): here the INR alone, as without it
    in_range = manifold.grid_range and not apart
    range_grad = in_range_grad_tensors(manifold, config, grad_tensors)
    template = manifold.space.model
    x = batch[0]
    loss, l2 = 0.0, 0.0
    teacher, full_stats = None, None
    if config.inplace_distill:
        full = full_params
        if full is None:
            full = manifold.params_from_rows(manifold.row_values(manifold.space.full, noise=not in_range,
                                                                 grad_tensors=range_grad, grid=not apart),
                                             manifold.space.full)
        with recorded_statistics(template, manifold.space) if config.train_calibrated else nullcontext({}) \
                as full_stats, nullcontext() if train_full else torch.no_grad():
            teacher = functional_call(template, full, (x,))
        loss = task.loss(teacher, batch) if train_full else 0.0

    if alone_full_params is not None:
        loss = taught(task, config, loss, functional_call(template, alone_full_params, (x,)), batch, teacher,
                      original_outputs, original_weight)
        l2 = l2 + l2_loss(alone_full_params)
    rows = max(1, round(x.shape[0] * config.narrow_batch))
    for i, counts in enumerate(counts_list):
        if in_range:
            networks = [manifold.params_from_rows(manifold.row_values(counts, grad_tensors=range_grad), counts)]
            if not config.inr_frozen:  # the INR alone, the network below the range, learns too
                networks.append(manifold.params_from_rows(
                    manifold.row_values(counts, noise=True, grad_tensors=grad_tensors, grid=False), counts))
        else:
            values = manifold.row_values(counts, noise=True, detail=False, grad_tensors=grad_tensors, grid=not apart)
            networks = [manifold.params_from_rows(manifold.with_detail(values, counts), counts)]
            if manifold.detail is not None:
                networks.append(manifold.params_from_rows(values, counts))
        part, part_teacher, part_original = (batch_rows(v, i, rows) for v in (batch, teacher, original_outputs))
        for params in networks:
            with normalized_to(template, manifold.space, counts, full_stats, manifold.coord_config.positions) \
                    if config.train_calibrated else nullcontext():
                outputs = functional_call(template, params, (part[0],))
            loss = taught(task, config, loss, outputs, part, part_teacher, part_original, original_weight)
            l2 = l2 + l2_loss(params)
    return loss, l2


def taught(task, config: FitConfig, loss, outputs, batch, teacher, original_outputs, original_weight: float = 1.0):
    """``loss`` plus a trained network's task terms: its teacher's outputs (in-place distillation), or
    the labels without one (None), and the original model's outputs where it teaches
    (``original_distill``, scaled by ``original_weight``)."""
    loss = loss + (inplace_distillation(task, outputs, teacher) if teacher is not None else task.loss(outputs, batch))
    if original_outputs is not None and config.original_distill:
        loss = loss + original_weight * task.distill(outputs, original_outputs)
    return loss


def kept_best(best: Optional[dict], manifold: WeightManifold, grid: bool) -> dict:
    """``best`` (a state dict, or None) with ``manifold``'s current grid (``grid``) or everything
    else, the INR's part, put in: a grid alone in the range keeps each part from its own best step."""
    now = {k: v.detach().clone() for k, v in manifold.state_dict().items()}
    if best is None:
        return now
    return {k: now[k] if k.startswith("grid.") == grid else v for k, v in best.items()}


def check_grid_alone(manifold: WeightManifold, config: FitConfig) -> None:
    """Refuse the options that mean nothing, or something else, beside a grid alone in the range."""
    if config.grid_widths and not manifold.grid_alone:
        raise ValueError(f"grid_widths {tuple(config.grid_widths)} are widths the grid alone trains in the range, and "
                         "this manifold has none: INRConfig(grid=True, grid_range=True, grid_alone=True)")
    if not manifold.grid_alone:
        return
    clash = [name for name, on in (("grid_only_in_range", config.grid_only_in_range),
                                   ("inr_frozen", config.inr_frozen), ("train_calibrated", config.train_calibrated))
             if on]
    if clash:
        raise ValueError(f"{', '.join(clash)}: not with the grid alone in the trained range (INRConfig.grid_alone), "
                         "which trains apart from the INR")


def grid_widths_of_step(manifold: WeightManifold, config: FitConfig, step: int) -> List[Dict[str, int]]:
    """The narrower widths the grid alone trains this joint step (``INRConfig.grid_alone``): the
    narrowest, one drawn (from the step's own generator, so the INR's draws are the default's and a
    resumed fit draws the same), and ``grid_widths``."""
    drawn = sample_widths(manifold, config, random.Random(f"grid widths {config.seed} {step}"))
    return ([narrowest_widths(manifold, config), drawn]
            + [dict(manifold.space.resolve(w)) for w in anchored_widths(config)])


def anchored_widths(config: FitConfig) -> Tuple[float, ...]:
    """``grid_widths``, or the middle of the trained range when it is unset (None)."""
    if config.grid_widths is None:
        return ((config.min_width + config.max_width) / 2,)
    return tuple(config.grid_widths)


def grid_loss_terms(manifold: WeightManifold, task, batch, counts_list: Sequence[Mapping[str, int]],
                    config: FitConfig, original_outputs=None, original_weight: float = 1.0):
    """(task part, L_l2 part) of the grid alone (``INRConfig.grid_alone``): its full width at the
    centres learns the labels and teaches ``counts_list`` in place; the original model teaches all,
    as in ``task_loss_terms`` (unless ``grid_original_distill`` is off). No INR is evaluated: these terms
    reach the grid only."""
    template, x, full = manifold.space.model, batch[0], manifold.space.full
    if not config.grid_original_distill:
        original_outputs = None
    params = manifold.params_from_rows(manifold.row_values(full), full)
    teacher = functional_call(template, params, (x,))
    loss = taught(task, config, 0.0, teacher, batch, None, original_outputs, original_weight)
    l2 = l2_loss(params)
    for counts in counts_list:
        params = manifold.params_from_rows(manifold.row_values(counts), counts)
        outputs = functional_call(template, params, (x,))
        loss = taught(task, config, loss, outputs, batch, teacher if config.inplace_distill else None,
                      original_outputs, original_weight)
        l2 = l2 + l2_loss(params)
    return loss, l2


def average_gradients(parameters, world: int) -> None:
    """Under torch.distributed, every process's gradients become their mean over the processes."""
    if world > 1:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def learn_original(original: torch.nn.Module, optimizer, task, batch, world: int) -> torch.Tensor:
    """One plain step of the teacher that goes on learning (``train_original``); returns its
    outputs on the batch from before the step, detached, for the distillation."""
    outputs = original(batch[0])
    optimizer.zero_grad(set_to_none=True)
    task.loss(outputs, batch).backward()
    average_gradients(original.parameters(), world)
    optimizer.step()
    return outputs.detach()


def choose_full_width(manifold: WeightManifold, task, val_loader, config: FitConfig, device) -> Optional[dict]:
    """With ``INRConfig(full_width="best")``: the reference network and the INR's own full width
    scored on the validation data (as the fit validates: ``eval_samples`` draws), and the better
    one (the reference on a tie) set as what ``sample`` gives at full width. None where there is
    no choice to make (another setting, or no validation data: the reference stays)."""
    if manifold.inr_config.full_width != "best" or val_loader is None:
        return None
    scores = {source: validation_scores(manifold, task, val_loader, [1.0], config.eval_samples, device,
                                        full_width=source)[1.0] for source in ("reference", "inr")}
    manifold.full_width_choice = "inr" if scores["inr"] > scores["reference"] else "reference"
    return {**scores, "chosen": manifold.full_width_choice}


def never_learned(state: dict, config: FitConfig, chance: float, metric: str) -> Optional[str]:
    """Why the chosen checkpoint is no working manifold, or None: it sits at chance at a trained
    width. Not a divergence (nothing fell, so there is nothing to roll back to): a schedule too
    short for this network, most often."""
    row = next((r for r in state["history"] if r["step"] == state["best_step"]), None)
    at_chance = []
    for key, value in (row or {}).items():
        if key == "step":
            continue
        width = float(key.rsplit("@", 1)[1])
        if config.min_width <= width <= config.max_width and is_collapsed(value, chance, config.collapse_margin):
            at_chance.append(f"{value:.4f} at width {width:g}")
    if not at_chance:
        return None
    return (f"fit never left chance: its best checkpoint, step {state['best_step']}, has validation {metric} "
            f"{', '.join(at_chance)} (chance {chance:.4f}), so the manifold does not work there; train longer "
            f"(steps and prefit_steps, --steps and --prefit-steps: the default is {FitConfig.prefit_steps} pre-fit "
            f"+ {FitConfig.steps} joint steps, this fit had {config.prefit_steps} + {config.steps}) or check the "
            "data and the base model")


def is_collapsed(score: float, chance: float, margin: float) -> bool:
    """A score "at chance": no better than chance + ``margin`` of the way to a perfect score."""
    return score <= chance + margin * (1 - chance)


# FitConfig fields that only say how a run is watched: a checkpoint may be resumed with other values
WATCH_ONLY = ("eval_every", "eval_samples", "guard", "guard_retries", "guard_lr_factor", "collapse_margin",
              "recon_warn")


def changed_options(saved: Mapping, now: Mapping, prefix: str = "", skip: Sequence[str] = ()) -> List[str]:
    """"{prefix}{key}: {saved} in the checkpoint, {now} now" for each option of ``now`` that the
    checkpoint recorded differently (tuples and lists compare equal, as in JSON). A key the
    checkpoint lacks was written before that option existed and is not compared."""
    def plain(value):
        return json.loads(json.dumps(value))
    return [f"{prefix}{key}: {saved[key]!r} in the checkpoint, {value!r} now" for key, value in now.items()
            if key in saved and key not in skip and plain(saved[key]) != plain(value)]


# options that only the joint phase reads: a checkpoint written when the pre-fit ended (before any
# joint step) resumes under other values of these, so one pre-fit serves several joint recipes
JOINT_ONLY = ("steps", "joint_lr", "warmup", "fresh_optimizer", "noise_ramp", "width_ramp", "min_width", "max_width",
              "grid_only_in_range", "grid_widths", "grid_original_distill",
              "train_calibrated", "calibration_batches",
              "per_group", "inplace_distill", "sandwich", "sandwich_every", "sampled_every", "sampled_widths",
              "full_every",
              "narrow_batch",
              "original_distill", "original_fade", "train_original", "l2_weight", "tensor_subset", "eval_widths",
              "select_widths")


# options of the refine stage alone (which has its own checkpoint): the joint phase's checkpoint resumes
# under any values of these, so a finished fit can be refined without fitting it again
REFINE_ONLY = ("refine_steps",)


def check_resumable(saved: Mapping, config: FitConfig, checkpoint, step: Optional[int] = None) -> None:
    """Refuse to resume a checkpoint written with other training options: the rest of the run would
    silently mix two recipes (e.g. a default changed since). At the end of the pre-fit (``step`` ==
    its ``prefit_steps``) the joint phase's own options may differ."""
    prefit_done = step is not None and step == saved.get("prefit_steps") == config.prefit_steps
    differ = changed_options(saved, dataclasses.asdict(config),
                             skip=WATCH_ONLY + REFINE_ONLY + (JOINT_ONLY if prefit_done else ()))
    if differ:
        raise ValueError(f"cannot resume {checkpoint}: it was written with other fit options ("
                         + "; ".join(differ) + "); fit with those options, or move the checkpoint away to start afresh")


def base_fingerprint(manifold: WeightManifold) -> dict:
    """What a checkpoint can only be resumed with: a hash of the base (reference) network's
    weights, which the INR reconstructs, and the INR's parameter names and shapes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(manifold.space.model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    inr = [[name, list(tensor.shape)] for name, tensor in manifold.state_dict().items()]
    # the INR's options that change what its weights mean (same shapes, another function): not
    # full_width, which only says what sampling returns
    options = {k: v for k, v in dataclasses.asdict(manifold.inr_config).items() if k != "full_width"}
    return {"base_sha256": digest.hexdigest(), "inr": inr, "inr_options": options}


def check_same_base(saved: Optional[Mapping], now: Mapping, checkpoint) -> None:
    """Refuse to resume onto another base model or INR: the rest of the run would train the
    checkpoint's INR towards other weights, or fail deep inside load_state_dict."""
    if saved is None:
        return
    differ = []
    if saved.get("base_sha256") != now["base_sha256"]:
        differ.append("the base model's weights differ")
    if saved.get("inr") != now["inr"]:
        differ.append(f"its INR has parameters {_shapes(saved.get('inr', []))}, this one {_shapes(now['inr'])}")
    differ += changed_options(saved.get("inr_options", {}), now["inr_options"], prefix="INRConfig.")
    if differ:
        raise ValueError(f"checkpoint {checkpoint} was made from another base model / manifold ("
                         + "; ".join(differ) + "); resume with the manifold it was made from, or move the "
                         "checkpoint away to start afresh")


def _shapes(inr: Sequence) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in inr)


def resume_decision(checkpoint: Optional[str], resume, overwrite: bool) -> bool:
    """Whether ``fit`` continues ``checkpoint``; raises, before any training, when the caller's
    wish and the disk disagree (nothing of an earlier run is replaced unasked)."""
    if not (isinstance(resume, bool) or resume == "auto"):
        raise ValueError(f"resume must be True, False or 'auto', not {resume!r}")
    if resume is not False and checkpoint is None:
        raise ValueError(f"resume={resume!r} needs checkpoint= (the file to continue)")
    if resume is not False and overwrite:
        raise ValueError(f"resume={resume!r} continues the checkpoint and overwrite=True replaces it: pass one of them")
    if checkpoint is None:
        return False
    if resume is True and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"resume=True: no checkpoint {checkpoint} to continue (fit with resume=False "
                                "to start a run, or resume='auto')")
    if resume is False and Path(checkpoint).exists() and not overwrite:
        raise FileExistsError(f"{checkpoint} exists (the checkpoint of an earlier fit); pass resume=True to "
                              "continue that fit, or overwrite=True to start afresh and replace it")
    return resume is not False and Path(checkpoint).is_file()


def torch_rng_states() -> dict:
    """torch's generator states: the CPU one, and each CUDA device's once CUDA is in use (as CPU
    ByteTensors, which is what the setters expect)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_torch_rng_states(states: Mapping) -> None:
    torch.set_rng_state(states["cpu"].cpu())
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:torch.cuda.device_count()]])


def share_rank0_weights(manifold: WeightManifold, base_sha256: str) -> None:
    """Every process starts from rank 0's INR (parameters and buffers), however each one
    initialised its own; the base network (``base_sha256``, its hash here) must already agree,
    which is checked."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, base_sha256)
    if len(set(everyone)) > 1:  # every rank sees the same list, so all raise together
        raise ValueError("fit under torch.distributed: the processes hold different base models (their "
                         "weights' hashes differ); build the manifold from the same base network on every rank")
    with torch.no_grad():
        for tensor in [*manifold.parameters(), *manifold.buffers()]:
            dist.broadcast(tensor, src=0)


def record_reconstruction(manifold: WeightManifold, state: dict, config: FitConfig, rank: int) -> None:
    """The pre-fit's result, kept in the training state (checkpointed: a resumed fit returns it
    too); warns about the tensors above ``recon_warn``."""
    state["reconstruction"] = reconstruction_errors(manifold)
    why = poor_reconstruction(state["reconstruction"], config.recon_warn, manifold.detail is not None)
    if why is not None and rank == 0:
        warnings.warn(why, PoorReconstructionWarning, stacklevel=3)


def fit(manifold: WeightManifold, task, train_loader, val_loader=None, config: FitConfig = FitConfig(),
        checkpoint: Optional[str] = None, resume=False, overwrite: bool = False,
        progress: bool = True) -> FitResult:
    """Train ``manifold`` on ``task``; returns the best EMA manifold on the validation data.

    ``train_loader`` yields batches whose first element is the network's input; ``task`` gives
    ``loss(outputs, batch)``, ``distill(student, teacher)``, ``evaluate(fn, batches, device)``,
    ``metric`` (higher is better) and ``chance`` (the metric of a network that guesses).

    ``checkpoint`` is written at every evaluation. ``resume``: True continues it (it must
    exist), "auto" continues it if it exists, False starts afresh and refuses to replace an
    existing one unless ``overwrite``.
    """
    rank, world = rank_and_world()
    resuming = resume_decision(checkpoint, resume, overwrite)
    device = manifold.device
    # The same seeds on every rank: ranks differ only in their data shard, so a torchrun fit is
    # one fit with a world-times larger batch. Were the widths (or the coordinate noise) drawn
    # per rank, the averaged gradient would mix sub-networks and the result would depend on the
    # number of processes.
    torch.manual_seed(config.seed)
    check_grid_alone(manifold, config)
    rng = random.Random(config.seed * 1000)
    # the inputs that calibrate each validated width, the same at every validation
    calibration = calibration_inputs(train_loader, config.calibration_batches) if config.train_calibrated else None
    fingerprint = base_fingerprint(manifold)
    if world > 1:
        share_rank0_weights(manifold, fingerprint["base_sha256"])
    template = manifold.space.model
    targets = [t.to(device) for t in manifold.original_rows()]
    full = manifold.space.full
    manifold.noise_counts = narrowest_widths(manifold, config)  # sampling never jitters wider than training
    manifold.trained_calibrated = config.train_calibrated  # saved with it: sample() warns when not calibrated
    ema = copy.deepcopy(manifold, memo={id(manifold.space): manifold.space})
    for p in ema.parameters():
        p.requires_grad_(False)
    held = inr_parameters(manifold) if config.inr_frozen else []
    for p in held:  # no gradient through the INR's weights at all: the refine step's backward is the grid's
        p.requires_grad_(False)
    groups, schedules = optimizer_groups(manifold, config)
    in_range_grad_tensors(manifold, config, None)  # a bad combination fails now, not after the pre-fit
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    total = config.prefit_steps + config.steps
    state = {"step": 0, "best_score": -math.inf, "best_step": -1, "best": None, "history": [],
             "rollbacks": [], "last_scores": {}, "joint_seconds": 0.0, "joint_steps": 0,
             "seconds": 0.0}
    chance = getattr(task, "chance", None)

    # the teacher that goes on learning (train_original): a copy, so the reference stays as it was
    original, original_optimizer = None, None
    if config.train_original and config.original_distill:
        original = copy.deepcopy(template).train()
        for p in original.parameters():
            p.requires_grad_(True)
        original_optimizer = torch.optim.Adam(original.parameters(), lr=config.lr)

    def capture() -> dict:
        state["seconds"] = elapsed()
        learning = {} if original is None else {"original": original.state_dict(),
                                                "original_optimizer": original_optimizer.state_dict()}
        return copy.deepcopy({"inr": manifold.state_dict(), "ema": ema.state_dict(),
                              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "rng": rng.getstate(), "torch_rng": torch_rng_states(), "state": state,
                              **learning})

    def restore(saved: dict):
        manifold.load_state_dict(saved["inr"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        # the rate of this config's schedule (the same one, unless a finished pre-fit resumes under
        # other joint options, whose rate the saved optimizer does not know)
        for group, lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = lr * factor(saved["state"]["step"])
        if original is not None and "original" in saved:  # absent at a pre-fit's end written without it
            original.load_state_dict(saved["original"])
            original_optimizer.load_state_dict(saved["original_optimizer"])
        rng.setstate(saved["rng"])
        set_torch_rng_states(saved["torch_rng"])
        state.clear()
        state.update(copy.deepcopy(saved["state"]))

    if resuming:
        saved = load_checkpoint(checkpoint)  # every rank reads the same file: all continue alike
        check_resumable(saved.get("config", {}), config, checkpoint, saved["state"]["step"])
        check_same_base(saved.get("fingerprint"), fingerprint, checkpoint)
        restore(saved)
    # wall time carried over from the processes that wrote the checkpoint (a rollback restores an
    # older state, but not the time spent since)
    earlier, session_started = state.get("seconds", 0.0), time.perf_counter()

    def elapsed() -> float:
        return earlier + time.perf_counter() - session_started

    good = capture()  # the divergence guard's rollback point

    def rollback(step: int, why: str):
        """Back to the last good state with a lower learning rate, or stop for good."""
        nonlocal good, batches
        if not config.guard:
            raise DivergenceError(f"fit diverged at step {step}: {why} (the divergence guard is off)")
        if len(state["rollbacks"]) >= config.guard_retries:
            where = f", {checkpoint}" if checkpoint else ""
            raise DivergenceError(f"fit diverged at step {step}: {why}; {len(state['rollbacks'])} rollbacks with a "
                                  f"lower learning rate did not help (last good checkpoint: step "
                                  f"{good['state']['step']}{where}); to fit on without rollbacks turn the "
                                  "divergence guard off (guard=False, --no-guard)", rollbacks=state["rollbacks"])
        events = state["rollbacks"] + [{"step": step, "to_step": good["state"]["step"], "why": why}]
        restore(good)
        state["rollbacks"] = events
        scheduler.base_lrs = [lr * config.guard_lr_factor for lr in scheduler.base_lrs]
        for group, lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = lr
            group["lr"] = lr * scheduler.lr_lambdas[0](state["step"])
        good = capture()
        batches = endless_batches(train_loader, state["step"])
        if rank == 0 and progress:
            tqdm.write(f"divergence guard: {why} at step {step}; back to step {state['step']} with "
                       f"learning rate x{config.guard_lr_factor:g} ({len(events)}/{config.guard_retries})")

    def evaluate_and_save(step: int) -> Optional[str]:
        """Validate, keep the best, write the checkpoint; returns why the run collapsed, if it did."""
        nonlocal good
        if val_loader is not None:
            values = validation_scores(ema, task, val_loader, config.validated_widths, config.eval_samples, device,
                                       calibration=calibration)
            row = {"step": step, **{f"val_{task.metric}@{w:g}": v for w, v in values.items()}}
            if rank == 0 and progress:
                tqdm.write("step %d: " % step + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))
            if config.guard and chance is not None:
                # only the trained range (as far as width_ramp has opened it): a width outside it
                # (e.g. an unseen one watched for checkpoint selection) may sit near chance without
                # anything having gone wrong
                for w, v in values.items():
                    if not trained_min_width(step - 1, config) <= w <= config.max_width:
                        continue
                    before = state["last_scores"].get(w)
                    if (not math.isfinite(v) or (before is not None and is_collapsed(v, chance, config.collapse_margin)
                                                 and not is_collapsed(before, chance, config.collapse_margin))):
                        was = "" if before is None else f", was {before:.4f}"
                        return f"validation {task.metric} at width {w:g} fell to {v:.4f} (chance {chance:.4f}{was})"
            state["last_scores"] = values
            chosen = config.select_widths or config.eval_widths
            state["history"].append(row)
            score = sum(values[w] for w in chosen) / len(chosen)
            if ema.grid_alone:
                # the grid and the INR apart, each kept from its own best step: the INR's chosen as the
                # default's would be (on the INR alone), so every width below the range is the default's
                with ema.without_grid():
                    alone = validation_scores(ema, task, val_loader, config.validated_widths, config.eval_samples,
                                              device, calibration=calibration)
                state.setdefault("inr_history", []).append({"step": step, **{
                    f"val_{task.metric}@{w:g}": v for w, v in alone.items()}})
                inr_score = sum(alone[w] for w in chosen) / len(chosen)
                if inr_score > state.get("best_inr_score", -math.inf):
                    state.update(best_inr_score=inr_score, best_inr_step=step,
                                 best=kept_best(state["best"], ema, grid=False))
            if score > state["best_score"]:
                state.update(best_score=score, best_step=step,
                             best=kept_best(state["best"], ema, grid=True) if ema.grid_alone else
                             {k: v.detach().clone() for k, v in ema.state_dict().items()})
        state["step"] = step
        good = capture()
        if checkpoint:
            if rank == 0:
                save_checkpoint(checkpoint, dict(good, config=dataclasses.asdict(config), fingerprint=fingerprint))
            if world > 1:  # when fit returns (or fails) anywhere, the checkpoint is on disk
                dist.barrier()
        return None

    original_outputs = None
    # the INR's parameters; a detail table or grid is plain weights, left to Adam as they are (restoring a
    # state loads into these same tensors, so the list holds through rollbacks)
    clipped = inr_parameters(manifold)
    batches = endless_batches(train_loader, state["step"])
    bar = progress_bar(initial=state["step"], total=total, desc="fit", disable=not progress or rank != 0)
    manifold.train()
    step = state["step"]
    while step < total:
        # (not part of the step's time; the refine stage has no pre-fit: the joint phase recorded it)
        if step == config.prefit_steps and "reconstruction" not in state and not config.inr_frozen:
            record_reconstruction(manifold, state, config, rank)
        if step == config.prefit_steps and config.fresh_optimizer:  # inside the loop: a joint step follows
            optimizer.state.clear()  # here too when resumed from the pre-fit's end, so both runs agree
        started = time.perf_counter()
        batch = [t.to(device) for t in next(batches)]
        prefit = step < config.prefit_steps
        manifold.noise_fraction = noise_fraction(step, config)
        counts, full_params, alone_full_params = full, None, None
        subset = None if prefit else draw_tensor_subset(manifold, config, rng)
        if not prefit and config.inr_frozen:
            # the INR is held: no L_recon to learn, no INR alone to train; the teacher is the full
            # width at the centres with the grid
            recon = torch.zeros((), device=device)
            if config.inplace_distill:
                full_params = manifold.params_from_rows(manifold.row_values(full), full)
        elif not prefit and config.inplace_distill and config.recon_noise:
            # the teacher's noisy full-width rows are exactly what L_recon needs: one generation,
            # and L_recon on every row instead of a random subset. With a grid in the trained range only,
            # those rows are the INR alone's, which trains at full width as well, and the teacher is the
            # full width at the centres with the grid
            values = manifold.row_values(full, noise=True, detail=False, grad_tensors=subset,
                                         grid=not manifold.grid_range)
            recon = reconstruction_from_values(values, targets, config.recon_reduction)
            if manifold.grid_range and not manifold.grid_alone:
                alone_full_params = manifold.params_from_rows(values, full)
                full_params = manifold.params_from_rows(
                    manifold.row_values(full, grad_tensors=in_range_grad_tensors(manifold, config, subset)), full)
            else:
                full_params = manifold.params_from_rows(manifold.with_detail(values, full), full)
        else:
            noise = config.recon_noise if not prefit or config.prefit_noise is None else config.prefit_noise
            recon = reconstruction_loss(manifold, targets, config.recon_rows, noise,
                                        config.recon_reduction, grad_tensors=subset)
        if prefit:
            loss, task_loss = config.recon_weight * recon, torch.zeros(())
        else:
            low = trained_min_width(step, config)
            counts = sample_widths(manifold, config, rng, low)
            joint_step = step - config.prefit_steps
            sandwich = config.sandwich and joint_step % config.sandwich_every == 0
            sampled = joint_step % config.sampled_every == 0
            drawn = [counts] + [sample_widths(manifold, config, rng, low) for _ in range(config.sampled_widths - 1)]
            trained = (drawn if sampled else []) + ([narrowest_widths(manifold, config, low)] if sandwich else [])
            weight = original_weight(step, config)
            if original is not None:
                original_outputs = learn_original(original, original_optimizer, task, batch, world)
            elif config.original_distill and weight > 0:
                with torch.no_grad():
                    original_outputs = template(batch[0])
            else:  # faded out: no teacher's forward pass
                original_outputs = None
            task_loss, l2 = task_loss_terms(manifold, task, batch, trained, config, original_outputs, full_params,
                                            subset, train_full=joint_step % config.full_every == 0,
                                            alone_full_params=alone_full_params, original_weight=weight)
            if manifold.grid_alone:
                grid_loss, grid_l2 = grid_loss_terms(manifold, task, batch, grid_widths_of_step(manifold, config, step),
                                                     config, original_outputs, weight)
                task_loss, l2 = task_loss + grid_loss, l2 + grid_l2
            loss = task_loss + config.recon_weight * recon + config.l2_weight * l2
        finite = torch.isfinite(loss.detach()).float()
        if world > 1:  # every process rolls back together, or none does
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            rollback(step, f"non-finite loss {float(loss.detach())} (widths {counts})")
            step = state["step"]
            bar.reset(total=total)
            bar.update(step)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(manifold.parameters(), world)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(clipped, config.grad_clip)
        with IdleBlocksHeld(manifold, optimizer, idle_blocks(manifold, subset)):
            optimizer.step()
        scheduler.step()
        with torch.no_grad():  # the EMA warms up, so short runs are not dominated by the initial INR
            decay = min(config.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), manifold.parameters()):
                e.lerp_(p, 1 - decay)
        if step + 1 == config.prefit_steps:
            if manifold.detail is not None:
                # the pre-fit's INR holds the reference only roughly: the detail table takes the rest, so
                # the joint phase starts from the reference network exactly
                manifold.anchor_detail()
                ema.anchor_detail()
            if manifold.grid_range:
                # the grid took no part in the pre-fit: set it so the joint phase's teacher, the full width
                # at the centres, starts as the reference network
                manifold.anchor_grid()
                ema.anchor_grid()
        if not prefit:
            state["joint_seconds"] += time.perf_counter() - started
            state["joint_steps"] += 1
        if step % 20 == 0:
            bar.set_postfix(task=f"{float(task_loss.detach()):.3f}", recon=f"{recon.item():.2e}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
        bar.update(1)
        step += 1
        if step >= config.prefit_steps and (step % config.eval_every == 0 or step == total):
            why = evaluate_and_save(step)
            if why is not None:
                rollback(step, why)
                step = state["step"]
                bar.reset(total=total)
                bar.update(step)
    bar.close()
    manifold.noise_fraction = 1.0  # sampling draws the configured noise
    if step == config.prefit_steps and "reconstruction" not in state and not config.inr_frozen:  # pre-fit alone
        record_reconstruction(manifold, state, config, rank)
    why = never_learned(state, config, chance, task.metric) if chance is not None else None
    if why is not None and rank == 0:
        warnings.warn(why, NeverLearnedWarning, stacklevel=2)
    if state["best"] is not None:
        ema.load_state_dict(state["best"])
    manifold.eval()
    ema.eval()
    for p in held:
        p.requires_grad_(True)
    # with a refine stage to come, the full width is chosen after it, on the refined manifold
    full_width = None if config.refine_steps else choose_full_width(ema, task, val_loader, config, device)
    if full_width and rank == 0 and progress:
        tqdm.write(f"full width: {full_width['chosen']} (validation {task.metric}: reference "
                   f"{full_width['reference']:.4f}, INR {full_width['inr']:.4f})")
    result = FitResult(ema, state["best_score"], state["best_step"], state["history"], state["rollbacks"],
                       state["joint_seconds"] / max(1, state["joint_steps"]), seconds=elapsed(), learned=why is None,
                       warnings=[why] if why else [], reconstruction=dict(state.get("reconstruction", {})),
                       full_width=full_width, best_inr_step=state.get("best_inr_step"),
                       inr_history=state.get("inr_history", []))
    if config.refine_steps:
        from .refine import refine
        result = refine(result, task, train_loader, val_loader, config, checkpoint=checkpoint, resume=resume,
                        overwrite=overwrite, progress=progress)
    return result


def inr_parameters(manifold: WeightManifold) -> List[torch.nn.Parameter]:
    """The INR's parameters: all but the plain weights of a detail table or grid (which gradient
    clipping leaves to Adam as they are, and ``inr_frozen`` trains alone)."""
    tables = {id(p) for table in (manifold.detail, manifold.grid) if table is not None for p in table.parameters()}
    return [p for p in manifold.parameters() if id(p) not in tables]
