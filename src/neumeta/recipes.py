"""Named training recipes: sets of ``fit`` and coordinate options that belong together.

``default`` is the library's own recipe (the dataclass defaults, chosen on the validation split,
see the README); ``paper`` is NeuMeta as the paper writes it, so anyone can compare. A recipe
only sets the options below; the schedule (steps, pre-fit, learning rate, width range) is left
to the caller, so two recipes can be compared on the same budget.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Tuple

from .coords import CoordConfig
from .train import FitConfig

RECIPES: Dict[str, Dict[str, dict]] = {
    "default": {},
    # Section 3 and the implementation details of the paper: coordinates v = [l/L, c_in/C_in,
    # c_out/C_out, L/N, C_in/N, C_out/N] (Eq. 3), lambda_1 = 1 on the squared norms (Eq. 10),
    # one configuration per batch, no warm-up, no distillation.
    "paper": {
        "coords": {"size_terms": True, "positions": "index"},
        "fit": {"recon_weight": 1.0, "recon_reduction": "sum", "warmup": 0.0, "per_group": False,
                "inplace_distill": False, "sandwich": False, "original_distill": False},
    },
}


def recipe_options(name: str) -> Dict[str, dict]:
    """The option tree (``{"fit": {...}, "coords": {...}}``) that recipe ``name`` sets."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


def recipe(name: str = "default", **fit_options) -> Tuple[FitConfig, CoordConfig]:
    """``(FitConfig, CoordConfig)`` of recipe ``name``; ``fit_options`` override (e.g. ``steps``)."""
    options = recipe_options(name)
    fit = dataclasses.replace(FitConfig(), **{**options.get("fit", {}), **fit_options})
    return fit, CoordConfig(**options.get("coords", {}))


def merge_recipe(values: dict) -> dict:
    """Put the recipe named in ``values["recipe"]`` under the explicit options of ``values``."""
    name = values.get("recipe", "default")
    merged = recipe_options(name)

    def deep(into: dict, new: dict):
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                deep(into[key], value)
            else:
                into[key] = value
    deep(merged, values)
    return merged
