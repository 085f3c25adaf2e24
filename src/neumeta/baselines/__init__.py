"""The methods NeuMeta is compared with, each behind the same small interface.

Every baseline is trained on an ``experiment.Data`` and then gives a plain ``nn.Module`` at a
width ``counts`` (``{group: channels}``, the groups ``WidthSpace`` names, so every method is
measured at the same channel counts as the manifold).
"""
from .distill import DistillationTask, train_distilled
from .inn import INN, ResampledNetwork
from .narrow import first_channels, narrow_copy, pruning_groups
from .pruning import IMPORTANCES, channel_scores, finetune, highest, kept_channels, prune
from .slicing import SlicedNetwork, recalibrate_batchnorm
from .slimmable import Slimmable
from .usnet import USNet

__all__ = ["DistillationTask", "IMPORTANCES", "INN", "ResampledNetwork", "SlicedNetwork", "Slimmable", "USNet",
           "channel_scores", "finetune", "first_channels", "highest", "kept_channels", "narrow_copy", "prune",
           "pruning_groups", "recalibrate_batchnorm", "train_distilled"]
