"""Options from dataclasses: command-line flags, their help, and YAML files.

Every option is a field of a config dataclass (nested ones, like ``fit: FitConfig``, keep their
nesting). ``add_options`` makes a flag of each; ``load_config`` builds the config from the
defaults, then a YAML file, then the flags. One YAML file serves every command: a key that is an
option of any of the commands named is accepted (and ignored by those without it), a key that
none has is an error naming it and its path in the file (``fit.stepz``).

Every value is checked against its field's type before any work starts (``lr: "fast"`` is an
error naming ``fit.lr``, not a TypeError inside Adam an epoch later), and so is every ``device``.
A wrong option raises ``ConfigError``; the command prints it as one ``error:`` line.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml

from .recipes import RECIPES, merge_recipe

HELP = {
    # data
    "dataset": "dataset: fashion-mnist, fashion-mnist-32x3 (the same images padded to 32x32, 3 channels, for "
               "CIFAR-style networks), cifar10 or cifar100 (their python-version files in --data-dir)",
    "data_dir": "folder with the dataset files, the only place looked in when given (default: "
                "$NEUMETA_DATA_DIR, else the Debian package's folder, ~/.cache/neumeta, then download)",
    "val_size": "training images held out for validation (model selection); the test split is only for final tables",
    "batch_size": "training batch size",
    "eval_batch_size": "batch size when evaluating",
    "train_size": "use only the first N training images (smoke runs; default: all)",
    "eval_size": "use only the first N validation and test images (smoke runs; default: all)",
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
    "width_ramp": "fraction of the joint steps over which the trained range opens, its lower end falling from "
                  "--max-width to --min-width (0: the whole range at once); a curriculum for deep networks",
    "noise_ramp": "fraction of the joint steps over which the coordinate noise grows from none to --noise "
                  "(0: all at once); for an INR pre-fitted without noise (--no-prefit-noise)",
    "refine_steps": "after the joint steps, steps in which a grid of plain weights learns the trained range on top "
                    "of the INR, held; every width below the range stays as the joint phase left it",
    "inr_frozen": "hold the INR and train only its grid in the trained range (the refine stage's own setting; "
                  "needs a manifold with one and --prefit-steps 0)",
    "joint_lr": "peak learning rate of the joint phase (default: fit_lr, which the pre-fit always uses)",
    "grid_lr": "peak joint-phase learning rate of the grid's plain weights (--grid; default: the INR's)",
    "grid_only_in_range": "with --grid-range, only the grid learns from the in-range networks; the INR learns as "
                          "the INR alone with noise, the network below the range, as without a grid",
    "grid_widths": "with --grid-alone, widths the grid also trains on every joint step (a slimmable network's "
                   "switches: the widths you will deploy), besides the full, the narrowest and one drawn "
                   "(None: the middle of the trained range)",
    "grid_original_distill": "with --grid-alone, the base model also teaches the grid's widths (off: the grid "
                             "learns from the labels and its own full width, as a slimmable network)",
    "warmup": "fraction of the joint steps with a linear learning-rate warm-up",
    "fresh_optimizer": "restart Adam's moments when the joint phase begins (after the pre-fit's small gradients "
                       "the first joint steps overshoot; on LeNet a smaller early fall, the same end)",
    "prefit_decay": "cosine-decay the pre-fit's learning rate to zero (else constant)",
    "min_width": "narrowest width multiplier seen in training (0.5 = compression 50 %)",
    "max_width": "widest width multiplier seen in training",
    "per_group": "draw each channel group's width independently (else one multiplier for all)",
    "recon_weight": "lambda_1: weight of the reconstruction loss (see docs for the exact formula)",
    "recon_rows": "fraction of full-width weight rows used to estimate the reconstruction loss each step",
    "recon_noise": "jitter the coordinates in the reconstruction loss too",
    "prefit_noise": "jitter the coordinates in the pre-fit (default: as recon_noise); no-prefit-noise reconstructs "
                    "the channels' centres exactly first",
    "l2_weight": "lambda_2: weight of the squared L2 norm of the generated weights",
    "inplace_distill": "in-place distillation: the full width learns the labels, the sampled width its outputs",
    "sandwich": "sandwich rule: the narrowest width of the range is also trained every step",
    "sandwich_every": "train the sandwich's narrowest width on every this many joint steps only (1: every step)",
    "sampled_every": "train the sampled width on every this many joint steps only (the full width every step)",
    "sampled_widths": "random widths drawn and trained per joint step, besides the full and the narrowest width",
    "narrow_batch": "fraction of each batch each narrower trained network runs on (disjoint slices; the full "
                    "width always on the whole batch): a cheaper step",
    "full_every": "the full width learns the task on every this many joint steps only, a forward-only teacher on the others",
    "original_distill": "the reference (pre-trained) network's outputs also teach every trained width (KD)",
    "original_fade": "fraction of the joint steps over which the reference's distillation fades out linearly "
                     "(0: never); stable at the start, then the widths may pass the reference",
    "train_original": "that teacher is a copy of the reference that goes on learning the same batches (plain Adam), "
                      "as an individual model would (on LeNet: level in range, lower at unseen widths)",
    "recon_reduction": "reconstruction loss per tensor: mean over elements, sum (the paper's squared norms), or "
                       "relative (mean / the reference's mean square, averaged over tensors: every tensor alike)",
    "guard": "divergence guard: roll back to the last good checkpoint on NaN/inf or a collapse to chance",
    "guard_retries": "rollbacks before fit stops with an error",
    "guard_lr_factor": "learning-rate multiplier at each rollback",
    "collapse_margin": "a width counts as collapsed at metric <= chance + margin * (1 - chance)",
    "recipe": "named recipe under the other options: default (chosen on validation), inr (the default without "
              "its grid: the INR at every width) or paper (as published)",
    "ema": "decay of the exponential moving average of the INR used for evaluation",
    "grad_clip": "clip the INR's gradient norm to this (0 = off)",
    "eval_every": "validate (and checkpoint) every this many steps",
    "eval_widths": "width multipliers validated during fit; their mean accuracy selects the checkpoint",
    "select_widths": "widths whose mean validation accuracy selects the checkpoint instead (also validated)",
    "eval_samples": "noisy coordinate draws averaged per validation (1 = noise-free centres)",
    "train_calibrated": "train every narrower width normalised per batch to the full width's activation statistics "
                        "of its cells, the network calibrated sampling gives (for deep networks without BatchNorm)",
    "calibration_batches": "training batches that calibrate each validated width (with --train-calibrated)",
    "tensor_subset": "fraction of the generated tensors whose INR blocks get gradients each joint step (the "
                     "paper's random subset of layers; the rest are generated without autograd): a cheaper backward; "
                     "0.25 and 0.5 measured to break fits (docs/recipe.md)",
    "recon_warn": "warn after the pre-fit about tensors whose relative full-width reconstruction error exceeds this",
    # coords / inr
    "size_terms": "add the paper's size coordinates L/N, C_in/N, C_out/N",
    "positions": "channel positions: center = (j+1/2)/C, index = j/C (paper)",
    "noise": "coordinate noise half-width, in channel cells (0.5 = the whole cell)",
    "hidden": "INR hidden width",
    "depth": "INR linear layers per block",
    "frequencies": "Fourier feature frequencies (per coordinate; gaussian draws coordinates x this many features)",
    "encoding": "coordinate encoding: powers (sin/cos of 2^k pi v per coordinate, the paper's) or gaussian (random "
                "features mixing in- and out-channel positions, frequencies scaled per tensor by its channels)",
    "encoding_scale": "gaussian encoding: standard deviation of its frequencies, in cycles per channel",
    "channel_features": "learned features per input and output channel of every tensor, interpolated at the "
                        "coordinate and appended to the encoding (0: none)",
    "precision": "dtype of the INR's matmuls, float32 or bfloat16 (2-3x faster where the CPU or GPU has bfloat16 "
                 "units; weights and optimizer stay float32, generated values rounded to 8 bits)",
    "residual": "none (the INR outputs the weights), or the INR learns a correction on top of the reference "
                "weights resampled to the width, exact at full width: cells (each channel the mean of its "
                "cell's full channels), linear (interpolated at its centre) or area (weighted by cell overlap)",
    "detail": "add a free full-width table of the detail the INR misses (exact full width after the "
              "pre-fit), resampled by cell overlap in the trained range and faded out below it",
    "full_width": "what sampling gives at full width: reference (the base network, exactly), inr (the INR's, as "
                  "at every other width) or best (whichever fit measured better on validation)",
    "detail_fade": "width fraction below the trained range over which the detail table fades out",
    "grid": "a learned full-width table of plain weights per tensor beside the INR. Unset (None): the default "
            "recipe, the grid alone in the trained range (--grid-range --grid-alone); --grid by itself: the table "
            "at every width, read at each row's jittered coordinates; --no-grid: the INR alone at every width",
    "grid_range": "the grid serves the trained range only, read with the INR at the channel centres without "
                  "noise; below the range it fades out and the INR alone, trained with the noise beside it, "
                  "takes over",
    "grid_alone": "with --grid-range, the trained range is the grid alone (plain weights at the channel "
                  "centres, set to the base model), trained apart from the INR, whose widths below the range "
                  "are then the default's",
    # commands
    "base": "the trained full-width model (written by `neumeta train-base`)",
    "checkpoint": "training checkpoint (written atomically at every validation; default: OUT.ckpt)",
    "resume": "continue from the checkpoint (it must exist, and be of the same base model and options)",
    "overwrite": "start afresh even where the checkpoint or the output file exists (both are replaced)",
    "manifold": "a manifold file written by `neumeta fit`",
    "width": "a width multiplier (0.5), or exact channels/multipliers per group (conv1=8,fc1=0.5)",
    "widths": "width multipliers to evaluate",
    "samples": "noisy coordinate draws averaged per weight (the paper's K)",
    "curve_samples": "noisy draws per weight (K) for the accuracy-against-width curve of demo.png (0 = no curve)",
    "calibrate": "training batches (unlabelled) that calibrate each sampled network's activation statistics "
                 "to the full width's (neumeta.calibrate; 0 = off): several points at unseen narrow widths",
    "smooth": "reorder channels by the TSP smoothing permutation before fitting (same function, smoother weights)",
    "split": "which split to evaluate: val or test",
    "seeds": "seeds: each trains its own base model and runs every method",
    "methods": "methods to run (default: all): neumeta, individual, individual-matched, distill, prune-l1, "
               "prune-l2, prune-taylor, prune-hessian, prune-random, slimmable, usnet, usnet-wide, inn",
    "finetune_steps": "fine-tuning steps after pruning, per width (0: none, as in the paper)",
    "groups": "channel groups that morph: every group (default) or paper (the paper's release: the last "
              "block of layer3 of the CIFAR ResNets)",
    "input_shape": "shape of one input (without the batch), for tracing",
}


class ConfigError(ValueError):
    """An option with a wrong name, type or value; raised before any work starts."""


RENAME = {("fit", "lr"): "fit_lr"}  # flags that would clash with a top-level option
SKIP = {("fit", "seed")}  # no flag: the command's own --seed sets it


def option_leaves(cls, path: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every option of ``cls`` that gets a flag, nested dataclasses unfolded."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += option_leaves(hints[f.name], path + (f.name,))
        elif path[-1:] + (f.name,) not in SKIP:
            out.append((path + (f.name,), f, hints[f.name]))
    return out


def flag_name(path: Tuple[str, ...]) -> str:
    """The flag of an option (without ``--``, underscores kept): its own name, unless renamed."""
    return RENAME.get(path[-2:], path[-1]) if len(path) > 1 else path[-1]


def add_options(parser: argparse.ArgumentParser, cls, help_texts: Mapping[str, str] = HELP) -> None:
    """``--config`` and a flag for every option of ``cls``; a flag's destination is the option's path."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (same names, same nesting)")
    for path, f, hint in option_leaves(cls):
        name = flag_name(path)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: Dict[str, Any] = dict(dest=".".join(path), default=argparse.SUPPRESS, metavar=name.upper(),
                                      help=f"{help_texts.get(name, '')} (default: {default})".replace("%", "%%"))
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


def option_tree(classes: Sequence[type]) -> Dict[str, Optional[dict]]:
    """Every option any of ``classes`` has, nested as in a YAML file: name -> the tree of a nested
    dataclass, or None for a value."""
    tree: Dict[str, Optional[dict]] = {}
    nested: Dict[str, list] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                nested.setdefault(f.name, []).append(hints[f.name])
            else:
                tree.setdefault(f.name, None)
    for name, inner in nested.items():
        tree[name] = option_tree(inner)
    return tree


def check_options(values: Mapping, tree: Mapping, where: str, path: Tuple[str, ...] = ()) -> None:
    """Refuse a key of ``values`` that ``tree`` (``option_tree``) lacks, naming its path: a typo."""
    for key, value in values.items():
        here = path + (str(key),)
        if key not in tree:
            under = f"under {'.'.join(path)}" if path else "at the top level"
            raise ConfigError(f"unknown option {'.'.join(here)} in {where}: no command has it; "
                             f"known {under}: {', '.join(sorted(tree))}")
        if isinstance(value, Mapping) and isinstance(tree[key], dict):
            check_options(value, tree[key], where, here)


def own_options(cls, values: Mapping) -> dict:
    """The part of ``values`` that are options of ``cls`` (a file written for several commands)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            nested = dataclasses.is_dataclass(hints[f.name]) and isinstance(value, Mapping)
            out[f.name] = own_options(hints[f.name], value) if nested else value
    return out


def build_config(cls, values: Mapping, where: str = "options"):
    """``cls`` from a tree of option values (lists become tuples); an unknown or invalid one is an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} in {where}; "
                         f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key} must be a mapping of options, not {value!r}")
            kwargs[key] = build_config(hints[key], value, f"{where}.{key}")
        else:
            kwargs[key] = checked_value(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid options in {where}: {err}") from err


def read_config_file(path) -> dict:
    """The mapping of options in a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of options")
    return loaded


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_config(cls, args: argparse.Namespace, commands: Sequence[type] = ()):
    """``cls`` from its defaults, then the YAML file ``args.config``, then the flags in ``args``
    (destinations are option paths, as ``add_options`` makes them).

    The file may hold the options of ``cls`` and of any of ``commands`` (the config classes of the
    other commands that read the same file); ``cls`` ignores those it lacks, and a key that none of
    them has is an error. A named ``recipe`` sits under both file and flags.
    """
    values: dict = {}
    file = getattr(args, "config", None)
    if file:
        loaded = read_config_file(file)
        check_options(loaded, option_tree([cls, *commands]), file)
        values = own_options(cls, loaded)
    for dest, value in vars(args).items():
        if dest not in ("config", "config_file", "command", "func", "cls"):
            _set(values, dest.split("."), value)
    if "recipe" in {f.name for f in dataclasses.fields(cls)}:
        if values.get("recipe", "default") not in RECIPES:
            raise ConfigError(f"unknown recipe {values['recipe']!r}; available: {', '.join(RECIPES)}")
        values = merge_recipe(values)  # the recipe, then the YAML file, then flags
    config = build_config(cls, values, file or "options")
    if hasattr(config, "fit") and hasattr(config, "seed"):
        config.fit.seed = config.seed
    if hasattr(config, "device"):
        check_device(config.device)
    return config


def parse_overrides(items: Sequence[str], sections: Mapping[str, type], default: Optional[str] = None,
                    flag: str = "--set") -> Dict[str, dict]:
    """``["fit.lr=3e-4", "inr.frequencies=64"]`` -> ``{"fit": {"lr": 3e-4}, "inr": {"frequencies": 64}}``,
    each value read as YAML and checked against its field's type in ``sections[section]``; a key
    without a section belongs to ``default``. For scripts that try one option at a time."""
    out: Dict[str, dict] = {name: {} for name in sections}
    for item in items:
        key, sep, text = item.partition("=")
        section, _, name = key.rpartition(".")
        cls = sections.get(section or default)
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if not sep or not text or name not in hints or dataclasses.is_dataclass(hints[name]):
            known = " or ".join(f"{s + '.' if s != default else ''}KEY ({c.__name__})" for s, c in sections.items())
            raise ConfigError(f"{flag} {item}: expected KEY=VALUE with KEY one of {known}")
        out[section or default][name] = checked_value(yaml.safe_load(text), hints[name], f"{flag} {key}")
    return out


# --------------------------------------------------------------------------- types
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads 1e-3 as a string


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def checked_value(value, hint, where: str):
    """``value`` if it has type ``hint`` (ints pass as floats, lists become tuples), else ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return checked_value(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, not {value!r}")
        item = args[0] if args and args[0] is not Ellipsis else typing.Any
        return tuple(checked_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ConfigError(f"{where} must be a number, not nan")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where} must be {_article(_type_name(hint))}, not {value!r} ({type(value).__name__})")


def _article(name: str) -> str:
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    return words.get(name, f"of type {name}")


def check_device(device: str, option: str = "device") -> None:
    """Refuse a device this machine lacks (``--device cuda`` without CUDA) before any work starts."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{option} {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device!r}: this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{option} {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{option} {device!r}: only cpu, cuda and mps devices are supported")
