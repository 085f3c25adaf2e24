"""neumeta: Neural Metamorphosis — one implicit representation of a network family's weights.

    model = nm.create_model("lenet")
    model, report = nm.smooth(nm.fold_batchnorm(model), x)
    space = nm.WidthSpace(model, x)
    manifold = nm.WeightManifold(space)
    nm.fit(manifold, task, train_loader, val_loader)
    small = manifold.sample(0.5)
"""
from .coords import CoordConfig
from .fold import fold_batchnorm
from .groups import WidthSpace
from .inr import INRConfig
from .io import load_manifold as load, load_model, save_model
from .manifold import WeightManifold
from .models import create_model, list_models, register_model
from .recipes import recipe, recipe_inr
from .smooth import SmoothReport, smooth, total_variation
from .tasks import ClassificationTask
from .tasks import SegmentationTask, VAETask
from .flops import count_flops
from .train import DivergenceError, FitConfig, FitResult, NeverLearnedWarning, PoorReconstructionWarning, fit

__version__ = "0.1.0"

__all__ = [
    "CoordConfig", "DivergenceError", "FitConfig", "FitResult", "INRConfig", "NeverLearnedWarning", "WeightManifold",
    "PoorReconstructionWarning", "WidthSpace",
    "ClassificationTask", "create_model", "fit", "fold_batchnorm", "list_models", "load",
    "load_model", "recipe", "recipe_inr", "register_model", "save_model", "smooth", "SmoothReport", "total_variation",
]
__all__ += ["SegmentationTask", "VAETask", "count_flops"]
