"""A small, deterministic fit run as its own process, for the tests that need one.

    python tests/fit_worker.py kill OUT [--resume]     a fit with a checkpoint (test_kill_resume.py)
    python tests/fit_worker.py single OUT              one process, batch 2b (test_distributed.py)
    torchrun --nproc-per-node 2 tests/fit_worker.py ranks OUT [--resume]
                                                       two processes, batch b each, validation shards
                                                       of unequal sizes (test_distributed.py)

Each writes its final weights (``inr.*`` the trained INR, ``ema.*`` the returned best EMA) with
safetensors and the fit's record as JSON, per rank, under OUT. Not collected by pytest (no test_
prefix).
"""
import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import neumeta as nm
from neumeta.cli import leave_process_group
from neumeta.data import TensorLoader

KILL_STEPS = 240  # joint steps of the run to be killed, after 20 pre-fit ones: several seconds
BATCH = 8  # per process in the torchrun run; the single process takes 2 * BATCH


def base_and_data(n_train: int, n_val: int):
    """A tiny LeNet and inputs labelled by it (its logits centred over the inputs, else an
    untrained network calls everything one class), so the validation scores vary."""
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8).eval()
    x = torch.randn(n_train + n_val, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = base(x)
        y = (logits - logits.mean(0)).argmax(1)
    return base, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def manifold_of(base, inr_seed: int):
    torch.manual_seed(inr_seed)
    return nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                             nm.INRConfig(hidden=16, depth=2, frequencies=2))


def write(out: Path, name: str, manifold, result) -> None:
    tensors = {f"inr.{k}": v.detach().contiguous() for k, v in manifold.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in result.manifold.state_dict().items()})
    save_file(tensors, str(out / f"{name}.safetensors"))
    record = {"history": result.history, "best_step": result.best_step, "best_score": result.best_score,
              "rollbacks": result.rollbacks}
    (out / f"{name}.json").write_text(json.dumps(record))


def run_kill(out: Path, resume: bool) -> None:
    """Long enough to be killed mid-run; checkpoints often, so the kill may hit a write."""
    base, (x, y), (xv, yv) = base_and_data(256, 64)
    manifold = manifold_of(base, inr_seed=1)
    config = nm.FitConfig(steps=KILL_STEPS, prefit_steps=20, eval_every=10,
                          eval_widths=(1.0, 0.5), guard=False)
    result = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=32),
                    TensorLoader(xv, yv, batch_size=64, shuffle=False), config,
                    checkpoint=str(out / "fit.ckpt"), resume=resume, progress=False)
    write(out, "final", manifold, result)


# The validation set split into unequal shards (26 and 14 examples, 3 and 2 batches): what the
# CLI's loaders give under torchrun when the set does not divide evenly.
VAL_SHARDS = [[(0, 10), (10, 20), (20, 26)], [(26, 34), (34, 40)]]
RANKS_CONFIG = dict(steps=12, prefit_steps=4, lr=1e-2, eval_every=3, eval_widths=(1.0, 0.5), guard=True)


class LossScoredTask(nm.ClassificationTask):
    """Classification scored by minus the mean loss: a per-example mean like accuracy, but one
    that moves at every evaluation of so short a fit (accuracy sits at one value), so the best
    step is a real choice. ``chance`` well below a guess's -log(10): the guard watches, and acts
    only on a non-finite score."""
    metric = "neg_loss"

    def __init__(self):
        super().__init__(10)
        self.chance = -2 * math.log(10)

    def evaluate(self, model, batches, device="cpu"):
        scores = super().evaluate(model, batches, device)
        return {**scores, "neg_loss": -scores["loss"]}


def run_ranks(out: Path, resume: bool) -> None:
    """Under torchrun: each rank's INR starts differently (fit shares rank 0's), data sharded;
    ``resume``: every rank continues rank 0's checkpoint."""
    dist.init_process_group("gloo")
    finished = False
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        base, (x, y), (xv, yv) = base_and_data(96, 40)
        manifold = manifold_of(base, inr_seed=10 + rank)
        val = [(xv[a:b], yv[a:b]) for a, b in VAL_SHARDS[rank]]
        result = nm.fit(manifold, LossScoredTask(), TensorLoader(x, y, BATCH, rank=rank, world_size=world),
                        val, nm.FitConfig(**RANKS_CONFIG), checkpoint=str(out / "ranks.ckpt"), resume=resume,
                        progress=False)
        write(out, f"rank{rank}" + ("_resumed" if resume else ""), manifold, result)
        finished = True
    finally:
        leave_process_group(finished)  # as `neumeta fit` leaves it


def run_single(out: Path) -> None:
    base, (x, y), (xv, yv) = base_and_data(96, 40)
    manifold = manifold_of(base, inr_seed=10)
    val = [(xv[a:a + 16], yv[a:a + 16]) for a in range(0, 40, 16)]
    result = nm.fit(manifold, LossScoredTask(), TensorLoader(x, y, 2 * BATCH), val,
                    nm.FitConfig(**RANKS_CONFIG), progress=False)
    write(out, "single", manifold, result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["kill", "single", "ranks"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same arithmetic in every run
    warnings.simplefilter("ignore", nm.NeverLearnedWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "kill":
        run_kill(args.out, args.resume)
    elif args.mode == "single":
        run_single(args.out)
    else:
        run_ranks(args.out, args.resume)


if __name__ == "__main__":
    sys.exit(main())
