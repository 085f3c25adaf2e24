"""``neumeta compare``: NeuMeta and every baseline on the same data, splits, seeds and budgets.

Each (seed, method) is one run: it trains, then is measured at the table's widths and at every
integer width of the smallest morphed group (the curve), on the test split. Its numbers go to
``OUT_DIR/seed<N>/<method>.json`` before the next run starts, so a rerun skips what is done.
The table (``table.md``, ``table.csv``) gives the mean over seeds with each method's training
time and stored parameters, like the paper's Table 2; ``curve.png`` draws the metric against
width, the widths outside the trained range shaded.

Budgets: the base model trains ``epochs``; the manifold is fitted from it; individual and
distilled models train ``epochs`` from scratch at their width, and the data-matched ones as many
images as the base and the manifold saw together; Slimmable, US-Nets and the INN-style network
train from scratch on that many batches. Pruning starts from the base model (no training; with
``finetune_steps``, a short fine-tune per width). The task is an object (``data.task``), so any
task with ``loss``, ``distill``, ``evaluate`` and ``metric`` plugs in.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .coords import CoordConfig
from .experiment import DataConfig, build_manifold, count_parameters, load_data, train_base
from .groups import WidthSpace
from .inr import INRConfig
from .io import atomic_write, load_model, save_model
from .models import create_model, width_kwargs
from .progress import progress_bar
from .train import FitConfig, fit

TABLE_WIDTHS = (1.0, 0.75, 0.5, 0.25)  # gamma 0, 25, 50, 75 %


@dataclass
class CompareConfig:
    model: str = "lenet"
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = ()        # empty: every method of METHODS
    epochs: int = 4
    lr: float = 1e-3
    widths: Sequence[float] = TABLE_WIDTHS
    samples: int = 50
    curve_samples: int = 10
    finetune_steps: int = 0
    groups: Optional[str] = None       # None: every group morphs; "paper": the paper's protocol
    out_dir: str = "runs/compare"
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    coords: CoordConfig = field(default_factory=CoordConfig)
    inr: INRConfig = field(default_factory=INRConfig)


@dataclass
class Trained:
    """What a method gives back: a network at any counts it can make, and what it cost."""
    network: Callable[[Dict[str, int]], nn.Module]
    seconds: float
    stored_parameters: int
    widths: Optional[Sequence[float]] = None  # only these widths exist (individual models); None: any
    curve_network: Optional[Callable[[Dict[str, int]], nn.Module]] = None  # cheaper, for the curve


@dataclass
class Run:
    """Everything one method's run needs: the options, the data, the base model and the widths.
    The base model is loaded or trained when a method first asks for it: methods trained from
    scratch (individual-matched, Slimmable, US-Nets, INN) never wait for it."""
    config: CompareConfig
    seed: int
    data: object
    space: WidthSpace
    folder: Path
    load_base: Callable[[], Tuple[nn.Module, float]]  # (base model, seconds its training took)
    trainers: Dict[str, tuple] = field(default_factory=dict)  # (trainer, Trained) of this process, by builder

    @cached_property
    def _base(self) -> Tuple[nn.Module, float]:
        return self.load_base()

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def base_seconds(self) -> float:
        return self._base[1]

    @property
    def matched_epochs(self) -> int:
        """Epochs of as many images as the base model and the manifold's joint steps saw."""
        return self.config.epochs + math.ceil(self.config.fit.steps / max(1, len(self.data.train)))

    def counts(self, width: float) -> Dict[str, int]:
        return self.space.resolve(width)


# --------------------------------------------------------------------------- methods
def _neumeta(run: Run) -> Trained:
    from .calibrate import calibration_inputs
    c = run.config
    manifold = build_manifold(run.base, run.data.example, c.inr, c.coords, groups=c.groups, seed=run.seed,
                              log=lambda *a: None).to(c.device)
    result = fit(manifold, run.data.task, run.data.train, run.data.val, dataclasses.replace(c.fit, seed=run.seed),
                 checkpoint=str(run.folder / "neumeta.ckpt"), resume="auto")
    seconds = run.base_seconds + result.seconds  # the fit's own clock survives resumes
    fitted = result.manifold
    reference = fitted.calibration_reference(calibration_inputs(run.data.train, 20), c.samples, run.seed)

    def network(counts, samples=c.samples):
        return fitted.sample(counts, samples=samples, seed=run.seed, calibration=reference)
    return Trained(network, seconds, count_parameters(fitted.inr) + count_parameters(fitted.space.model),
                   curve_network=lambda counts: network(counts, max(1, c.curve_samples)))


def _read_seconds(model_file: Path) -> Optional[float]:
    """The training time written beside a saved model (``x.json`` for ``x.safetensors``), if any."""
    timing = model_file.with_suffix(".json")
    return json.loads(timing.read_text())["seconds"] if timing.exists() else None


def _save_timed(model: nn.Module, model_file: Path, seconds: float) -> None:
    """Save a model with its training time beside it, so a later process can report the cost."""
    save_model(model, model_file)
    atomic_write(model_file.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({"seconds": seconds})))


def _individual(run: Run, epochs: int, teacher: Optional[nn.Module] = None) -> Trained:
    from .baselines import train_distilled
    c, models, seconds = run.config, {}, 0.0
    for width in c.widths:
        counts = run.counts(width)
        name = f"{'distilled' if teacher is not None else 'individual'}_{width:g}_e{epochs}.safetensors"
        file = run.folder / name
        if file.exists():  # trained by an earlier process: its time was written beside it
            models[width] = load_model(file)
            seconds += _read_seconds(file) or 0.0
            continue
        if width == 1.0 and teacher is None and epochs == c.epochs:
            # the base model is the full-width individual model (trained now if no method needed it yet)
            model, took = run.base, run.base_seconds
        else:
            started = time.perf_counter()
            if teacher is not None:
                model = train_distilled(c.model, counts, teacher, run.data, epochs, c.lr, seed=run.seed,
                                        device=c.device, keep_best=True, desc=f"distilled {width:g}")
            else:
                model = train_base(c.model, run.data, epochs, c.lr, run.seed, c.device,
                                   desc=f"individual {width:g}", keep_best=True, **width_kwargs(c.model, counts))
            took = time.perf_counter() - started
        seconds += took
        _save_timed(model, file, took)
        models[width] = model
    by_counts = {tuple(sorted(run.counts(w).items())): m for w, m in models.items()}
    return Trained(lambda counts: by_counts[tuple(sorted(counts.items()))], seconds,
                   sum(count_parameters(m) for m in models.values()), widths=tuple(c.widths))


def _pruning(importance: str) -> Callable[[Run], Trained]:
    def method(run: Run) -> Trained:
        from .baselines import channel_scores, finetune, highest, narrow_copy
        c = run.config
        batches = [b for _, b in zip(range(4), run.data.train)]  # Taylor / Hessian gradients
        # scored once on the base model: the ranking serves every width
        scores = channel_scores(run.base, run.data.example, importance, batches, run.data.task, run.seed,
                                groups=list(run.space.groups))

        def network(counts):
            pruned = narrow_copy(run.base, run.data.example, highest(scores, counts))
            started = time.perf_counter()
            tuned = finetune(pruned, run.data, c.finetune_steps, c.lr, c.device, progress=False)
            trained.seconds += time.perf_counter() - started  # the table's widths' fine-tuning is training
            return tuned
        trained = Trained(network, run.base_seconds, count_parameters(run.base))
        return trained
    return method


def _from_scratch(key: str, build: Callable[[nn.Module, Run], object],
                  network: Optional[Callable[[object, Run], Callable]] = None) -> Callable[[Run], Trained]:
    """Slimmable, US-Nets, INN: a fresh model trained on the data-matched number of batches.
    ``network(trainer, run)`` picks how it is sampled (default: ``trainer.network``); rows of the
    same ``key`` sample one trained model differently and share its training within a process."""
    def method(run: Run) -> Trained:
        c = run.config
        if key not in run.trainers:
            torch.manual_seed(run.seed)
            trainer = build(create_model(c.model), run)
            started = time.perf_counter()
            trainer.train(run.data, run.matched_epochs * len(run.data.train), c.lr, c.device, seed=run.seed)
            seconds = time.perf_counter() - started
            stored = sum(p.numel() for p in trainer.parameters()) if hasattr(trainer, "parameters") \
                else count_parameters(trainer.model)
            run.trainers[key] = trainer, Trained(trainer.network, seconds, stored)
        trainer, trained = run.trainers[key]
        return trained if network is None else dataclasses.replace(trained, network=network(trainer, run))
    return method


def _slimmable(model, run):
    from .baselines import Slimmable
    return Slimmable(model, run.data.example, groups=run.config.groups,
                     widths=(1.0, 0.5 * (1 + run.config.fit.min_width), run.config.fit.min_width))


def _usnet(min_width=None):
    def build(model, run):
        from .baselines import USNet
        return USNet(model, run.data.example, groups=run.config.groups,
                     min_width=min_width or run.config.fit.min_width)
    return build


def _inn(model, run):
    from .baselines import INN
    return INN(model, run.data.example, groups=run.config.groups, min_width=run.config.fit.min_width)


# name -> (how it is trained, what the row says about its protocol)
METHODS: Dict[str, tuple] = {
    "neumeta": (_neumeta, "fitted from the base model; calibrated sampling"),
    "individual": (lambda run: _individual(run, run.config.epochs), "one model per width, the base's epochs"),
    "individual-matched": (lambda run: _individual(run, run.matched_epochs),
                           "one model per width, as many images as base + manifold"),
    "distill": (lambda run: _individual(run, run.config.epochs, teacher=run.base),
                "one model per width, the base as teacher, the base's epochs"),
    **{f"prune-{imp}": (_pruning(imp), f"torch-pruning, {imp} importance, from the base model")
       for imp in ("l1", "l2", "taylor", "hessian", "random")},
    "slimmable": (_from_scratch("slimmable", _slimmable), "switchable BatchNorm at 3 trained widths; nearest switch elsewhere"),
    "slimmable-recalibrated": (_from_scratch("slimmable", _slimmable, lambda trainer, run: lambda counts: trainer.network(
        counts, bn="recalibrate")), "the slimmable model above; BatchNorm statistics re-measured at every width"),
    "usnet": (_from_scratch("usnet", _usnet()), "sandwich rule + in-place distillation over the trained range"),
    "usnet-wide": (_from_scratch("usnet-wide", _usnet(0.25)), "as usnet, trained down to width 0.25"),
    "inn": (_from_scratch("inn", _inn), "continuous weights, uniform resampling, over the trained range"),
}
BATCHNORM_ONLY = {"slimmable-recalibrated"}  # the same numbers as its plain row without BatchNorm


# --------------------------------------------------------------------------- running
def curve_widths(space: WidthSpace) -> List[float]:
    """Every integer width of the smallest morphed group, as multipliers."""
    smallest = min(space.full.values())
    return [k / smallest for k in range(1, smallest + 1)]


def _measure(trained: Trained, run: Run, widths: Sequence[float], curve: bool = False,
             desc: str = "test") -> Dict[str, float]:
    task, scores = run.data.task, {}
    network = (trained.curve_network if curve else None) or trained.network
    for width in progress_bar(iterable=widths, desc=desc, unit="width", leave=False):
        if trained.widths is not None and width not in trained.widths:
            continue
        module = network(run.counts(width)).to(run.config.device).eval()
        scores[f"{width:g}"] = task.evaluate(module, run.data.test, run.config.device)[task.metric]
    return scores


def protocol_of(name: str, config: CompareConfig) -> str:
    """What the method's row says about how it was trained (fine-tuned pruning says so)."""
    protocol = METHODS[name][1]
    if name.startswith("prune-") and config.finetune_steps:
        protocol += f"; fine-tuned {config.finetune_steps} steps per width"
    return protocol


def _kept(folder: Path, name: str, protocol: Optional[str] = None) -> Optional[dict]:
    """A method's numbers for one seed, as a finished run left them in ``folder``, if any; with
    ``protocol``, only numbers measured under it (pruning kept without fine-tuning is redone
    when fine-tuning is asked for, and the other way round)."""
    path = folder / f"{name}.json"
    kept = json.loads(path.read_text()) if path.exists() else None
    return None if kept is None or protocol not in (None, kept["protocol"]) else kept


def run_method(name: str, run: Run, log=print) -> dict:
    """One method on one seed, or its cached numbers."""
    protocol = protocol_of(name, run.config)
    kept = _kept(run.folder, name, protocol)
    if kept is not None:
        return kept
    path = run.folder / f"{name}.json"
    method = METHODS[name][0]
    trained = method(run)
    table = _measure(trained, run, run.config.widths, desc=f"{name}: test")
    result = {"method": name, "protocol": protocol, "seed": run.seed, "metric": run.data.task.metric,
              "seconds": trained.seconds,  # read after the table: fine-tuned pruning trains its widths there
              "stored_parameters": trained.stored_parameters,
              "table": table,
              "curve": (_measure(trained, run, curve_widths(run.space), curve=True, desc=f"{name}: curve")
                        if run.config.curve_samples else {})}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    log(f"seed {run.seed}: {name}: " + ", ".join(f"{w}: {100 * v:.2f}" for w, v in result["table"].items()))
    return result


def _base_model(config: CompareConfig, seed: int, data, folder: Path) -> Tuple[nn.Module, float]:
    """The seed's base model and the seconds its training took: kept in ``folder``, or trained now."""
    base_file = folder / "base.safetensors"
    base_seconds = _read_seconds(base_file) if base_file.exists() else None
    if base_seconds is not None:
        base = load_model(base_file)
    else:
        started = time.perf_counter()
        base = train_base(config.model, data, config.epochs, config.lr, seed, config.device, desc=f"base {seed}")
        base_seconds = time.perf_counter() - started
        _save_timed(base, base_file, base_seconds)
    return base.to(config.device).eval(), base_seconds


def compare(config: CompareConfig, log=print) -> str:
    """Run every (seed, method) not done yet; write and return the table."""
    names = list(config.methods) or list(METHODS)
    if not config.methods:
        from .baselines.slicing import has_batchnorm
        if not has_batchnorm(create_model(config.model)):
            names = [n for n in names if n not in BATCHNORM_ONLY]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    out = Path(config.out_dir)
    results: Dict[str, List[dict]] = {n: [] for n in names}
    for seed in config.seeds:
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        kept = {name: _kept(folder, name, protocol_of(name, config)) for name in names}
        if all(r is not None for r in kept.values()):
            # Every number of this seed is kept: no data, base model or training needed.
            for name in names:
                results[name].append(kept[name])
            continue
        data = load_data(config.data, seed)
        with torch.random.fork_rng():  # the widths depend on the architecture only; the seeds stay as they were
            space = WidthSpace(create_model(config.model).to(config.device).eval(), data.example.to(config.device),
                               groups=config.groups)
        run = Run(config, seed, data, space, folder, partial(_base_model, config, seed, data, folder))
        for name in names:
            results[name].append(kept[name] if kept[name] is not None else run_method(name, run, log))
    # --methods chooses what runs, not what the table shows: methods an earlier run of this
    # out_dir finished for every seed keep their rows, so running one more does not drop the rest
    for name in METHODS:
        if name not in results:
            finished = [_kept(out / f"seed{seed}", name) for seed in config.seeds]
            if all(r is not None for r in finished):
                results[name] = finished
    results = {name: results[name] for name in METHODS if name in results}
    table = summarise(results, config)
    (out / "table.md").write_text(table + "\n")
    _write_csv(results, out / "table.csv")
    draw_curves(results, config, out / "curve.png")
    return table


def _unseen(width: float, config: CompareConfig) -> bool:
    return not config.fit.min_width - 1e-9 <= width <= config.fit.max_width + 1e-9


def summarise(results: Dict[str, List[dict]], config: CompareConfig) -> str:
    heads = [f"γ {100 * (1 - w):g} %" + (" †" if _unseen(w, config) else "") for w in config.widths]
    lines = [f"| method | {' | '.join(heads)} | training | stored parameters | protocol |",
             "|---|" + "---|" * (len(heads) + 3)]
    for name, runs in results.items():
        cells = []
        for w in config.widths:
            values = [r["table"][f"{w:g}"] for r in runs if f"{w:g}" in r["table"]]
            cells.append(_cell(values))
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        lines.append(f"| {name} | {' | '.join(cells)} | {took} | {runs[0]['stored_parameters']:,} | "
                     f"{runs[0]['protocol']} |")
    lines.append("")
    lines.append(f"Test {config.data.dataset} {config.model}, mean ± std over seeds {list(config.seeds)}; "
                 f"† outside the trained range [{config.fit.min_width:g}, {config.fit.max_width:g}]; "
                 f"groups: {config.groups or 'every group'}; training time per seed on {config.device}.")
    return "\n".join(lines)


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _write_csv(results: Dict[str, List[dict]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "width", "metric", "seconds", "stored_parameters", "kind"])
        for name, runs in results.items():
            for r in runs:
                for kind in ("table", "curve"):
                    for width, value in r[kind].items():
                        writer.writerow([name, r["seed"], width, value, r["seconds"], r["stored_parameters"], kind])


def draw_curves(results: Dict[str, List[dict]], config: CompareConfig, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.axvspan(0, config.fit.min_width, color="0.9", label="unseen widths")
    colours = plt.get_cmap("tab20").colors
    for i, (name, runs) in enumerate(results.items()):
        kind = "curve" if any(r["curve"] for r in runs) else "table"
        widths = sorted({float(w) for r in runs for w in r[kind]})
        means = [sum(r[kind][f"{w:g}"] for r in runs if f"{w:g}" in r[kind]) /
                 max(1, sum(f"{w:g}" in r[kind] for r in runs)) for w in widths]
        # one colour each; families told apart by line: pruning dashed, separately trained models dotted
        separate = name.startswith(("individual", "distill"))  # one model per width: only those widths
        # tab20 pairs a strong and a light shade: the ten strong ones first, then the light ones
        style = dict(linewidth=1.2, color=colours[2 * i % 20 + i // 10 % 2], marker="o" if separate else None,
                     linestyle="--" if name.startswith("prune") else ":" if separate else "-")
        if name == "neumeta":
            style = dict(linewidth=2.5, color="black")
        ax.plot(widths, [100 * m for m in means], label=name, **style)
    ax.set_xlabel("width multiplier")
    ax.set_ylabel(f"test {next(iter(results.values()))[0].get('metric', 'accuracy')} %")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

