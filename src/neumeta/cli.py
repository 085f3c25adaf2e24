"""The ``neumeta`` command: train-base, fit, sample, eval, demo.

Every command's options are the fields of a config dataclass. A YAML file (``--config``) sets
any of them, with the same nesting (``fit: {steps: 3000}``); a flag on the command line
overrides both.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .analysis.recipe_benchmark import RecipeBenchmarkConfig, run as recipe_benchmark
from .coords import CoordConfig
from .experiment import DataConfig, DemoConfig, build_manifold, count_parameters, load_data, run_demo, train_base
from .inr import INRConfig
from .io import load_manifold, load_model, save_model
from .recipes import RECIPES, merge_recipe
from .train import FitConfig, fit

HELP = {
    # data
    "dataset": "dataset name (fashion-mnist)",
    "data_dir": "folder with the dataset files (default: $NEUMETA_DATA_DIR, the Debian package's folder, "
                "~/.cache/neumeta, then download)",
    "val_size": "training images held out for validation (model selection); the test split is only for final tables",
    "batch_size": "training batch size",
    "eval_batch_size": "batch size when evaluating",
    "train_size": "use only the first N training images (smoke runs; default: all)",
    # base / individual training
    "model": "registry name of the network (see `neumeta list-models`); for smooth also a model file",
    "epochs": "training epochs of the base model and of each individual baseline",
    "lr": "Adam learning rate of plain training (base model, individual baselines)",
    "seed": "random seed (data order, initialisation, width sampling)",
    "device": "torch device: cpu, cuda, cuda:1, ...",
    "out": "output file",
    "out_dir": "run folder: every artefact goes here; rerunning resumes from what is there",
    # fit
    "steps": "joint training steps of the manifold, after the pre-fit",
    "prefit_steps": "reconstruction-only steps before joint training",
    "fit_lr": "Adam learning rate of the INR",
    "warmup": "fraction of the joint steps with a linear learning-rate warm-up",
    "min_width": "narrowest width multiplier seen in training (0.5 = compression 50 %)",
    "max_width": "widest width multiplier seen in training",
    "per_group": "draw each channel group's width independently (else one multiplier for all)",
    "width_sampling": "how widths are drawn in the range: uniform, or narrow (density falling linearly "
                      "towards the widest, so the narrow end is trained more)",
    "recon_weight": "lambda_1: weight of the reconstruction loss (see docs for the exact formula)",
    "recon_rows": "fraction of full-width weight rows used to estimate the reconstruction loss each step",
    "recon_noise": "jitter the coordinates in the reconstruction loss too",
    "l2_weight": "lambda_2: weight of the squared L2 norm of the generated weights",
    "inplace_distill": "in-place distillation: the full width learns the labels, the sampled width its outputs",
    "sandwich": "sandwich rule: the narrowest width of the range is also trained every step",
    "original_distill": "the reference (pre-trained) network's outputs also teach every trained width (KD)",
    "original_distill_full": "with in-place distillation, the generated full width (the teacher) also learns the "
                             "reference network's outputs (KD)",
    "recon_reduction": "reconstruction loss per tensor: mean over elements, or sum (the paper's squared norms)",
    "guard": "divergence guard: roll back to the last good checkpoint on NaN/inf or a collapse to chance",
    "guard_retries": "rollbacks before fit stops with an error",
    "guard_lr_factor": "learning-rate multiplier at each rollback",
    "collapse_margin": "a width counts as collapsed at metric <= chance + margin * (1 - chance)",
    "quick": "one seed and a short schedule (a smoke run in minutes; not for conclusions)",
    "seeds": "seeds: each trains its own base and individual models and fits every variant",
    "variants": "variant names to run (default: the paper preset, the default and the ablation; candidate "
                "variants only when named, see neumeta.analysis.recipe_benchmark.candidate_flips and variants)",
    "ablation_seeds": "run the variants other than paper and default on these seeds only (some of --seeds); "
                      "the table then has two parts: paper and default over every seed, all variants on these",
    "results": "path stem of the written table (.md), raw numbers (.json) and plot (.png)",
    "recipe": "named recipe under the other options: default (chosen on validation) or paper (as published)",
    "ema": "decay of the exponential moving average of the INR used for evaluation",
    "grad_clip": "clip the INR's gradient norm to this (0 = off)",
    "eval_every": "validate (and checkpoint) every this many steps",
    "eval_widths": "width multipliers validated during fit; their mean accuracy selects the checkpoint",
    "select_widths": "widths whose mean validation accuracy selects the checkpoint instead (also validated)",
    "eval_samples": "noisy coordinate draws averaged per validation (1 = noise-free centres)",
    # coords / inr
    "size_terms": "add the paper's size coordinates L/N, C_in/N, C_out/N",
    "positions": "channel positions: center = (j+1/2)/C, index = j/C (paper)",
    "noise": "coordinate noise half-width, in channel cells (0.5 = the whole cell)",
    "hidden": "INR hidden width",
    "depth": "INR linear layers per block",
    "frequencies": "Fourier feature frequencies",
    # commands
    "base": "the trained full-width model (written by `neumeta train-base`)",
    "checkpoint": "training checkpoint (written atomically at every validation; default: OUT.ckpt)",
    "resume": "continue from the checkpoint if it exists",
    "manifold": "a manifold file written by `neumeta fit`",
    "width": "a width multiplier (0.5), or exact channels/multipliers per group (conv1=8,fc1=0.5)",
    "widths": "width multipliers to evaluate",
    "samples": "noisy coordinate draws averaged per weight (the paper's K)",
    "calibrate": "training batches (unlabelled) that calibrate each sampled network's activation statistics "
                 "to the full width's (neumeta.calibrate; 0 = off): several points at unseen narrow widths",
    "smooth": "reorder channels by the TSP smoothing permutation before fitting (same function, smoother weights)",
    "split": "which split to evaluate: val or test",
    "input_shape": "shape of one input (without the batch), for tracing",
}
RENAME = {("fit", "lr"): "fit_lr"}
SKIP = {("fit", "seed")}  # the command's own --seed sets it


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


# --------------------------------------------------------------------------- config plumbing
def _leaves(cls, path: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], path + (f.name,))
        elif path[-1:] + (f.name,) not in SKIP:
            out.append((path + (f.name,), f, hints[f.name]))
    return out


def _flag(path: Tuple[str, ...]) -> str:
    return RENAME.get(path[-2:], path[-1]) if len(path) > 1 else path[-1]


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (same names, same nesting)")
    for path, f, hint in _leaves(cls):
        name = _flag(path)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: Dict[str, Any] = dict(dest=".".join(path), default=argparse.SUPPRESS, metavar=name.upper(),
                                      help=f"{HELP.get(name, '')} (default: {default})".replace("%", "%%"))
        if typing.get_origin(hint) is typing.Union:  # Optional[X]: the flag takes an X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif origin in (list, tuple, collections.abc.Sequence):
            kwargs.update(nargs="+", type=args[0] if args and args[0] is not Ellipsis else float)
        else:
            kwargs["type"] = hint
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SystemExit(f"error: unknown option(s) {', '.join(sorted(unknown))} in {where}; "
                         f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise SystemExit(f"error: {where}.{key} must be a mapping of options")
            kwargs[key] = _build(hints[key], value, f"{where}.{key}")
        else:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: invalid options in {where}: {err}")


def load_config(cls, args: argparse.Namespace):
    """Defaults, then the YAML file, then command-line flags."""
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"error: config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {path} must hold a mapping of options")
        values.update(loaded)
    for dest, value in vars(args).items():
        if dest not in ("config", "command", "func"):
            _set(values, dest.split("."), value)
    if "recipe" in {f.name for f in dataclasses.fields(cls)}:
        if values.get("recipe", "default") not in RECIPES:
            raise SystemExit(f"error: unknown recipe {values['recipe']!r}; available: {', '.join(RECIPES)}")
        values = merge_recipe(values)  # the recipe, then the YAML file, then flags
    config = _build(cls, values, getattr(args, "config", None) or "options")
    if hasattr(config, "fit") and hasattr(config, "seed"):
        config.fit.seed = config.seed
    return config


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
    result = fit(manifold, data.task, data.train, data.val, c.fit, checkpoint=checkpoint, resume=c.resume)
    result.manifold.save(c.out, extra={"best_step": result.best_step, "history": result.history})
    print(f"best validation step {result.best_step} (mean {data.task.metric} {100 * result.best_score:.2f} %); "
          f"wrote {c.out}")


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


def cmd_recipe_benchmark(c: RecipeBenchmarkConfig) -> None:
    if c.quick and tuple(c.seeds) == (0, 1, 2):
        c.seeds = (0,)
    recipe_benchmark(c)


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
    "recipe-benchmark": (RecipeBenchmarkConfig, cmd_recipe_benchmark,
                         "every recipe variant over seeds against individual models (table + plot)"),
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="neumeta", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, func, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_options(p, cls)
        p.set_defaults(func=func, cls=cls)
    p = sub.add_parser("list-models", help="names of the registered models")
    p.set_defaults(func=cmd_list_models, cls=None)
    args = parser.parse_args(argv)
    if args.cls is None:
        return args.func(args)
    cls = args.cls
    del args.cls
    func = args.func
    del args.func
    try:
        func(load_config(cls, args))
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
