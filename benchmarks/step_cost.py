"""What a fit step costs, and how far it is from what the INR's arithmetic needs.

    PYTHONPATH=src python benchmarks/step_cost.py                  # this machine's CPU
    PYTHONPATH=src python benchmarks/step_cost.py --device cuda    # a GPU
    PYTHONPATH=src python benchmarks/step_cost.py --steps 2 --models lenet   # a quick look
    PYTHONPATH=src python benchmarks/step_cost.py --models resnet20 --hidden 256 64 --options 1,off 0.25,on
    PYTHONPATH=src python benchmarks/step_cost.py --precision float32 bfloat16    # the INR's matmuls in bf16
    PYTHONPATH=src python benchmarks/step_cost.py --models resnet20 --recipes inr \
        --set sandwich=false original_distill=false train_calibrated=true --options 0.25,off   # a leaner recipe
    PYTHONPATH=src python benchmarks/step_cost.py --models resnet20 --recipes inr --steps 8 \
        --set train_calibrated=true original_distill=false --vary full_every=1,2,4   # one row per value

For LeNet (Fashion-MNIST), ResNet-20 with every channel group morphed and ResNet-20 with the
paper's groups (``groups="paper"``, the last block of layer3; Fashion-MNIST padded to 3x32x32),
batches of 128, a fresh base network and a manifold built from it (no permutation: it changes
no cost), one row per training recipe (``--recipes``: ``inr`` trains the full width and two
narrower ones every step, with in-place and original-model distillation; the default also trains
its grid's networks beside them; the paper's one width, no distillation) and option: ``tensor_subset`` 1.0 and 0.25 (the
fraction of tensors whose INR blocks get gradients each step), the batched INR path off and on.
Each row gives

- fit step / plain step: a joint fit step of the row's recipe (``recipe_benchmark.fit_step_seconds``)
  against a plain training step of the full network (``plain_step_seconds``), timed back to back
  in one process, so load from other jobs slows both alike;
- the INR's matmul FLOPs per step (the rows it really generates, forward, and backward where
  autograd runs; padding rows of the batched path not counted), the time they take at the dense
  matmul rate measured in the same row (fp32, square 1024 matrices: the machine's bound), and
  that time as a fraction of the measured fit step: how much of the step is arithmetic the INR
  must do, the rest being overhead (launches, Python, memory traffic, the task networks);
- peak memory of the timed fit (EMA copy and optimizer state included): on a GPU
  ``torch.cuda.max_memory_allocated`` above what was allocated before, on a CPU the rise of the
  peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``; freed memory is given
  back first with ``malloc_trim``).

A second table times sampling: the K = 50 noisy draws of width 0.5's weights
(``mean_row_values``, the INR's part of ``sample``), one draw per INR call (the default on a
CPU) against the draws stacked into calls of up to 2**17 rows (the default on a GPU), best of 3,
back to back.

Appends a section (date, device, threads, steps) to ``benchmarks/results/step-cost.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` as a package, whatever the working directory
try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(ROOT / "src"))
from benchmarks.recipe_benchmark import device_name, fit_step_seconds, plain_step_seconds
from neumeta.config import parse_overrides
from neumeta.coords import CoordConfig
from neumeta.experiment import DataConfig, build_manifold, load_data
from neumeta.inr import PRECISIONS, BlockMLP
from neumeta.models import create_model
from neumeta.recipes import recipe, recipe_inr
from neumeta.train import FitConfig

RESULTS = Path(__file__).resolve().parent / "results" / "step-cost.md"
# (label, registry model, dataset, WidthSpace groups)
MODELS = {"lenet": ("lenet", "fashion-mnist", None),
          "resnet20": ("resnet20", "fashion-mnist-32x3", None),
          "resnet20-paper": ("resnet20", "fashion-mnist-32x3", "paper")}
OPTIONS = [(1.0, False), (0.25, False), (1.0, True), (0.25, True)]  # (tensor_subset, batched)
HEADER = """# Fit step cost

Written by `benchmarks/step_cost.py` (see its docstring for what each column measures).
"fit ÷ plain": a fit step of the row's recipe over a plain step of the full network; "INR at the bound":
the INR's matmul FLOPs of one step at the matmul rate measured beside it; "of the step": that
over the fit step (1.0 = the step does nothing but the INR's arithmetic at full speed).
"""
COLUMNS = ("| model | recipe | INR hidden | INR precision | tensors (rows at full width) | tensor_subset | batched INR | plain step (ms) | fit step (ms) "
           "| fit ÷ plain | INR GFLOP / step | matmul GFLOP/s | INR at the bound (ms) | of the step | peak memory (MiB) |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def matmul_gflops(device: str, n: int = 1024, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The best dense matmul rate of ``reps`` square ``n`` products in ``dtype``: the bound."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def row_flops(inr: BlockMLP) -> tuple:
    """(forward, backward) matmul FLOPs per generated row: the backward takes every weight's
    gradient and every layer's input gradient but the first's (the Fourier features need none)."""
    in_dim, h = inr.w_in.shape[1:]
    hidden, out = inr.w_hidden.shape[1], inr.w_out.shape[2]
    forward = 2 * (in_dim * h + hidden * h * h + h * out)
    return forward, forward + 2 * (hidden * h * h + h * out)


@contextlib.contextmanager
def counting_flops(inr: BlockMLP) -> Iterator[List[float]]:
    """Counts the INR's matmul FLOPs of the real rows it runs (autograd on or off) into [total]."""
    forward, backward = row_flops(inr)
    total = [0.0]
    original = inr.forward

    def counted(inputs, block_ids, batched=False):
        rows = sum(x.shape[0] for x in inputs)
        total[0] += rows * (forward + (backward if torch.is_grad_enabled() else 0))
        return original(inputs, block_ids, batched=batched)

    inr.forward = counted
    try:
        yield total
    finally:
        del inr.forward


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[Dict[str, float]]:
    """{"mib": peak rise in MiB} of what runs inside (see the module docstring); NaN where the
    CPU's peak cannot be reset (not Linux)."""
    result = {"mib": float("nan")}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _rss_kib("VmRSS")
    except OSError:
        yield result
        return
    yield result
    result["mib"] = (_rss_kib("VmHWM") - before) / 1024


def fresh_manifold(label: str, data, device: str, coords=None, hidden: Optional[int] = None,
                   precision: str = "float32", recipe_name: str = "default"):
    """A manifold of a freshly initialised ``label`` network (no permutation: it changes no cost);
    ``hidden``: the INR's width (None: the library's default); ``precision``: its matmuls';
    ``recipe_name``: whose INR options (with or without the grid)."""
    name, _, groups = MODELS[label]
    torch.manual_seed(0)
    inr = recipe_inr(recipe_name, precision=precision, **({} if hidden is None else {"hidden": hidden}))
    return build_manifold(create_model(name).to(device), data.example.to(device), inr=inr,
                          coords=coords or CoordConfig(), groups=groups, smoothing=False,
                          log=lambda *_: None).to(device)


def measure(label: str, data, device: str, subset: float, batched: bool, steps: int,
            recipe_name: str = "default", hidden: Optional[int] = None, precision: str = "float32",
            options: Optional[Dict[str, object]] = None) -> dict:
    """One row: fit and plain steps back to back, the INR's FLOPs, the matmul rate, peak memory.
    ``options``: FitConfig fields set over the recipe's (``--set``); the row's recipe names them."""
    name = MODELS[label][0]
    config, coords = recipe(recipe_name, tensor_subset=subset, **(options or {}))
    manifold = fresh_manifold(label, data, device, coords, hidden, precision, recipe_name)
    if options:
        recipe_name += ", " + ", ".join(f"{k}={v}" for k, v in options.items())
    manifold.batched = batched
    with warnings.catch_warnings():  # timing fits of a fresh INR: what they warn about is not measured here
        warnings.simplefilter("ignore")
        fit_step_seconds(manifold, data, config, 1)  # warm-up
        with counting_flops(manifold.inr) as once:  # what a fit call costs besides its steps
            fit_step_seconds(manifold, data, config, 0)
        with counting_flops(manifold.inr) as flops, peak_memory(device) as memory:
            fit_s = fit_step_seconds(manifold, data, config, steps)
    plain_s = plain_step_seconds(name, data, 1e-3, 0, device, 2 * steps + 5)
    rate = matmul_gflops(device, dtype=PRECISIONS[precision])
    gflop = (flops[0] - once[0]) / steps / 1e9
    rows = sum(c.shape[0] for c, _ in manifold._coordinates(manifold.space.full))
    return {"model": label, "recipe": recipe_name, "hidden": manifold.inr_config.hidden, "precision": precision, "tensors": len(manifold.specs), "rows": rows, "subset": subset, "batched": batched,
            "plain_ms": 1e3 * plain_s, "fit_ms": 1e3 * fit_s, "gflop": gflop, "rate": rate,
            "bound_ms": 1e3 * gflop / rate, "memory_mib": memory["mib"]}


def sampling_row(label: str, data, device: str, samples: int = 50, repeats: int = 3) -> str:
    """K noisy draws of width 0.5's weights, one INR call per draw against stacked draws."""
    manifold = fresh_manifold(label, data, device, recipe_name="inr")  # width 0.5 from the INR, not a grid
    counts = manifold.space.resolve(0.5)
    seconds = {}
    for batch_rows in (0, 1 << 17) * repeats:  # alternating, so load from other jobs hits both alike
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        manifold.mean_row_values(counts, samples, batch_rows=batch_rows)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds[batch_rows] = min(seconds.get(batch_rows, float("inf")), time.perf_counter() - started)
    one, stacked = seconds[0], seconds[1 << 17]
    return f"| {label} | {samples} | {1e3 * one:.0f} | {1e3 * stacked:.0f} | {one / stacked:.1f} |\n"


SAMPLING_COLUMNS = ("\n| model | K | one draw per INR call (ms) | draws stacked (ms) | speed-up |\n"
                    "|---|---|---|---|---|\n")


def table_row(r: dict) -> str:
    return (f"| {r['model']} | {r['recipe']} | {r['hidden']} | {r['precision']} | {r['tensors']} ({r['rows']:,}) | {r['subset']:g} | {'on' if r['batched'] else 'off'} "
            f"| {r['plain_ms']:.1f} | {r['fit_ms']:.0f} | {r['fit_ms'] / r['plain_ms']:.1f} | {r['gflop']:.2f} "
            f"| {r['rate']:.0f} | {r['bound_ms']:.0f} | {r['bound_ms'] / r['fit_ms']:.2f} | {r['memory_mib']:.0f} |\n")


def parse_option(text: str) -> tuple:
    """"0.25,on" -> (0.25, True): one (tensor_subset, batched INR) pair of ``--options``."""
    subset, _, batched = text.partition(",")
    try:
        fraction = float(subset)
    except ValueError:
        fraction = None
    if fraction is None or batched not in ("on", "off"):
        raise SystemExit(f"--options: {text!r} is not SUBSET,on or SUBSET,off")
    return fraction, batched == "on"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="fit steps timed per row (plain steps: 2x + 5)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--note", default="", help="a line written under the section's heading")
    parser.add_argument("--recipes", nargs="+", default=["default", "inr", "paper"],
                        help="training recipes timed (neumeta.recipes): inr trains 2-3 widths a step with "
                             "distillation, the default also its grid's networks, the paper's one width")
    parser.add_argument("--hidden", nargs="+", type=int, default=[None],
                        help="INR widths timed (default: the library's); issue 22's every-layer ResNet-20 "
                             "is measured with a narrower INR too")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=list(PRECISIONS),
                        help="INRConfig.precision values timed: the dtype of the INR's matmuls (the bound's "
                             "rate is measured in the same dtype)")
    parser.add_argument("--options", nargs="+", default=None, metavar="SUBSET,BATCHED",
                        help="(tensor_subset, batched) pairs to time, e.g. 1,off 0.25,on (default: all four)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="FitConfig fields set over every recipe timed, e.g. sandwich=false (values read as YAML)")
    parser.add_argument("--vary", default=None, metavar="FIELD=V1,V2,...",
                        help="one row per value of this FitConfig field, each over --set, e.g. full_every=1,2,4")
    parser.add_argument("--no-fit", action="store_true", help="only the sampling table")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    fit_options = parse_overrides(args.set, {"fit": FitConfig}, default="fit")["fit"]
    varied = [fit_options]
    if args.vary:
        field, _, values = args.vary.partition("=")
        varied = [{**fit_options, **parse_overrides([f"{field}={v}"], {"fit": FitConfig}, default="fit")["fit"]}
                  for v in values.split(",")]
    started = time.perf_counter()
    section = ""
    datasets: Dict[str, object] = {}
    for label in args.models:
        dataset = MODELS[label][1]
        if dataset not in datasets:
            datasets[dataset] = load_data(DataConfig(dataset=dataset), 0)
        options = OPTIONS if args.options is None else [parse_option(o) for o in args.options]
        for recipe_name, hidden, precision, (subset, batched), fields in ([] if args.no_fit else
                                                       [(r, h, p, o, f) for r in args.recipes for h in args.hidden
                                                        for p in args.precision for o in options for f in varied]):
            row = table_row(measure(label, datasets[dataset], args.device, subset, batched, args.steps,
                                    recipe_name, hidden, precision, fields))
            print(row, end="", flush=True)
            section += row
    sampling = ""
    for label in args.models:
        row = sampling_row(label, datasets[MODELS[label][1]], args.device)
        print(row, end="", flush=True)
        sampling += row
    minutes = (time.perf_counter() - started) / 60
    heading = (f"\n## {time.strftime('%Y-%m-%d')}, {device_name(args.device)}, "
               f"{'sampling only' if args.no_fit else f'{args.steps} fit steps per row'} "
               f"({minutes:.0f} min)\n\n" + (f"{args.note}\n\n" if args.note else ""))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    text = results.read_text() if results.exists() else HEADER
    results.write_text(text + heading + (COLUMNS + section if section else "") + SAMPLING_COLUMNS + sampling)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
