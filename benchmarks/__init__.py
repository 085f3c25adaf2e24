"""Measured comparisons and timings of neumeta: the lab beside the library (not installed, not run by CI).

Run a script from the repository root (``python benchmarks/recipe.py --quick``); tests import the
harnesses as ``benchmarks.<name>``.
"""
