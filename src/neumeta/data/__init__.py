"""Datasets as in-memory tensors, and a fast loader over them."""

from .cifar import load_cifar, read_cifar_file
from .fashion_mnist import load_fashion_mnist, load_fashion_mnist_32x3
from .idx import read_idx
from .loader import TensorLoader
from .splits import Splits, hold_out

__all__ = ["read_idx", "read_cifar_file", "load_cifar", "load_fashion_mnist", "load_fashion_mnist_32x3", "Splits",
           "hold_out", "TensorLoader"]
