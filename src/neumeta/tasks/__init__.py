"""Tasks: what a network is trained for — its loss and its metrics — as one object.

``fit`` and the trainers only call ``task.loss`` and ``task.evaluate``, so segmentation and
generation plug in without changing them.
"""
from .classification import ClassificationTask
from .segmentation import SegmentationTask
from .vae import VAETask

__all__ = ["ClassificationTask", "SegmentationTask", "VAETask"]
