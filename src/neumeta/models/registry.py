"""A registry of model builders, so every tool can build a network by name.

Models register themselves with ``@register_model``; ``create_model(name, **kwargs)`` builds
one. Every hidden width is a constructor argument named after the channel group it sets, so a
sampled network's widths can be handed straight back to ``create_model``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``fn`` buildable as ``create_model(fn.__name__)``."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> List[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its constructor."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    model.neumeta_name = name  # lets checkpoints record how to rebuild the network
    model.neumeta_kwargs = dict(kwargs)
    return model
