"""Files: manifolds and sampled networks as safetensors with JSON metadata, written atomically.

A manifold file holds the INR's weights, the reference (folded) network's weights and the
metadata needed to rebuild both — model name and arguments, example input shape, groups, INR
and coordinate settings — so loading needs no training script. A sampled network's file holds
its weights and the registry arguments that rebuild its skeleton.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .coords import CoordConfig
from .fold import fold_batchnorm
from .groups import WidthSpace
from .inr import NO_GRID, INRConfig
from .manifold import WeightManifold
from .models import create_model, width_kwargs

MANIFOLD_FORMAT = "neumeta-manifold/1"
MODEL_FORMAT = "neumeta-model/1"


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file.

    The temporary file is ``.{name}.{pid}.{random}.tmp`` beside ``path``; a process killed while
    writing leaves one behind, so each write first removes those of ``path`` whose process is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, or a power cut could leave it empty
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _remove_stale_temporaries(path) -> None:
    """Remove ``atomic_write``'s temporary files for ``path`` left by processes no longer alive."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):-len(".tmp")].split(".", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue  # another naming (not ours to judge) or a write still under way
        try:
            os.remove(path.parent / name)
        except OSError:  # removed meanwhile by another writer
            pass


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # there os.kill ends the process: never ask
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, OSError):
        return True  # not a pid we can check: keep its file
    return True


def _contiguous(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _read(path, expected_format: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable neumeta file (corrupt or truncated?): {err}") from err
    if meta.get("format") != expected_format:
        raise ValueError(f"{path}: expected a {expected_format!r} file, found format {meta.get('format')!r}")
    try:
        return tensors, json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: metadata is missing or corrupt: {err}") from err


def _example_shape(example_inputs):
    if isinstance(example_inputs, (list, tuple)):
        return [list(t.shape) for t in example_inputs]
    return list(example_inputs.shape)


def _example_from_shape(shape):
    if shape and isinstance(shape[0], list):
        return tuple(torch.zeros(s) for s in shape)
    return torch.zeros(shape)


def save_manifold(manifold: WeightManifold, path, extra: Optional[dict] = None) -> Path:
    space = manifold.space
    name = getattr(space.model, "neumeta_name", None)
    config = {
        "model": name,
        "model_kwargs": getattr(space.model, "neumeta_kwargs", {}),
        "example_input_shape": _example_shape(space.example_inputs),
        "groups": list(space.groups),
        "fixed": list(space.output_layers),
        "inr": dataclasses.asdict(manifold.inr_config),
        "coords": dataclasses.asdict(manifold.coord_config),
        "noise_counts": manifold.noise_counts,
        "full_width_choice": manifold.full_width_choice,
        "trained_calibrated": manifold.trained_calibrated,
        "extra": extra or {},
    }
    tensors = {f"inr.{k}": v for k, v in manifold.state_dict().items()}
    tensors.update({f"model.{k}": v for k, v in space.model.state_dict().items()})
    meta = {"format": MANIFOLD_FORMAT, "config": json.dumps(config)}
    return atomic_write(path, lambda tmp: save_file(_contiguous(tensors), tmp, metadata=meta))


def load_manifold(path, model: Optional[nn.Module] = None, map_location: str = "cpu") -> WeightManifold:
    """Rebuild a manifold from ``path``. ``model`` is needed only for networks outside the registry."""
    tensors, config = _read(path, MANIFOLD_FORMAT)
    if model is None:
        if not config.get("model"):
            raise ValueError(f"{path}: the network is not from the registry; pass model= (an instance of "
                             f"the same architecture) to load it")
        model = create_model(config["model"], **config.get("model_kwargs", {}))
        model.neumeta_kwargs = config.get("model_kwargs", {})
    example = _example_from_shape(config["example_input_shape"])
    folded = fold_batchnorm(model, example)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        folded.load_state_dict(model_state)
    except RuntimeError as err:
        raise ValueError(f"{path}: stored network weights do not fit the model: {err}") from err
    space = WidthSpace(folded, example, groups=config["groups"], fixed=config.get("fixed", ()))
    # a file written before the grid existed, or before it became the default, has none
    inr = {**NO_GRID, **config["inr"]}
    manifold = WeightManifold(space, INRConfig(**inr), CoordConfig(**config["coords"]))
    manifold.noise_counts = config.get("noise_counts")
    manifold.full_width_choice = config.get("full_width_choice")
    manifold.trained_calibrated = bool(config.get("trained_calibrated", False))
    inr_state = {k[len("inr."):]: v for k, v in tensors.items() if k.startswith("inr.")}
    try:
        manifold.load_state_dict(inr_state)
    except RuntimeError as err:
        raise ValueError(f"{path}: stored INR weights do not fit its configuration: {err}") from err
    manifold.extra = config.get("extra", {})
    return manifold.to(map_location)


def save_model(module: nn.Module, path) -> Path:
    """Write a registry network (e.g. a sampled one) so ``load_model`` rebuilds it anywhere."""
    name = getattr(module, "neumeta_name", None)
    if name is None:
        raise ValueError("save_model needs a network built from the registry (create_model or sample); "
                         "for other networks use torch.save")
    kwargs = dict(getattr(module, "neumeta_kwargs", {}))
    widths = getattr(module, "neumeta_widths", None)
    if widths:  # a sampled network: its widths replace the base model's width arguments
        kwargs.update(width_kwargs(name, widths))
    config = {"model": name, "model_kwargs": kwargs}
    meta = {"format": MODEL_FORMAT, "config": json.dumps(config)}
    return atomic_write(path, lambda tmp: save_file(_contiguous(module.state_dict()), tmp, metadata=meta))


def load_model(path) -> nn.Module:
    """Rebuild a network written by ``save_model``: registry skeleton, BN folded, weights loaded."""
    tensors, config = _read(path, MODEL_FORMAT)
    model = create_model(config["model"], **config["model_kwargs"])
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and not any(k.endswith("running_mean") for k in tensors):
        model = fold_batchnorm(model)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise ValueError(f"{path}: stored weights do not fit {config['model']}({config['model_kwargs']}): {err}") from err
    model.neumeta_kwargs = config["model_kwargs"]
    return model.eval()
