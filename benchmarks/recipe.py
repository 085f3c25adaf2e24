"""Recipe benchmark: every recipe variant over seeds, against individually trained LeNets.

    python benchmarks/recipe.py --quick          # 1 seed, short schedule (< 20 min on a 2-core CPU)
    python benchmarks/recipe.py                  # 3 seeds, the demo's schedule (hours on a CPU)
    python benchmarks/recipe.py --device cuda --variants default paper

Writes benchmarks/results/recipe(-quick).{md,json,png}; per-run results and models stay in the
run folder (runs/recipe, runs/recipe-quick). Options as in ``neumeta``: flags, or a YAML file
(``--config``) that may also hold the options of every ``neumeta`` command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` as a package, whatever the working directory
try:
    import neumeta  # noqa: F401
except ImportError:  # not installed: the source tree
    sys.path.insert(0, str(ROOT / "src"))

from benchmarks.recipe_benchmark import RecipeBenchmarkConfig, run  # noqa: E402
from neumeta.cli import CONFIGS, run_reporting_errors  # noqa: E402
from neumeta.config import HELP, add_options, load_config  # noqa: E402

BENCHMARK_HELP = {
    "quick": "one seed and a short schedule (a smoke run in minutes; not for conclusions)",
    "seeds": "seeds: each trains its own base and individual models and fits every variant",
    "variants": "variant names to run (default: the paper preset, the default and the ablation; candidate "
                "variants only when named, see candidate_flips and variants in benchmarks/recipe_benchmark.py)",
    "ablation_seeds": "run the variants other than paper and default on these seeds only (some of --seeds); "
                      "the table then has two parts: paper and default over every seed, all variants on these",
    "results": "path stem of the written table (.md), raw numbers (.json) and plot (.png); default "
               "benchmarks/results/recipe(-quick), or OUT_DIR/recipe for a changed schedule or candidate variants",
    "epochs": "epochs of the base and individual models (default: the schedule's, 4 or 1 with --quick)",
    "prefit_steps": "the fit's reconstruction-only steps (default: the schedule's)",
    "steps": "the fit's joint steps (default: the schedule's)",
    "out_dir": "run folder: models, checkpoints and per-run results; rerunning resumes from what is there "
               "(default: runs/recipe or runs/recipe-quick, suffixed with a changed schedule)",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/recipe.py", description=__doc__.split("\n")[0])
    add_options(parser, RecipeBenchmarkConfig, {**HELP, **BENCHMARK_HELP})
    return parser


def configured_run(args: argparse.Namespace) -> None:
    config = load_config(RecipeBenchmarkConfig, args, commands=CONFIGS)
    if config.quick and tuple(config.seeds) == (0, 1, 2):  # the quick run's one seed, unless others are named
        config.seeds = (0,)
    run(config)


def main(argv=None) -> None:
    run_reporting_errors(configured_run, make_parser().parse_args(argv))


if __name__ == "__main__":
    main()
