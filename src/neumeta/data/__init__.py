"""Datasets as in-memory tensors, and a fast loader over them."""

from .fashion_mnist import Splits, load_fashion_mnist
from .idx import read_idx
from .loader import TensorLoader

__all__ = ["read_idx", "load_fashion_mnist", "Splits", "TensorLoader"]
