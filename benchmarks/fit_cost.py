"""What a manifold costs against the individual models it replaces, from step times measured in one run.

    PYTHONPATH=src python benchmarks/fit_cost.py configs/compare-resnet20-every.yaml
    PYTHONPATH=src python benchmarks/fit_cost.py configs/compare-resnet20-every.yaml \
        --variant "" --variant "sampled_every=3 sandwich_every=3"   # the config, and a cheaper recipe
    PYTHONPATH=src python benchmarks/fit_cost.py configs/compare.yaml --rounds 1 --steps 4   # a quick look

Issue 22 asks that base + fit cost no more than training the four individual models. Timing whole
runs hours apart on a shared machine does not answer that (the same fit took 56 and 76 minutes
beside other jobs), so this script times every kind of step back to back in one process, in
rounds, and multiplies the medians by the number of steps each run of the compare config takes
(``neumeta compare``'s schedule):

- the manifold: the base model (``epochs`` epochs of full-width plain steps), the pre-fit
  (``fit.prefit_steps`` steps) and the joint phase (``fit.steps`` steps of the config's recipe);
- the individual models given as many images as base and manifold (``individual-matched``): one
  model per width of ``widths``, ``epochs + ceil(fit.steps / batches per epoch)`` epochs of plain
  steps at that width.

Evaluation is left out on both sides (the individual models validate each epoch, the fit every
``eval_every`` steps). Each ``--variant`` (FitConfig fields set over the config's; "" is the
config itself) gives one row. Appends a section to
``benchmarks/results/fit-cost.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` as a package, whatever the working directory
try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(ROOT / "src"))
from benchmarks.recipe_benchmark import device_name, fit_step_seconds, plain_step_seconds
from neumeta.cli import parse_command
from neumeta.config import parse_overrides
from neumeta.experiment import build_manifold, load_data
from neumeta.models import create_model, width_kwargs
from neumeta.train import FitConfig, PoorReconstructionWarning, fit

RESULTS = ROOT / "benchmarks" / "results" / "fit-cost.md"
HEADER = "# Base + fit against the individual models, from step times measured in one run\n"
COLUMNS = ("\n| config | fit options set | plain step ms (widths) | pre-fit step ms | joint step ms (× plain) | "
           "base + pre-fit + joint s | individual models s | ratio |\n|---|---|---|---|---|---|---|---|\n")


def prefit_step_seconds(manifold, data, fit_config, steps: int) -> float:
    """Wall time of a pre-fit step: a fit of ``steps`` pre-fit steps and nothing else, per step."""
    timed = dataclasses.replace(fit_config, prefit_steps=steps, steps=0, eval_every=10 ** 9)
    with warnings.catch_warnings():  # a few steps reconstruct nothing, and are not meant to
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        return fit(manifold, data.task, data.train, None, timed, progress=False).seconds / steps


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a `neumeta compare` YAML file")
    parser.add_argument("--variant", action="append", default=None, metavar="'FIELD=VALUE ...'",
                        help="FitConfig fields set over the config's, one row each (\"\": the config as it is; "
                             "default: that alone)")
    parser.add_argument("--steps", type=int, default=8, help="steps timed per kind and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every kind of step; medians are kept")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", default="", help="a line written under the section's heading")
    args = parser.parse_args(argv)
    _, config = parse_command(["compare", args.config])
    torch.manual_seed(0)
    data = load_data(config.data, 0)
    batches = len(data.train)
    base = create_model(config.model).to(config.device)
    manifold = build_manifold(base, data.example.to(config.device), config.inr, config.coords, groups=config.groups,
                              smoothing=False, log=lambda *_: None).to(config.device)
    widths = list(config.widths)
    recipes = {v.strip() or "(the config's)": dataclasses.replace(
                   config.fit, **parse_overrides(v.split(), {"fit": FitConfig}, default="fit")["fit"])
               for v in (args.variant or [""])}
    plain = {w: [] for w in widths}
    prefit: list = []
    joint = {k: [] for k in recipes}
    started = time.perf_counter()
    for r in range(args.rounds):
        for w in widths:
            plain[w].append(plain_step_seconds(config.model, data, config.lr, 0, config.device, args.steps + 5,
                                               **width_kwargs(config.model, manifold.space.resolve(w))))
        prefit.append(prefit_step_seconds(manifold, data, config.fit, args.steps))
        for k, fit_config in recipes.items():
            joint[k].append(fit_step_seconds(manifold, data, fit_config, args.steps))
        print(f"round {r + 1}/{args.rounds}: plain {', '.join(f'{1e3 * plain[w][-1]:.0f}' for w in widths)} ms, "
              f"pre-fit {1e3 * prefit[-1]:.0f} ms, joint "
              + ", ".join(f"{1e3 * joint[k][-1]:.0f} ms ({k})" for k in recipes), flush=True)
    t_plain = {w: statistics.median(v) for w, v in plain.items()}
    t_prefit = statistics.median(prefit)
    matched = config.epochs + math.ceil(config.fit.steps / max(1, batches))
    individuals = sum(matched * batches * t for t in t_plain.values())
    rows = ""
    for k, fit_config in recipes.items():
        t_joint = statistics.median(joint[k])
        ours = config.epochs * batches * t_plain[1.0] + fit_config.prefit_steps * t_prefit + fit_config.steps * t_joint
        rows += (f"| {Path(args.config).name} | {k} | {' / '.join(f'{1e3 * t:.0f}' for t in t_plain.values())} | "
                 f"{1e3 * t_prefit:.0f} | {1e3 * t_joint:.0f} ({t_joint / t_plain[1.0]:.2f}) | {ours:.0f} | "
                 f"{individuals:.0f} | **{ours / individuals:.2f}** |\n")
    minutes = (time.perf_counter() - started) / 60
    heading = (f"\n## {time.strftime('%Y-%m-%d')}, {device_name(config.device)}, {args.rounds} rounds of "
               f"{args.steps} steps ({minutes:.0f} min)\n\n"
               f"Widths {' / '.join(f'{w:g}' for w in widths)}; base {config.epochs} epochs, pre-fit "
               f"{config.fit.prefit_steps} steps, {config.fit.steps} joint steps; individual models "
               f"{matched} epochs each; {batches} batches of {config.data.batch_size} an epoch.\n\n"
               + (f"{args.note}\n\n" if args.note else ""))
    print(heading + COLUMNS + rows)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    text = results.read_text() if results.exists() else HEADER
    results.write_text(text + heading + COLUMNS + rows)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
