"""How well the INR holds every tensor of ResNet-20 after the pre-fit, per tensor.

    PYTHONPATH=src python benchmarks/reconstruction.py                      # every group, 3 variants
    PYTHONPATH=src python benchmarks/reconstruction.py --steps 50 --variants paper   # a quick look

A ResNet-20 trained on the 32x32 three-channel Fashion-MNIST stand-in (``--base``, or one trained
here for ``--epochs`` on ``--train-size`` images and kept in ``--out-dir``), every channel group
morphing (``--groups paper``: only the paper's block), permuted for smoothness as ``fit`` sees it.
Each variant runs ``nm.fit`` with ``--steps`` pre-fit steps and no joint step, and the table gives
``FitResult.reconstruction``: each generated tensor's relative error ||W - W0|| / ||W0|| at full
width (noise-free INR values), the share of tensors within 0.05, the INR's full width's accuracy
on ``--eval-size`` validation images beside the base model's, and the pre-fit's seconds per
step. Variants:

- ``paper``: the paper's encoding (powers of two of each coordinate) and the default loss;
- ``gaussian``: ``INRConfig(encoding="gaussian")``, the default loss;
- ``gaussian+relative``: and ``FitConfig(recon_reduction="relative")``, every tensor weighed by
  its own scale;
- ``gaussian+relative, no noise``: and ``recon_noise=False``: the pre-fit sees the channels'
  centres only (the others jitter them by up to half a channel's cell, as the joint steps do);
- ``gaussian+relative, no noise, decaying``: and ``prefit_decay=True``, the pre-fit's learning
  rate decays to zero (a cosine) instead of staying constant;
- ``gaussian x64+relative, no noise, decaying``: and 64 random features instead of 16
  (``INRConfig(frequencies=64)``), so rows of a 64-channel tensor are far apart in the MLP's input;
- ``gaussian x64+relative, decaying``: the same with the coordinate noise on (each channel over
  its whole cell, which is what narrower widths read).

Writes ``benchmarks/results/reconstruction.md`` (``--results``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(ROOT / "src"))
import neumeta as nm
from benchmarks.recipe_benchmark import device_name
from neumeta.config import ConfigError, parse_overrides
from neumeta.experiment import DataConfig, build_manifold, count_parameters, load_data, train_base
from neumeta.io import atomic_write

VARIANTS = {
    "paper": (dict(encoding="powers"), dict(recon_reduction="mean")),
    "gaussian": (dict(encoding="gaussian"), dict(recon_reduction="mean")),
    "gaussian+relative": (dict(encoding="gaussian"), dict(recon_reduction="relative")),
    "gaussian+relative, no noise": (dict(encoding="gaussian"), dict(recon_reduction="relative", recon_noise=False)),
    "gaussian+relative, no noise, decaying": (dict(encoding="gaussian"),
                                              dict(recon_reduction="relative", recon_noise=False, prefit_decay=True)),
    "gaussian x64+relative, no noise, decaying": (dict(encoding="gaussian", frequencies=64),
                                                  dict(recon_reduction="relative", recon_noise=False, prefit_decay=True)),
    "gaussian x64+relative, decaying": (dict(encoding="gaussian", frequencies=64),
                                        dict(recon_reduction="relative", prefit_decay=True)),
}


NARROWER = (0.75, 0.5)  # validated after the pre-fit with the full width: the joint phase starts from these


def base_model(args, data) -> torch.nn.Module:
    """``--base``, or a ResNet-20 trained here once and kept."""
    path = Path(args.base) if args.base else Path(args.out_dir) / "base.safetensors"
    if path.exists():
        return nm.load_model(path)
    if args.base:
        raise FileNotFoundError(f"--base {path}: no such file")
    model = train_base("resnet20", data, args.epochs, 1e-3, args.seed, args.device, desc="base resnet20")
    path.parent.mkdir(parents=True, exist_ok=True)
    nm.save_model(model, path)
    return model


def prefit(base, data, variant: str, args) -> dict:
    """One variant's pre-fit: per-tensor relative errors and seconds per step (cached as JSON)."""
    slug = variant.replace("+", "-").replace(", ", "-").replace(" ", "-")
    slug += "".join(f"-{item}" for item in ([f"hidden={args.hidden}"] if args.hidden != 256 else []) + args.set)
    cache = Path(args.out_dir) / f"{slug}-{args.groups or 'every'}-{args.steps}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    inr_options, fit_options = VARIANTS[variant]
    inr_options = {**inr_options, **args.overrides["inr"]}  # --set, e.g. inr.frequencies=64 fit.lr=0.003
    fit_options = {**fit_options, **args.overrides["fit"]}
    manifold = build_manifold(base, data.example, nm.INRConfig(hidden=args.hidden, **inr_options),
                              groups=args.groups, seed=args.seed, log=lambda *_: None).to(args.device)
    # validated once, at the end: the full width's accuracy, the INR's and the base model's
    config = nm.FitConfig(prefit_steps=args.steps, steps=0, seed=args.seed, eval_widths=(1.0, *NARROWER),
                          eval_every=10 ** 9, **fit_options)
    started = time.perf_counter()
    with warnings.catch_warnings():  # the table says what the warning would
        warnings.simplefilter("ignore")
        result = nm.fit(manifold, data.task, data.train, data.val, config)
    seconds = time.perf_counter() - started
    row = {"errors": result.reconstruction, "seconds_per_step": seconds / max(1, args.steps),
           "inr_parameters": count_parameters(manifold.inr), "full_width": result.full_width,
           "narrower": {f"{w:g}": result.history[-1][f"val_accuracy@{w:g}"] for w in NARROWER}}
    atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(row, indent=1)))
    return row


def table(rows: dict) -> str:
    names = list(next(iter(rows.values()))["errors"])
    lines = [f"| tensor | {' | '.join(rows)} |", "|---|" + "---|" * len(rows)]
    for name in names:
        cells = [rows[v]["errors"][name] for v in rows]
        best = min(cells)
        lines.append(f"| {name} | " + " | ".join(f"**{c:.3f}**" if c == best else f"{c:.3f}" for c in cells) + " |")
    summary = {
        "largest": lambda e: f"{max(e):.3f}",
        "median": lambda e: f"{sorted(e)[len(e) // 2]:.3f}",
        "within 0.05": lambda e: f"{sum(x <= 0.05 for x in e)} of {len(e)}",
    }
    for label, cell in summary.items():
        lines.append(f"| *{label}* | " + " | ".join(cell(list(r["errors"].values())) for r in rows.values()) + " |")
    if any(r.get("full_width") for r in rows.values()):  # results cached before it was measured lack it
        lines.append("| *full width, validation accuracy: INR (base)* | " + " | ".join(
            f"{100 * r['full_width']['inr']:.2f} ({100 * r['full_width']['reference']:.2f})" if r.get("full_width")
            else "–" for r in rows.values()) + " |")
    for w in NARROWER:
        if any(r.get("narrower") for r in rows.values()):
            lines.append(f"| *width {w:g}, validation accuracy (noise-free)* | " + " | ".join(
                f"{100 * r['narrower'][f'{w:g}']:.2f}" if r.get("narrower") else "–" for r in rows.values()) + " |")
    lines.append("| *seconds per pre-fit step* | " + " | ".join(f"{r['seconds_per_step']:.2f}" for r in rows.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="a trained ResNet-20 (.safetensors); default: train one in --out-dir")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000, help="pre-fit steps")
    parser.add_argument("--hidden", type=int, default=256, help="INR width (the library's default)")
    parser.add_argument("--groups", default=None, help="paper: the paper's block only; default every group")
    parser.add_argument("--epochs", type=int, default=4, help="the base model's epochs, when trained here")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--eval-size", type=int, default=2000, help="validation images for the full width's accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="runs/reconstruction")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/reconstruction.md"))
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a variant's options, e.g. inr.frequencies=64 fit.lr=0.003 (section inr or fit)")
    args = parser.parse_args(argv)
    try:
        args.overrides = parse_overrides(args.set, {"inr": nm.INRConfig, "fit": nm.FitConfig})
    except ConfigError as err:
        parser.error(str(err))
    data = load_data(DataConfig(dataset="fashion-mnist-32x3", train_size=args.train_size, eval_size=args.eval_size),
                     args.seed)
    base = base_model(args, data).to(args.device)
    rows = {v: prefit(base, data, v, args) for v in args.variants}
    head = (f"ResNet-20, {'every group' if not args.groups else 'groups=' + args.groups} morphing, "
            f"{args.steps} pre-fit steps, INR {args.hidden} wide"
            + "".join(f", {item}" for item in args.set) + " "
            f"({next(iter(rows.values()))['inr_parameters']:,} parameters); {device_name(args.device)}, "
            f"{time.strftime('%Y-%m-%d')}. Relative error ||W - W0|| / ||W0|| at full width; best per row in bold.")
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    text = f"`python benchmarks/reconstruction.py {command}`\n\n{head}\n\n{table(rows)}\n"
    print(text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.results), lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    main()
