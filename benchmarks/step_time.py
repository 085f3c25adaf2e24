"""Wall time of a plain LeNet training step and of a default-recipe fit step on one device.

    PYTHONPATH=src python benchmarks/step_time.py                 # this machine's CPU
    PYTHONPATH=src python benchmarks/step_time.py --device cuda   # a GPU
    PYTHONPATH=src python benchmarks/step_time.py --profile       # + where a fit step's host time goes
    PYTHONPATH=src python benchmarks/step_time.py --hidden 256 128  # the fit step of two INR widths

Fashion-MNIST batches of 128 (the recipe benchmark's), a fresh LeNet and a manifold built from it
(the default recipe, no pre-fit, no evaluation). The LeNet step is timed twice: with each batch
taken from the in-memory loader and moved to the device, and with one batch already there, so
the loader's share shows (the recipe benchmark's ``plain_step_seconds``: each step waited for on
a GPU; the fit step is its ``fit_step_seconds``). Appends a row to
``benchmarks/results/step-time.md`` (device, torch threads, date), so rows from several
machines sit in one table; the step ratio is the one the recipe benchmark reports (step_cost).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` as a package, whatever the working directory
try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(ROOT / "src"))
from benchmarks.recipe_benchmark import device_name, fit_step_seconds, plain_step_seconds
from neumeta.experiment import DataConfig, build_manifold, load_data
from neumeta.inr import INRConfig
from neumeta.models import create_model
from neumeta.recipes import RECIPES, recipe, recipe_inr

RESULTS = Path(__file__).resolve().parent / "results" / "step-time.md"
HEADER = ("| date | device | LeNet step, from the loader (ms) | LeNet step, batch on the device (ms) "
          "| fit step, default recipe unless named (ms) | fit step / LeNet step |\n|---|---|---|---|---|---|\n")


def fit_step_ms(data, device: str, steps: int, profile: bool, hidden: int = INRConfig.hidden,
                recipe_name: str = "default") -> tuple:
    """A fit step of recipe ``recipe_name`` for a manifold (INR ``hidden`` wide) built from a
    fresh LeNet, after 5 warm-up steps."""
    torch.manual_seed(0)
    config, coords = recipe(recipe_name)
    manifold = build_manifold(create_model("lenet").to(device), data.example.to(device),
                              recipe_inr(recipe_name, hidden=hidden), coords, log=lambda *_: None).to(device)
    fit_step_seconds(manifold, data, config, 5)  # warm-up
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    seconds = fit_step_seconds(manifold, data, config, steps)
    report = ""
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        report = out.getvalue()
    return 1e3 * seconds, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="LeNet steps timed (fit steps: a tenth, at least 10)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of the fit steps")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--hidden", type=int, nargs="+", default=[INRConfig.hidden],
                        help="INR widths: one row each, timed in the same run (e.g. 256 128)")
    parser.add_argument("--recipes", nargs="+", default=["default"], choices=list(RECIPES),
                        help="recipes timed, one row each (e.g. default inr: the grid's share of the step)")
    args = parser.parse_args(argv)
    data = load_data(DataConfig(), 0)
    loader, on_device = (1e3 * plain_step_seconds("lenet", data, 1e-3, 0, args.device, args.steps, fixed)
                         for fixed in (False, True))
    rows, report = "", ""
    for hidden, recipe_name in ((h, r) for h in args.hidden for r in args.recipes):
        fit_ms, report = fit_step_ms(data, args.device, max(10, args.steps // 10), args.profile, hidden, recipe_name)
        inr = ("" if hidden == INRConfig.hidden else f", INR {hidden} wide") + \
            ("" if recipe_name == "default" else f", recipe {recipe_name}")
        rows += (f"| {time.strftime('%Y-%m-%d')} | {device_name(args.device)}{inr} | {loader:.2f} | {on_device:.2f} "
                 f"| {fit_ms:.1f} | {fit_ms / loader:.1f} |\n")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    table = results.read_text() if results.exists() else HEADER
    results.write_text(table + rows)
    print(HEADER + rows, end="")
    print(f"appended to {results}")
    if report:
        print(report)


if __name__ == "__main__":
    main()
