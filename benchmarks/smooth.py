"""Time and effect of the smoothing permutation (src/neumeta/smooth.py) on whole networks.

Prints a markdown table and writes it to benchmarks/results/smooth.md. Run from the repo root:

    PYTHONPATH=src python benchmarks/smooth.py

Models: every registered model (LeNet, CIFAR ResNet-20 and -56) at its default input shape. Weights are PyTorch's random initialisation with randomised BatchNorm
statistics: channel order is then pure chance, as it is after training. "tracing" is the time of
``total_variation`` alone (copy, dependency graph, slices), the part of ``smooth`` that is not
path search or the output check.

Torch runs on one thread here (``--threads`` to change): on this shared 2-core machine two
intra-op threads made a ResNet20 forward pass ~100x slower (680 ms instead of 7 ms) whenever
another process kept the cores busy, which measures the neighbours rather than smoothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from neumeta.models import create_model, example_input, list_models
from neumeta.smooth import smooth, total_variation

REPEATS = 5


def _outputs(out):
    """A model's outputs as a list of tensors (the VAE returns a tuple)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def randomise_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def best_of(fn, repeats=REPEATS):
    """Best wall-clock time of ``repeats`` runs (the machine may be shared), and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def models():
    for name in list_models():
        yield name, randomise_batchnorm(create_model(name)), example_input(name, batch=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"Smoothing permutation benchmark ({os.cpu_count()} CPUs, torch threads: {torch.get_num_threads()}, "
             f"load average {load:.1f} at start, torch {torch.__version__}); "
             f"best wall-clock time of {REPEATS} runs, default settings (seed 0, output check on).",
             "",
             "| model | groups | largest group | TV before | TV after | change | tracing (s) | smooth (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model, x in models():
        model.eval()
        trace_s, _ = best_of(lambda: total_variation(model, x))
        smooth_s, (smoothed, report) = best_of(lambda: smooth(model, x))
        with torch.no_grad():
            diff = max(float((a - b).abs().max()) for a, b in zip(_outputs(smoothed(x)), _outputs(model(x))))
        largest = max(report.groups.items(), key=lambda kv: kv[1].channels)
        change = 100 * (report.tv_after - report.tv_before) / report.tv_before
        lines.append(f"| {name} | {len(report.groups)} | {largest[0]} ({largest[1].channels}) | "
                     f"{report.tv_before:,.1f} | {report.tv_after:,.1f} | {change:+.1f} % | "
                     f"{trace_s:.3f} | {smooth_s:.3f} |")
        print(f"{name}: output max |diff| {diff:.2e}", file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).resolve().parent / "results" / "smooth.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
