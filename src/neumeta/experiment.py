"""The end-to-end pipeline behind the CLI and ``make demo``.

data -> base model -> fold -> WidthSpace -> manifold -> fit -> sample -> table, with every
artefact written under one run directory so a second run resumes instead of redoing work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .calibrate import calibration_inputs
from .coords import CoordConfig
from .data import TensorLoader, load_cifar, load_fashion_mnist, load_fashion_mnist_32x3
from .fold import fold_batchnorm
from .groups import WidthSpace
from .smooth import smooth
from .inr import INRConfig
from .io import atomic_write, load_manifold, load_model, save_model
from .manifold import WeightManifold
from .models import create_model, width_kwargs
from .supervised import train_supervised
from .tasks import ClassificationTask
from .train import FitConfig, rank_and_world, fit

DATASETS = {
    "fashion-mnist": dict(loader=load_fashion_mnist, num_classes=10, input_shape=(1, 28, 28)),
    # the real Fashion-MNIST images shaped like CIFAR's (padded, 3 channels), for CIFAR-style networks
    "fashion-mnist-32x3": dict(loader=load_fashion_mnist_32x3, num_classes=10, input_shape=(3, 32, 32)),
    # from their "python version" files in --data-dir (nothing is downloaded)
    "cifar10": dict(loader=functools.partial(load_cifar, 10), num_classes=10, input_shape=(3, 32, 32)),
    "cifar100": dict(loader=functools.partial(load_cifar, 100), num_classes=100, input_shape=(3, 32, 32)),
}


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    val_size: int = 5000
    batch_size: int = 128
    eval_batch_size: int = 1000
    train_size: Optional[int] = None  # use only this many training images (smoke runs, tests)
    eval_size: Optional[int] = None   # and this many validation and test images (smoke runs, tests)


@dataclass
class Data:
    train: TensorLoader
    val: TensorLoader
    test: TensorLoader
    task: ClassificationTask
    example: torch.Tensor


def load_data(config: DataConfig, seed: int = 0) -> Data:
    if config.dataset not in DATASETS:
        raise KeyError(f"unknown dataset {config.dataset!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[config.dataset]
    splits = spec["loader"](data_dir=config.data_dir, val_size=config.val_size, seed=seed)
    rank, world = rank_and_world()
    train = splits.train if config.train_size is None else tuple(t[:config.train_size] for t in splits.train)
    val, test = ((split if config.eval_size is None else tuple(t[:config.eval_size] for t in split))
                 for split in (splits.val, splits.test))
    return Data(
        train=TensorLoader(*train, batch_size=config.batch_size, shuffle=True, seed=seed,
                           rank=rank, world_size=world),
        val=TensorLoader(*_part(val, rank, world), batch_size=config.eval_batch_size, shuffle=False),
        test=TensorLoader(*test, batch_size=config.eval_batch_size, shuffle=False),
        task=ClassificationTask(spec["num_classes"]),
        example=splits.train[0][:2].clone(),
    )


def _part(split, rank: int, world: int):
    """This process's part of an evaluation split under torch.distributed: disjoint, contiguous,
    and uneven where the split does not divide (``fit`` sums the scores over processes, so the
    result is exactly the whole split's); the whole split in one process."""
    if world == 1:
        return split
    return tuple(torch.tensor_split(t, world)[rank] for t in split)


def check_model_fits_data(model: torch.nn.Module, data: Data, what: str) -> None:
    """Refuse a network that cannot read the data's inputs, or gives another number of outputs
    than the task has classes, before any work starts (not as a shape error deep in training)."""
    example = data.example[:2].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(example)
    except RuntimeError as err:
        raise ValueError(f"{what} ({type(model).__name__}) cannot read this dataset's inputs of shape "
                         f"{tuple(example.shape[1:])}: {str(err).splitlines()[0]}") from err
    finally:
        model.train(was_training)
    classes = getattr(data.task, "num_classes", None)
    if classes is not None and (outputs.dim() != 2 or outputs.shape[1] != classes):
        raise ValueError(f"{what} ({type(model).__name__}) gives outputs of shape {tuple(outputs.shape[1:])}, "
                         f"but the dataset has {classes} classes")


def train_base(model_name: str, data: Data, epochs: int, lr: float, seed: int, device="cpu",
               progress: bool = True, desc: str = "base", keep_best: bool = False,
               **model_kwargs) -> torch.nn.Module:
    """Train one network from scratch (the base model, or an individual baseline); ``keep_best``
    keeps its best epoch on the validation split."""
    torch.manual_seed(seed)
    model = create_model(model_name, **model_kwargs)
    train_supervised(model, data.task, data.train, epochs, lr, val_loader=data.val if keep_best else None,
                     device=device, progress=progress, desc=desc, keep_best=keep_best)
    return model


def build_manifold(base: torch.nn.Module, example: torch.Tensor, inr: INRConfig = INRConfig(),
                   coords: CoordConfig = CoordConfig(), groups=None, smoothing: bool = True,
                   seed: int = 0, log=print, fixed: Sequence[str] = ()) -> WeightManifold:
    """fold -> (smooth) -> WidthSpace -> WeightManifold; the INR's initial weights come from
    ``seed`` alone (not from whatever drew from torch's generator before). ``groups`` and
    ``fixed`` are ``WidthSpace``'s; only the groups that morph are smoothed."""
    model = fold_batchnorm(base, example)
    if smoothing:
        # a preset ("paper") names the groups through the model: the space resolves it
        chosen = None if groups is None else list(WidthSpace(model, example, groups=groups, fixed=fixed).groups)
        model, report = smooth(model, example, seed=seed, groups=chosen, fixed=fixed)
        log(f"smoothing permutation: total variation {report.tv_before:,.1f} -> {report.tv_after:,.1f} "
            f"({report.seconds:.2f} s)")
    space = WidthSpace(model, example, groups=groups, fixed=fixed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WeightManifold(space, inr, coords)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class DemoConfig:
    """``make demo``: LeNet on Fashion-MNIST, manifold vs individually trained models."""
    model: str = "lenet"
    epochs: int = 4
    lr: float = 1e-3
    seed: int = 0
    widths: Sequence[float] = (1.0, 0.75, 0.5, 0.25)
    samples: int = 50
    calibrate: int = 20          # training batches calibrating each sampled network (0 = off)
    curve_samples: int = 10      # K for the accuracy-against-width curve (demo.png); 0 = no curve
    smooth: bool = True
    recipe: str = "default"      # CLI/YAML: named recipe under the fit/coords/inr options; in Python
                                 # build them with nm.recipe(name) and nm.recipe_inr(name) instead
    out_dir: str = "runs/demo"
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    coords: CoordConfig = field(default_factory=CoordConfig)
    inr: INRConfig = field(default_factory=INRConfig)


def run_demo(config: DemoConfig, progress: bool = True, log=print) -> Dict:
    """Train the base model, fit the manifold, train individual models, evaluate on the test split."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stages: Dict[str, float] = {}  # wall seconds of each stage of this run (zero where loaded)
    data = load_data(config.data, config.seed)
    base_path = out / "base.safetensors"
    if base_path.exists():
        base = load_model(base_path)
        log(f"base model: loaded {base_path}")
    else:
        with _timed(stages, "base model"):
            base = train_base(config.model, data, config.epochs, config.lr, config.seed, config.device, progress)
        save_model(base, base_path)
        log(f"base model: trained {config.epochs} epochs, wrote {base_path}")
    base.to(config.device)

    manifold_path = out / "manifold.neumeta"
    if manifold_path.exists():
        manifold = load_manifold(manifold_path, map_location=config.device)
        log(f"manifold: loaded {manifold_path}")
    else:
        with _timed(stages, "manifold (smoothing + fit)"):
            manifold = build_manifold(base, data.example.to(config.device), config.inr, config.coords,
                                      smoothing=config.smooth, seed=config.seed, log=log).to(config.device)
            result = fit(manifold, data.task, data.train, data.val, config.fit, checkpoint=str(out / "fit.ckpt"),
                         resume="auto", progress=progress)
        manifold = result.manifold
        manifold.save(manifold_path, extra={"best_step": result.best_step, "history": result.history})
        log(f"manifold: fitted, best validation step {result.best_step}, wrote {manifold_path}")

    rows = []
    space = manifold.space
    matched = matched_epochs(config.epochs, config.fit.steps, len(data.train))
    batches = config.calibrate
    if batches < 0:
        raise ValueError(f"demo: calibrate must be a number of batches >= 0 (0 = off), not {batches}")
    reference = manifold.calibration_reference(calibration_inputs(data.train, batches), config.samples,
                                               config.seed, batches) if batches else None
    for width in config.widths:
        counts = space.resolve(width)
        plain = manifold.sample(counts, samples=config.samples, seed=config.seed)
        sampled = plain if reference is None else manifold.sample(counts, samples=config.samples, seed=config.seed,
                                                                  calibration=reference)
        kwargs = dict(getattr(base, "neumeta_kwargs", {}), **width_kwargs(config.model, counts))

        def individual_model(epochs: int, suffix: str = ""):
            path = out / f"individual_{width:g}{suffix}.safetensors"
            if path.exists():
                return load_model(path).to(config.device)
            with _timed(stages, "individual models"):
                model = train_base(config.model, data, epochs, config.lr, config.seed, config.device, progress,
                                   desc=f"individual {width:g}, {epochs} epochs", **kwargs)
            save_model(model, path)
            return model.to(config.device)

        individual = base if width == 1.0 else individual_model(config.epochs)
        given_data = individual_model(matched, f"_e{matched}")
        rows.append({
            "width": width, "gamma": round(1 - width, 4), "channels": counts,
            "trained_range": config.fit.min_width <= width <= config.fit.max_width,
            "params": count_parameters(sampled),
            "individual_test": data.task.evaluate(individual, data.test, config.device)["accuracy"],
            "individual_val": data.task.evaluate(individual, data.val, config.device)["accuracy"],
            "matched_epochs": matched,
            "matched_test": data.task.evaluate(given_data, data.test, config.device)["accuracy"],
            "matched_val": data.task.evaluate(given_data, data.val, config.device)["accuracy"],
            "neumeta_test": data.task.evaluate(sampled, data.test, config.device)["accuracy"],
            "neumeta_val": data.task.evaluate(sampled, data.val, config.device)["accuracy"],
            "neumeta_test_uncalibrated": data.task.evaluate(plain, data.test, config.device)["accuracy"],
            "calibration_batches": batches,
        })
    with _timed(stages, "width curve"):
        curve = width_curve(manifold, data.task, data.test, config.curve_samples, config.seed, config.device,
                            reference) if config.curve_samples else {}
    seconds = time.time() - started
    stages["sampling + evaluation"] = seconds - sum(stages.values())  # what the stages above leave
    summary = {
        "rows": rows,
        "curve": {f"{w:g}": v for w, v in curve.items()},
        "stored_individual": sum(r["params"] for r in rows),
        "stored_manifold": count_parameters(manifold),
        "manifold_path": str(manifold_path),
        "seconds": round(seconds, 1),
        "stage_seconds": {name: round(value, 1) for name, value in stages.items()},
        "config": dataclasses.asdict(config),
    }
    atomic_write(out / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    table = format_table(summary)
    atomic_write(out / "demo.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    log(table)
    log(f"checkpoint: {manifold_path}   table: {out / 'demo.md'}" + _draw(summary, config, out / "demo.png"))
    return summary


def matched_epochs(epochs: int, steps: int, batches_per_epoch: int) -> int:
    """Epochs that give an individual model as much training data as the manifold saw: its base
    model's ``epochs`` plus the fit's joint ``steps`` of one batch each, rounded up (4 + 3,000 steps
    of 430 batches = 11). The fair comparison: the base's epochs alone flatter the manifold."""
    return epochs + math.ceil(steps / max(1, batches_per_epoch))


@contextlib.contextmanager
def _timed(stages: Dict[str, float], name: str):
    """Add the wall time of the block to ``stages[name]``."""
    start = time.time()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.time() - start


def width_curve(manifold: WeightManifold, task, batches, samples: int, seed: int = 0, device="cpu",
                reference=None) -> Dict[float, float]:
    """``task``'s metric on ``batches`` at every channel count of the smallest morphed group (the other
    groups at the same fraction), K = ``samples``, calibrated with ``reference`` if given: the line
    of the demo's plot and of the recipe benchmark's."""
    size = min(manifold.space.full.values())
    calibration = {} if reference is None else {"calibration": reference}
    curve = {}
    for channels in range(1, size + 1):
        width = channels / size
        net = manifold.sample(width, samples=samples, seed=seed, **calibration).to(device)
        curve[width] = task.evaluate(net, batches, device)[task.metric]
    return curve


def _draw(summary: Dict, config: DemoConfig, path: Path) -> str:
    """demo.png, or nothing where matplotlib is not installed (it is an optional extra)."""
    if not summary["curve"]:
        return ""
    if importlib.util.find_spec("matplotlib") is None:
        return "   (no plot: pip install matplotlib)"
    from .plot import plot_width_curve
    plot_width_curve({float(w): v for w, v in summary["curve"].items()}, path,
                     {r["width"]: r["individual_test"] for r in summary["rows"]},
                     trained=(config.fit.min_width, config.fit.max_width),
                     title=f"{config.model} on {config.data.dataset}: test accuracy against width",
                     matched={r["width"]: r["matched_test"] for r in summary["rows"] if "matched_test" in r},
                     labels=(f"individual models, {config.epochs} epochs (the base's)",
                             f"individual models, {summary['rows'][0].get('matched_epochs')} epochs "
                             "(the manifold's data)"))
    return f"   plot: {path}"


def format_table(summary: Dict) -> str:
    calibrated = any(r.get("calibration_batches") for r in summary["rows"])
    epochs = summary.get("config", {}).get("epochs", "base")
    matched = all("matched_test" in r for r in summary["rows"])
    given = f" individual, {summary['rows'][0]['matched_epochs']} epochs (the manifold's data) % | Δ |" if matched else ""
    lines = [f"| γ (compression) | width | channels | params | individual, {epochs} epochs (the base's) % | "
             f"NeuMeta test acc % | Δ |{given}" + (" NeuMeta without calibration % |" if calibrated else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if matched else "") + ("---|" if calibrated else "")]
    for r in summary["rows"]:
        unseen = "" if r["trained_range"] else " (unseen)"
        chans = "/".join(str(c) for c in r["channels"].values())
        lines.append(f"| {100 * r['gamma']:.0f} %{unseen} | {r['width']:g} | {chans} | {r['params']:,} | "
                     f"{100 * r['individual_test']:.2f} | {100 * r['neumeta_test']:.2f} | "
                     f"{100 * (r['neumeta_test'] - r['individual_test']):+.2f} |"
                     + (f" {100 * r['matched_test']:.2f} | {100 * (r['neumeta_test'] - r['matched_test']):+.2f} |"
                        if matched else "")
                     + (f" {100 * r['neumeta_test_uncalibrated']:.2f} |" if calibrated else ""))
    lines.append("")
    lines.append(f"Stored parameters: {len(summary['rows'])} individual models {summary['stored_individual']:,}; "
                 f"one NeuMeta manifold (INR and any grid) {summary['stored_manifold']:,}, any width.")
    if "stage_seconds" in summary:
        parts = ", ".join(f"{name} {value / 60:.1f}" for name, value in summary["stage_seconds"].items() if value >= 0.05)
        lines.append(f"Time: {summary['seconds'] / 60:.1f} min ({parts}).")
    return "\n".join(lines)
