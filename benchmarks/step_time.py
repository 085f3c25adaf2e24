"""Wall time of a plain LeNet training step and of a default-recipe fit step on one device.

    PYTHONPATH=src python benchmarks/step_time.py                 # this machine's CPU
    PYTHONPATH=src python benchmarks/step_time.py --device cuda   # a GPU
    PYTHONPATH=src python benchmarks/step_time.py --profile       # + where a fit step's host time goes

Fashion-MNIST batches of 128 (the recipe benchmark's), a fresh LeNet and a manifold built from it
(the default recipe, no pre-fit, no evaluation). The LeNet step is timed twice: with each batch
taken from the in-memory loader and moved to the device, and with one batch already there, so
the loader's share shows. Both are synchronised on a GPU. Appends a row to
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

try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neumeta.analysis.recipe_benchmark import device_name
from neumeta.experiment import DataConfig, build_manifold, load_data
from neumeta.models import create_model
from neumeta.train import FitConfig, _batches, fit

RESULTS = Path(__file__).resolve().parent / "results" / "step-time.md"
HEADER = ("| date | device | LeNet step, from the loader (ms) | LeNet step, batch on the device (ms) "
          "| fit step, default recipe (ms) | fit step / LeNet step |\n|---|---|---|---|---|---|\n")


def lenet_step_ms(data, device: str, steps: int, from_loader: bool) -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = create_model("lenet").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = _batches(data.train)
    fixed = [t.to(device) for t in next(batches)]

    def step():
        x, y = [t.to(device) for t in next(batches)] if from_loader else fixed
        loss = data.task.loss(model(x), (x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for _ in range(10):  # warm-up: allocator, cuDNN's choice of kernels
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return 1e3 * (time.perf_counter() - start) / steps


def fit_step_ms(data, device: str, steps: int, profile: bool) -> tuple:
    torch.manual_seed(0)
    manifold = build_manifold(create_model("lenet").to(device), data.example.to(device),
                              log=lambda *_: None).to(device)
    config = FitConfig(prefit_steps=0, steps=steps, eval_every=10 ** 9, warmup=0.0)
    fit(manifold, data.task, data.train, None, FitConfig(prefit_steps=0, steps=5, eval_every=10 ** 9, warmup=0.0),
        progress=False)  # warm-up
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    result = fit(manifold, data.task, data.train, None, config, progress=False)
    report = ""
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        report = out.getvalue()
    return 1e3 * result.step_seconds, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="LeNet steps timed (fit steps: a tenth, at least 10)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of the fit steps")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    data = load_data(DataConfig(), 0)
    loader = lenet_step_ms(data, args.device, args.steps, from_loader=True)
    on_device = lenet_step_ms(data, args.device, args.steps, from_loader=False)
    fit_ms, report = fit_step_ms(data, args.device, max(10, args.steps // 10), args.profile)
    row = (f"| {time.strftime('%Y-%m-%d')} | {device_name(args.device)} | {loader:.2f} | {on_device:.2f} "
           f"| {fit_ms:.1f} | {fit_ms / loader:.1f} |\n")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    table = results.read_text() if results.exists() else HEADER
    results.write_text(table + row)
    print(HEADER + row, end="")
    print(f"appended to {results}")
    if report:
        print(report)


if __name__ == "__main__":
    main()
