"""Named training recipes: sets of ``fit`` and coordinate options that belong together.

``default`` is the library's own recipe (the dataclass defaults, chosen on the validation split,
see docs/recipe.md): the INR, and in the trained range a grid of plain weights trained beside it.
``inr`` is that recipe without the grid, the INR at every width (the default until 2026-12-08);
``paper`` is NeuMeta as the paper writes it, so anyone can compare. A recipe only sets the
options below; the schedule (steps, pre-fit, learning rate, width range) is left to the caller,
so two recipes can be compared on the same budget.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Tuple

from .coords import CoordConfig
from .inr import INRConfig
from .train import FitConfig

RECIPES: Dict[str, Dict[str, dict]] = {
    "default": {},
    # the INR alone at every width: its own full width is 1-3 points under the base model it was
    # fitted from (full_width="best" samples the base there), the trained widths 2.1-3.4 under the
    # default's (benchmarks/results/recipe-grid-alone.md); every narrower width the same
    "inr": {"inr": {"grid": False}},
    # Section 3 and the implementation details of the paper: coordinates v = [l/L, c_in/C_in,
    # c_out/C_out, L/N, C_in/N, C_out/N] (Eq. 3), lambda_1 = 1 on the squared norms (Eq. 10),
    # one configuration per batch, no warm-up, no distillation.
    "paper": {
        "inr": {"grid": False},
        "coords": {"size_terms": True, "positions": "index"},
        "fit": {"recon_weight": 1.0, "recon_reduction": "sum", "warmup": 0.0, "per_group": False,
                "inplace_distill": False, "sandwich": False, "original_distill": False},
    },
}


def recipe_options(name: str) -> Dict[str, dict]:
    """The option tree (``{"fit": {...}, "coords": {...}, "inr": {...}}``) that recipe ``name`` sets."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


def recipe(name: str = "default", **fit_options) -> Tuple[FitConfig, CoordConfig]:
    """``(FitConfig, CoordConfig)`` of recipe ``name``; ``fit_options`` override (e.g. ``steps``).
    The recipe's INR options: ``recipe_inr``."""
    options = recipe_options(name)
    fit = dataclasses.replace(FitConfig(), **{**options.get("fit", {}), **fit_options})
    return fit, CoordConfig(**options.get("coords", {}))


def recipe_inr(name: str = "default", **inr_options) -> INRConfig:
    """The ``INRConfig`` of recipe ``name`` (whether it has a grid); ``inr_options`` override
    (e.g. ``hidden``)."""
    return INRConfig(**{**recipe_options(name).get("inr", {}), **inr_options})


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
