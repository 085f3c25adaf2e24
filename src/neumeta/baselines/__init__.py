"""The methods NeuMeta is compared with, each behind the same small interface.

Every baseline is trained on an ``experiment.Data`` and then gives a plain ``nn.Module`` at a
width ``counts`` (``{group: channels}``, the groups ``WidthSpace`` names, so every method is
measured at the same channel counts as the manifold).
"""
from .narrow import first_channels, narrow_copy, pruning_groups

__all__ = ["first_channels", "narrow_copy", "pruning_groups"]
