"""The first joint steps of a fit, from a pre-fit already done, under other joint options.

    python benchmarks/joint_start.py runs/compare-resnet20-every/seed0/neumeta.ckpt \\
        --config configs/compare-resnet20-every.yaml --steps 200 --set lr=0.0002

Why: an every-layer ResNet-20 pre-fit costs 10-20 minutes here, and whether the joint phase
survives its first hundred steps is what is being tuned (docs/benchmarks.md, "Reconstruction
after the pre-fit"). This loads the INR (its EMA) from a ``fit`` checkpoint written at the end of
the pre-fit, fits ``--steps`` joint steps with the config's fit options overridden by ``--set``,
validating every ``--eval-every`` steps, and prints the validation history and any rollback of
the divergence guard. ``--start-only`` fits nothing: it scores the checkpoint's own widths
with plain and with calibrated sampling (``sample``'s statistics calibration), which tells whether
the narrower networks the joint phase starts from are wrong in their weights or only in the
scale of their activations.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import neumeta  # noqa: F401
except ImportError:  # let the script run without PYTHONPATH=src as well
    sys.path.insert(0, str(ROOT / "src"))
import neumeta as nm
from neumeta.checkpoint import load_checkpoint
from neumeta.cli import parse_command
from neumeta.config import ConfigError, parse_overrides
from neumeta.experiment import build_manifold, load_data


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a fit checkpoint written when (or after) the pre-fit ended")
    parser.add_argument("--config", required=True, help="the compare config the checkpoint was fitted with")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=2000, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-only", action="store_true",
                        help="no joint steps: validation at --widths, plain and calibrated sampling")
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--samples", type=int, default=10, help="K noisy draws per weight (--start-only)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="FitConfig overrides (lr=0.0002), CoordConfig ones prefixed (coords.noise=0)")
    args = parser.parse_args(argv)
    _, config = parse_command(["compare", "--config", args.config])
    try:
        parsed = parse_overrides(args.set, {"fit": nm.FitConfig, "coords": nm.CoordConfig}, default="fit")
    except ConfigError as err:
        parser.error(str(err))
    overrides, coords = parsed["fit"], parsed["coords"]
    saved = load_checkpoint(args.checkpoint)
    if saved["state"]["step"] < saved["config"]["prefit_steps"]:
        parser.error(f"{args.checkpoint}: written at step {saved['state']['step']}, before its pre-fit ended")
    data = load_data(dataclasses.replace(config.data, eval_size=args.eval_size), args.seed)
    base = nm.load_model(Path(args.checkpoint).parent / "base.safetensors")
    manifold = build_manifold(base, data.example, config.inr, dataclasses.replace(config.coords, **coords),
                              groups=config.groups, seed=args.seed,
                              log=lambda *_: None).to(config.device)
    manifold.load_state_dict(saved["ema"])
    if args.start_only:
        return start_scores(manifold, data, args)
    fit = dataclasses.replace(config.fit, prefit_steps=0, steps=args.steps, eval_every=args.eval_every,
                              seed=args.seed, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = nm.fit(manifold, data.task, data.train, data.val, fit)
    changed = {**overrides, **{f"coords.{k}": v for k, v in coords.items()}}
    print(f"from step {saved['state']['step']} of {args.checkpoint}, {args.steps} joint steps, {changed or 'as configured'}")
    for row in result.history:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    for event in result.rollbacks:
        print(f"  rollback at step {event['step']}: {event['why']}")
    return result.history


def start_scores(manifold, data, args) -> dict:
    """Validation accuracy of the INR's network at each width, plain and calibrated sampling."""
    from neumeta.calibrate import calibration_inputs
    manifold.eval()
    reference = manifold.calibration_reference(calibration_inputs(data.train, 20), args.samples, args.seed)
    scores = {}
    for width in args.widths:
        row = {}
        for how, calibration in (("plain", None), ("calibrated", reference)):
            network = manifold.sample(width, samples=args.samples, seed=args.seed, calibration=calibration,
                                      full_width="inr")
            row[how] = data.task.evaluate(network, data.val)[data.task.metric]
        scores[width] = row
        print(f"  width {width:g}: plain {100 * row['plain']:.2f} %, calibrated {100 * row['calibrated']:.2f} %",
              flush=True)
    return scores


if __name__ == "__main__":
    main()
