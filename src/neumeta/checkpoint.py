"""Training checkpoints without pickle: a crafted file can be refused, never run.

``torch.load(weights_only=False)`` executes whatever a pickle asks for, so a checkpoint handed
over by someone else could run code. Here a checkpoint is a safetensors file: every tensor of
the tree is stored under its key path ("inr/layers.0.weight"), and the rest of the tree goes
into the metadata as JSON, with tags for what JSON cannot say on its own, so that loading gives
back exactly the types that were saved:

    tuple               {"$tuple": [...]}
    inf, -inf, nan      {"$float": "inf" | "-inf" | "nan"}
    dict with non-str   {"$dict": [[key, value], ...]}   (also str keys that start with "$",
    keys (int, float)                                     which would read as a tag)
    tensor              {"$tensor": "<key in the safetensors file>"}

Lists, str-keyed dicts, str, int, float, bool and None are plain JSON. Anything else (an
object, a callable) is refused when saving, naming where in the tree it sits.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .io import atomic_write

CHECKPOINT_FORMAT = "neumeta-checkpoint/1"


def save_checkpoint(path, tree: Any) -> Path:
    """Write ``tree`` (nested dicts, lists and tuples of tensors and plain values) atomically."""
    tensors: Dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    meta = {"format": CHECKPOINT_FORMAT, "tree": json.dumps(encoded, allow_nan=False)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path) -> Any:
    """The tree ``save_checkpoint`` wrote, every tensor on the CPU (the caller moves them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path}: not a neumeta checkpoint (expected format {CHECKPOINT_FORMAT!r}, "
                                 f"found {meta.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable neumeta checkpoint (a pickle, corrupt or truncated?): {err}") from err
    try:
        return _decode(json.loads(meta["tree"]), tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: the checkpoint's metadata is missing or corrupt: {err!r}") from err


def _tensor_key(where: str, tensors: Dict[str, torch.Tensor]) -> str:
    key, n = where or "tensor", 1
    while key in tensors:  # key paths can collide only through keys that contain "/"
        key, n = f"{where}#{n}", n + 1
    return key


def _encode(value: Any, where: str, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = _tensor_key(where, tensors)
        # a copy of its own: safetensors refuses tensors that share memory (views, repeats)
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{where}/{k}" if where else k, tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            key_tensors: Dict[str, torch.Tensor] = {}
            encoded_key = _encode(k, f"{where}/key", key_tensors)
            if key_tensors:
                raise TypeError(f"checkpoint: cannot store a dict key holding a tensor at {where or '/'}")
            items.append([encoded_key, _encode(v, f"{where}/{k}" if where else str(k), tensors)])
        return {"$dict": items}
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__} at {where or '/'}: only tensors, "
                    "dicts, lists, tuples, str, int, float, bool and None")


def _decode(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "$tensor":
            return tensors[inner]
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "$float":
            return float(inner)  # "inf", "-inf", "nan"
        if tag == "$dict":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in inner}
    if any(k.startswith("$") for k in value):
        raise ValueError(f"unknown tag in {sorted(value)}")
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise ValueError(f"a dict key decoded to a {type(key).__name__}")
    return key
