"""The ``neumeta`` command: train-base, fit, sample, eval, smooth, demo.

Every command's options are the fields of a config dataclass. A YAML file (``--config``) sets
any of them, with the same nesting (``fit: {steps: 3000}``); a flag on the command line
overrides both. One file serves every command: each takes its own options from it and ignores
the others' (``neumeta.config``).

Everything a command can check is checked before its work starts: option types and devices
(``neumeta.config``), output paths, that the base model fits the data, existing checkpoints.
A known error is one ``error:`` line and exit code 2; Ctrl-C is one line and exit code 130.
``neumeta fit`` also runs under torchrun (one process per device, gloo or NCCL).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

from .config import ConfigError, add_options, load_config
from .compare import CompareConfig, compare
from .coords import CoordConfig
from .experiment import (DataConfig, DemoConfig, build_manifold, check_model_fits_data, count_parameters, load_data,
                         run_demo, train_base)
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
    overwrite: bool = False
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
    """``--width``: a multiplier (0.5) or ``group=channels,group=multiplier``; the manifold's
    ``WidthSpace.resolve`` then checks the values."""
    if "=" not in text:
        return _number(text, text)
    widths = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not name.strip() or not value.strip():
            raise ValueError(f"--width: cannot read {part!r}; use group=channels or group=multiplier")
        widths[name.strip()] = _number(value, part)
    return widths


def _number(value: str, part: str):
    """An int is a channel count, anything else a multiplier."""
    try:
        return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
    except ValueError:
        raise ValueError(f"--width: {part!r} is not a number; use a multiplier (0.5) or "
                         "group=channels / group=multiplier") from None


# --------------------------------------------------------------------------- checks before work
def check_output_file(path, option: str) -> None:
    """Refuse an output path that is a folder or cannot be written, before any work is done:
    an error at the end would lose the work."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; name a file in it, e.g. {path / 'out'}")
    parent = path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {path}: {existing} is a file, so no folder can be made there")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.probe."):
            pass
    except OSError as err:
        raise PermissionError(f"{option} {path}: cannot write in {parent} ({err.strerror or err})") from err


def check_fit_files(c: "FitCommandConfig", checkpoint: str) -> None:
    """``--resume`` and ``--overwrite`` say what to do with an earlier run's files; without either,
    none is replaced."""
    check_output_file(c.out, "--out")
    check_output_file(checkpoint, "--checkpoint")
    if c.resume and c.overwrite:
        raise ConfigError("--resume continues the checkpoint and --overwrite replaces it: pass one of them")
    if c.resume and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {checkpoint} to continue (fit without --resume "
                                "to start a run)")
    if not c.resume and not c.overwrite:
        for path, what in ((checkpoint, "the checkpoint of an earlier fit"), (c.out, "a manifold")):
            if Path(path).exists():
                raise FileExistsError(f"{path} exists ({what}); pass --resume to continue that fit, or "
                                      "--overwrite to start afresh and replace it")


def seed_everything(seed: int) -> None:
    """Seed torch's generators before anything random is built (the INR's initial weights)."""
    import torch
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- torchrun
def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_process_group(device: str) -> str:
    """Under torchrun: join the process group (NCCL on CUDA, else gloo); returns this process's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    import torch
    import torch.distributed as dist
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def leave_process_group(finished: bool) -> None:
    """Destroy the process group, if any. ``finished``: every rank got here without an error, so
    all first meet at a barrier: no rank tears its connections down while another still reads
    from them (under load that aborted a gloo process at exit). After an error, no barrier: the
    other ranks may never arrive (a rank that finished waits at its barrier for a failed one
    until torchrun, seeing the failure, stops every rank)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- commands
def cmd_train_base(c: TrainBaseConfig) -> None:
    check_output_file(c.out, "--out")
    data = load_data(c.data, c.seed)
    model = train_base(c.model, data, c.epochs, c.lr, c.seed, c.device)
    val = data.task.evaluate(model, data.val, c.device)
    save_model(model, c.out)
    print(f"{c.model}: {count_parameters(model):,} parameters, validation {data.task.metric} "
          f"{100 * val[data.task.metric]:.2f} %; wrote {c.out}")


def cmd_fit(c: FitCommandConfig) -> None:
    import torch.distributed as dist
    checkpoint = c.checkpoint or f"{c.out}.ckpt"
    check_fit_files(c, checkpoint)
    base = load_model(c.base)
    device = join_process_group(c.device)
    finished = False
    try:
        data = load_data(c.data, c.seed)
        check_model_fits_data(base, data, f"--base {c.base}")
        # built on the CPU whatever the device: the same base gives the same reference bit for bit,
        # which the checkpoint's fingerprint of it relies on
        manifold = build_manifold(base, data.example, c.inr, c.coords, smoothing=c.smooth, seed=c.seed).to(device)
        with warnings.catch_warnings():  # said once, below, after the manifold is written
            warnings.simplefilter("ignore", NeverLearnedWarning)
            result = fit(manifold, data.task, data.train, data.val, c.fit, checkpoint=checkpoint, resume=c.resume,
                         overwrite=c.overwrite)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_fit_result(result, c.out, data.task.metric)
        finished = True
    finally:
        leave_process_group(finished)


def write_fit_result(result, out: str, metric: str) -> None:
    """Rank 0's part of ``fit``: the manifold file and the summary."""
    result.manifold.save(out, extra={"best_step": result.best_step, "history": result.history,
                                     "learned": result.learned})
    print(f"best validation step {result.best_step} (mean {metric} {100 * result.best_score:.2f} %); wrote {out}")
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)


def _calibration(manifold, c, data=None) -> dict:
    """``sample``'s calibration arguments: the first ``c.calibrate`` training batches, or none."""
    from .calibrate import calibration_inputs
    if c.calibrate < 0:
        raise ConfigError(f"--calibrate must be a number of batches >= 0 (0 = off), not {c.calibrate}")
    batches = c.calibrate
    if batches == 0:
        return {}
    data = data or load_data(c.data, c.seed)
    example = manifold.space.example_inputs
    if tuple(data.example.shape[1:]) != tuple(example.shape[1:]):
        raise ValueError(f"--calibrate needs inputs shaped like the manifold's network "
                         f"{tuple(example.shape[1:])}, but dataset {c.data.dataset!r} gives "
                         f"{tuple(data.example.shape[1:])}; name the right --dataset or pass --calibrate 0")
    return {"calibration": manifold.calibration_reference(calibration_inputs(data.train, batches), c.samples,
                                                          c.seed, batches)}


def cmd_sample(c: SampleConfig) -> None:
    width = _parse_width(c.width)
    out = c.out or f"{Path(c.manifold).with_suffix('')}_w{c.width.replace('=', '').replace(',', '_')}.safetensors"
    check_output_file(out, "--out")
    manifold = load_manifold(c.manifold)
    counts = manifold.space.resolve(width)
    module = manifold.sample(counts, samples=c.samples, seed=c.seed, **_calibration(manifold, c))
    full = count_parameters(manifold.space.model)
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
        raise ConfigError(f"--split must be val or test, not {c.split!r}")
    manifold = load_manifold(c.manifold, map_location=c.device)
    resolved = [(width, manifold.space.resolve(width)) for width in c.widths]  # every width checked first
    data = load_data(c.data, c.seed)
    check_model_fits_data(manifold.space.model, data, f"--manifold {c.manifold}")
    batches = data.val if c.split == "val" else data.test
    print(f"| width | γ | channels | params | {c.split} {data.task.metric} % |")
    print("|---|---|---|---|---|")
    calibration = _calibration(manifold, c, data)  # the full width measured once for every width
    for width, counts in resolved:
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
    out = c.out or (f"{Path(c.model).with_suffix('')}_smooth.safetensors" if Path(c.model).is_file()
                    else f"{c.model}_smooth.safetensors")
    check_output_file(out, "--out")
    # random, not constant, inputs: smooth's check that the function is kept must see every weight
    # (on zeros the first layer's weights do not matter at all)
    example = torch.randn((2,) + tuple(c.input_shape), generator=torch.Generator().manual_seed(c.seed))
    permuted, report = smooth(model, example, seed=c.seed)
    print(report.table())
    save_model(permuted, out)
    print(f"wrote {out}")


def cmd_demo(c: DemoConfig) -> None:
    check_output_file(Path(c.out_dir) / "demo.json", "--out-dir")
    run_demo(c)


def cmd_compare(c: CompareConfig) -> None:
    check_output_file(Path(c.out_dir) / "table.md", "--out-dir")
    print(compare(c))


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
    "compare": (CompareConfig, cmd_compare, "NeuMeta against pruning, Slimmable, US-Nets, distillation, INN and "
                                            "individual models: one table and one curve"),
}
# every command's config: what one YAML file may hold, whichever command reads it
CONFIGS = tuple(cls for cls, _, _ in COMMANDS.values())


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neumeta", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, func, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        add_options(p, cls)
        if name == "compare":  # `neumeta compare CONFIG`, as well as --config CONFIG
            p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML file of options (as --config)")
        p.set_defaults(func=func, cls=cls)
    p = sub.add_parser("list-models", help="names of the registered models")
    p.set_defaults(func=cmd_list_models, cls=None)
    return parser


def parse_command(argv: Optional[Sequence[str]] = None) -> Tuple[Callable, Any]:
    """(the command's function, its config): defaults, then the YAML file, then the flags."""
    args = make_parser().parse_args(argv)
    func, cls = args.func, args.cls
    del args.func, args.cls
    positional = vars(args).pop("config_file", None)
    if positional is not None:
        if getattr(args, "config", None) not in (None, positional):
            raise ConfigError(f"two config files: {positional} and --config {args.config}; pass one")
        args.config = positional
    if launched_by_torchrun() and func is not cmd_fit:
        raise ConfigError(f"only `neumeta fit` runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}); "
                          f"run `neumeta {args.command}` as one process")
    if cls is None:
        return func, args
    config = load_config(cls, args, commands=CONFIGS)
    return func, config


# errors that bad input causes (their message says what to change); anything else is a bug and
# keeps its traceback
KNOWN_ERRORS = (ConfigError, DivergenceError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError, KeyError, ValueError)


def run_reporting_errors(func: Callable, *args) -> None:
    """``func(*args)``; a known error (bad input, a diverged fit) is one ``error:`` line and exit
    code 2, Ctrl-C one line and exit code 130, anything else keeps its traceback (a bug)."""
    try:
        func(*args)
    except KNOWN_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # no repr quotes
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted (a fit continues from its last checkpoint with --resume)", file=sys.stderr)
        raise SystemExit(130)


def run_command(argv: Optional[Sequence[str]] = None) -> None:
    func, config = parse_command(argv)
    if hasattr(config, "seed"):
        seed_everything(config.seed)
    func(config)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_reporting_errors(run_command, argv)


if __name__ == "__main__":
    main()
