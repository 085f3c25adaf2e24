"""A registry of model builders, so every tool can build a network by name.

Models register themselves with ``@register_model``; ``create_model(name, **kwargs)`` builds
one. Every hidden width is a constructor argument named after the channel group it sets, so a
sampled network's widths can be handed straight back to ``create_model``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_INPUT_SHAPES: Dict[str, Tuple[int, ...]] = {}
_WIDTH_ARGS: Dict[str, Callable[[Dict[str, int]], Dict]] = {}


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *, input_shape: Tuple[int, ...] = (1, 28, 28),
                   width_args: Optional[Callable[[Dict[str, int]], Dict]] = None):
    """Decorator: make ``fn`` buildable as ``create_model(fn.__name__)``.

    ``input_shape`` (one sample, no batch) is what tools use to trace the default model.
    ``width_args`` turns ``{channel group: channels}`` into constructor arguments (default: the
    group names are the argument names). Use as ``@register_model`` or with keywords.
    """
    def register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = f
        _INPUT_SHAPES[name] = tuple(input_shape)
        _WIDTH_ARGS[name] = width_args or dict
        return f
    return register(fn) if fn is not None else register


def width_kwargs(name: str, counts: Dict[str, int]) -> Dict:
    """Constructor arguments that build the registered model ``name`` at channel ``counts``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _WIDTH_ARGS[name](dict(counts))


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    """A random input of the shape the registered model ``name`` expects by default."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return torch.randn((batch,) + _INPUT_SHAPES[name])


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
