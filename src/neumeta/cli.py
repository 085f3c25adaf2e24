"""The ``neumeta`` command: train-base, fit, sample, eval, smooth, demo.

Every command's options are the fields of a config dataclass. A YAML file (``--config``) sets
any of them, with the same nesting (``fit: {steps: 3000}``); a flag on the command line
overrides both. One file serves every command: each takes its own options from it and ignores
the others' (``neumeta.config``).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

from .config import add_options, load_config
from .coords import CoordConfig
from .experiment import DataConfig, DemoConfig, build_manifold, count_parameters, load_data, run_demo, train_base
from .inr import INRConfig
from .io import load_manifold, load_model, save_model
from .train import DivergenceError, FitConfig, NeverLearnedWarning, fit

@dataclass
class TrainBaseConfig:
    model: str = "lenet"
    epochs: int = 4
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/base.safetensors"
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class FitCommandConfig:
    base: str = "runs/base.safetensors"
    out: str = "runs/manifold.neumeta"
    checkpoint: Optional[str] = None
    resume: bool = False
    smooth: bool = True
    recipe: str = "default"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    coords: CoordConfig = field(default_factory=CoordConfig)
    inr: INRConfig = field(default_factory=INRConfig)


@dataclass
class SampleConfig:
    manifold: str = "runs/manifold.neumeta"
    width: str = "0.5"
    samples: int = 50
    calibrate: int = 20
    seed: int = 0
    out: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)  # the calibration inputs


@dataclass
class SmoothConfig:
    model: str = "runs/base.safetensors"
    input_shape: Sequence[int] = (1, 28, 28)
    seed: int = 0
    out: Optional[str] = None


@dataclass
class EvalConfig:
    manifold: str = "runs/manifold.neumeta"
    widths: Sequence[float] = (1.0, 0.75, 0.5, 0.25)
    samples: int = 50
    calibrate: int = 20
    split: str = "test"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)


def _parse_width(text: str):
    if "=" not in text:
        return float(text)
    widths = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not name or not value:
            raise SystemExit(f"error: --width: cannot read {part!r}; use group=channels or group=multiplier")
        widths[name.strip()] = float(value) if "." in value else int(value)
    return widths


# --------------------------------------------------------------------------- commands
def cmd_train_base(c: TrainBaseConfig) -> None:
    data = load_data(c.data, c.seed)
    model = train_base(c.model, data, c.epochs, c.lr, c.seed, c.device)
    val = data.task.evaluate(model, data.val, c.device)
    save_model(model, c.out)
    print(f"{c.model}: {count_parameters(model):,} parameters, validation {data.task.metric} "
          f"{100 * val[data.task.metric]:.2f} %; wrote {c.out}")


def cmd_fit(c: FitCommandConfig) -> None:
    data = load_data(c.data, c.seed)
    base = load_model(c.base).to(c.device)
    manifold = build_manifold(base, data.example.to(c.device), c.inr, c.coords, smoothing=c.smooth,
                              seed=c.seed).to(c.device)
    checkpoint = c.checkpoint or f"{c.out}.ckpt"
    with warnings.catch_warnings():  # said once, below, after the manifold is written
        warnings.simplefilter("ignore", NeverLearnedWarning)
        result = fit(manifold, data.task, data.train, data.val, c.fit, checkpoint=checkpoint, resume=c.resume)
    result.manifold.save(c.out, extra={"best_step": result.best_step, "history": result.history,
                                       "learned": result.learned})
    print(f"best validation step {result.best_step} (mean {data.task.metric} {100 * result.best_score:.2f} %); "
          f"wrote {c.out}")
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)


def _calibration(manifold, c, data=None) -> dict:
    """``sample``'s calibration arguments: the first ``c.calibrate`` training batches, or none."""
    from .calibrate import calibration_inputs
    if c.calibrate < 0:
        raise SystemExit(f"error: --calibrate must be a number of batches >= 0 (0 = off), not {c.calibrate}")
    batches = c.calibrate
    if batches == 0:
        return {}
    data = data or load_data(c.data, c.seed)
    example = manifold.space.example_inputs
    if tuple(data.example.shape[1:]) != tuple(example.shape[1:]):
        raise SystemExit(f"error: --calibrate needs inputs shaped like the manifold's network "
                         f"{tuple(example.shape[1:])}, but dataset {c.data.dataset!r} gives "
                         f"{tuple(data.example.shape[1:])}; name the right --dataset or pass --calibrate 0")
    return {"calibration": manifold.calibration_reference(calibration_inputs(data.train, batches), c.samples,
                                                          c.seed, batches)}


def cmd_sample(c: SampleConfig) -> None:
    manifold = load_manifold(c.manifold)
    width = _parse_width(c.width)
    counts = manifold.space.resolve(width)
    module = manifold.sample(counts, samples=c.samples, seed=c.seed, **_calibration(manifold, c))
    full = count_parameters(manifold.space.model)
    out = c.out or f"{Path(c.manifold).with_suffix('')}_w{c.width.replace('=', '').replace(',', '_')}.safetensors"
    save_model(module, out)
    note = " (outside the trained range: extrapolated)" if manifold.space.is_extrapolation(counts) else ""
    print(f"channels: {json.dumps(counts)}{note}")
    report = getattr(module, "neumeta_calibration", None)
    if report is not None:
        print(f"calibrated: {len(report.layers)} layers on {report.batches} training batches of {c.data.dataset} "
              f"(largest channel rescale x{report.max_scale:.2f})")
    print(f"parameters: {count_parameters(module):,} of {full:,} ({100 * count_parameters(module) / full:.1f} % of full)")
    from .flops import count_flops
    one = manifold.space.example_inputs  # per-sample FLOPs: a batch of one
    one = tuple(t[:1] for t in one) if isinstance(one, (tuple, list)) else one[:1]
    flops, full_flops = count_flops(module, one), count_flops(manifold.space.model, one)
    print(f"FLOPs per sample: {flops:,} of {full_flops:,} ({100 * flops / max(full_flops, 1):.1f} % of full)")
    print(f"wrote {out}")


def cmd_eval(c: EvalConfig) -> None:
    if c.split not in ("val", "test"):
        raise SystemExit(f"error: --split must be val or test, not {c.split!r}")
    manifold = load_manifold(c.manifold, map_location=c.device)
    data = load_data(c.data, c.seed)
    batches = data.val if c.split == "val" else data.test
    print(f"| width | γ | channels | params | {c.split} {data.task.metric} % |")
    print("|---|---|---|---|---|")
    calibration = _calibration(manifold, c, data)  # the full width measured once for every width
    for width in c.widths:
        counts = manifold.space.resolve(width)
        module = manifold.sample(counts, samples=c.samples, seed=c.seed, **calibration)
        score = data.task.evaluate(module, batches, c.device)[data.task.metric]
        print(f"| {width:g} | {100 * (1 - width):.1f} % | {'/'.join(map(str, counts.values()))} | "
              f"{count_parameters(module):,} | {100 * score:.2f} |")


def cmd_smooth(c: SmoothConfig) -> None:
    import torch
    from .models import create_model, list_models
    from .smooth import smooth
    if Path(c.model).is_file():
        model = load_model(c.model)
    elif c.model in list_models():
        model = create_model(c.model)
    else:
        raise FileNotFoundError(f"--model {c.model!r} is neither a model file nor a registry name "
                                f"({', '.join(list_models())})")
    example = torch.zeros((2,) + tuple(c.input_shape))
    permuted, report = smooth(model, example, seed=c.seed)
    print(report.table())
    out = c.out or (f"{Path(c.model).with_suffix('')}_smooth.safetensors" if Path(c.model).is_file()
                    else f"{c.model}_smooth.safetensors")
    save_model(permuted, out)
    print(f"wrote {out}")


def cmd_demo(c: DemoConfig) -> None:
    run_demo(c)


def cmd_list_models(_args) -> None:
    from .models import list_models
    print("\n".join(list_models()))


COMMANDS = {
    "train-base": (TrainBaseConfig, cmd_train_base, "train the full-width model on a dataset"),
    "fit": (FitCommandConfig, cmd_fit, "learn the weight manifold of a trained model"),
    "sample": (SampleConfig, cmd_sample, "write a standalone network of a requested width"),
    "eval": (EvalConfig, cmd_eval, "accuracy of networks sampled at several widths"),
    "smooth": (SmoothConfig, cmd_smooth, "reorder channels to lower total variation (same function)"),
    "demo": (DemoConfig, cmd_demo, "LeNet / Fashion-MNIST end to end: manifold vs individual models"),
}
# every command's config: what one YAML file may hold, whichever command reads it
CONFIGS = tuple(cls for cls, _, _ in COMMANDS.values())


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neumeta", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, func, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        add_options(p, cls)
        p.set_defaults(func=func, cls=cls)
    p = sub.add_parser("list-models", help="names of the registered models")
    p.set_defaults(func=cmd_list_models, cls=None)
    return parser


def parse_command(argv: Optional[Sequence[str]] = None) -> Tuple[Callable, Any]:
    """(the command's function, its config): defaults, then the YAML file, then the flags."""
    args = make_parser().parse_args(argv)
    func, cls = args.func, args.cls
    del args.func, args.cls
    return func, (args if cls is None else load_config(cls, args, commands=CONFIGS))


def run_reporting_errors(func: Callable, config) -> None:
    """``func(config)``; a known error (bad input, a diverged fit) is one ``error:`` line and exit
    code 2, anything else keeps its traceback (a bug)."""
    try:
        func(config)
    except (DivergenceError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # no repr quotes
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_reporting_errors(*parse_command(argv))


if __name__ == "__main__":
    main()
