"""Recipe benchmark: every recipe variant, 3 seeds, against individually trained LeNets.

    python benchmarks/recipe.py --quick          # 1 seed, short schedule (< 20 min on a 2-core CPU)
    python benchmarks/recipe.py                  # 3 seeds, the demo's schedule (hours on a CPU)
    python benchmarks/recipe.py --device cuda --variants default paper

Same as ``neumeta recipe-benchmark``; writes benchmarks/results/recipe(-quick).{md,json,png}.
"""
import sys

from neumeta.cli import main

if __name__ == "__main__":
    main(["recipe-benchmark", *sys.argv[1:]])
