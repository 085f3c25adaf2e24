"""Time and quality of the channel-ordering TSP solver (src/neumeta/tsp.py).

Prints a markdown table and writes it to benchmarks/results/tsp.md. Run from the repo root:

    PYTHONPATH=src python benchmarks/tsp.py

Instances are L1 distances between the rows of a random Gaussian matrix (like the channels of a
freshly initialised layer: nearly uniform distances, the hard case for local search) and between
random points in the unit square (structured, the easy case). "ResNet20 workload" solves 21
weight-like groups, 7 each of 16, 32 and 64 channels, as the library does for one network.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

try:
    from neumeta.tsp import held_karp_path, path_length, solve_open_path
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from neumeta.tsp import held_karp_path, path_length, solve_open_path


def l1_instance(n, dim, rng):
    w = rng.normal(size=(n, dim))
    return np.abs(w[:, None, :] - w[None, :, :]).sum(-1) if n <= 512 else _l1_blocked(w)


def _l1_blocked(w):
    return np.stack([np.abs(w - row).sum(-1) for row in w])


def euclidean_instance(n, rng):
    p = rng.random((n, 2))
    return np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))


def timed(fn, repeats):
    """Best wall-clock time of ``repeats`` runs (the machine may be shared), and the result."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"TSP solver benchmark ({os.cpu_count()} CPUs, load average {load:.1f} at start, "
             f"numpy {np.__version__}); best wall-clock time of several runs, default settings.",
             ""]

    lines += ["| instance | n | time (ms) | length / nearest-neighbour start |",
              "|---|---:|---:|---:|"]
    for n in (16, 64, 256, 512, 2048):
        for name, d in (("L1, Gaussian rows (dim 64)", l1_instance(n, 64, rng)),
                        ("Euclidean 2-D", euclidean_instance(n, rng))):
            repeats = 5 if n <= 512 else 1
            seconds, order = timed(lambda: solve_open_path(d), repeats)
            # Reference: plain nearest-neighbour path from node 0.
            left, node, nn = np.ones(n, bool), 0, [0]
            for _ in range(n - 1):
                left[node] = False
                node = int(np.where(left, d[node], np.inf).argmin())
                nn.append(node)
            ratio = path_length(d, order) / path_length(d, nn)
            lines.append(f"| {name} | {n} | {1e3 * seconds:.1f} | {ratio:.3f} |")

    groups = [l1_instance(c, 9 * c, rng) for c in (16, 32, 64) for _ in range(7)]
    seconds, _ = timed(lambda: [solve_open_path(d) for d in groups], 5)
    lines += ["", f"ResNet20 workload (21 groups of 16/32/64 channels): {1e3 * seconds:.1f} ms", ""]

    gaps = []
    for trial in range(200):
        n = int(rng.integers(5, 13))
        d = l1_instance(n, 16, rng) if trial % 2 else euclidean_instance(n, rng)
        gaps.append(path_length(d, solve_open_path(d, seed=trial))
                    / path_length(d, held_karp_path(d)) - 1)
    gaps = np.array(gaps)
    lines.append(f"Gap to Held-Karp optimum, 200 instances with n in 5..12: mean "
                 f"{100 * gaps.mean():.3f} %, max {100 * gaps.max():.2f} %, "
                 f"optimal in {100 * np.mean(gaps < 1e-9):.0f} % of them")

    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "tsp.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
