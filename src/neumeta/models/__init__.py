"""Model registry; importing this package registers every model."""
from .registry import create_model, list_models, register_model
from . import lenet  # noqa: F401  (registers)

__all__ = ["create_model", "list_models", "register_model"]
