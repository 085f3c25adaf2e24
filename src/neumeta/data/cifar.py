"""CIFAR-10 and CIFAR-100 from their own "python version" files, which a user downloads once.

The files are pickles (``cifar-10-batches-py/data_batch_1`` .. ``_5`` and ``test_batch``;
``cifar-100-python/train`` and ``test``), each a dict holding ``data`` (uint8 [N, 3072], the
red, green then blue planes of 32x32 images) and ``labels`` (CIFAR-10) or ``fine_labels``
(CIFAR-100). A pickle can run code, so they are read by an unpickler that builds nothing but
plain containers and numpy arrays: a file asking for anything else is refused, naming it.
Nothing is downloaded (this project's machines cannot); ``data_dir`` is required.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from .splits import Split, Splits, hold_out

# Per-channel mean and std of the 50k CIFAR training images (pixels in [0, 1]): the usual constants.
CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
LAYOUT = {  # folder, training files, test file, label key
    10: ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels"),
    100: ("cifar-100-python", ("train",), "test", "fine_labels"),
}
# what numpy arrays pickle to; nothing else may be built
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}: a CIFAR file holds only arrays, "
                                     "lists and dicts")


def read_cifar_file(path) -> dict:
    """One CIFAR pickle as a dict with str keys, without running anything it asks for."""
    path = Path(path)
    try:
        loaded = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as err:  # any unpickling failure: truncated, not a pickle, a forbidden class
        raise ValueError(f"{path}: not a CIFAR batch file ({err})") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a CIFAR batch file (a {type(loaded).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in loaded.items()}


def _read_images(path: Path, label_key: str, classes: int) -> Split:
    batch = read_cifar_file(path)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data of shape [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {labels.size} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"{path}: labels must lie in 0..{classes - 1}, found {labels.min()}..{labels.max()}")
    x = torch.from_numpy(data.copy()).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CIFAR_MEAN[classes], CIFAR_STD[classes]))
    return (x - mean) / std, torch.from_numpy(labels.astype(np.int64))


def find_cifar(data_dir, classes: int) -> Tuple[list, Path]:
    """(training files, test file) of CIFAR-``classes`` in ``data_dir`` or its usual sub-folder."""
    folder, train_names, test_name, _ = LAYOUT[classes]
    if data_dir is None:
        raise FileNotFoundError(f"CIFAR-{classes} cannot be downloaded here: pass --data-dir, the folder holding "
                                f"{folder}/ (the 'python version' from the CIFAR page)")
    root = Path(data_dir).expanduser()
    for candidate in (root / folder, root):
        if all((candidate / name).is_file() for name in (*train_names, test_name)):
            return [candidate / n for n in train_names], candidate / test_name
    missing = [n for n in (*train_names, test_name) if not (root / folder / n).is_file() and not (root / n).is_file()]
    raise FileNotFoundError(f"--data-dir {root}: no CIFAR-{classes} files there or in {root / folder} "
                            f"(missing: {', '.join(missing)})")


def load_cifar(classes: int = 10, data_dir=None, val_size: int = 5000, seed: int = 0) -> Splits:
    """CIFAR-10 (``classes=10``) or CIFAR-100: seeded train / validation splits and the test split."""
    if classes not in LAYOUT:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {classes}")
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    train_files, test_file = find_cifar(data_dir, classes)
    label_key = LAYOUT[classes][3]
    parts = [_read_images(f, label_key, classes) for f in train_files]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return hold_out(train, _read_images(test_file, label_key, classes), val_size, seed)
