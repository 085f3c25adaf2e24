"""Model registry; importing this package registers every model."""
from .registry import create_model, example_input, list_models, register_model, width_kwargs
from . import lenet, resnet_cifar, resnet_imagenet, unet, vae  # noqa: F401  (registers)

__all__ = ["create_model", "example_input", "list_models", "register_model", "width_kwargs"]
