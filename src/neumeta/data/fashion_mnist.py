"""Fashion-MNIST as in-memory tensors: train / validation / test splits.

The whole dataset is 70k 28x28 images (55 MB as float32), so it is loaded once into tensors
and batched by TensorLoader, rather than read image by image.

Model selection uses the validation split, carved out of the 60k training images; the 10k
test images are kept apart for the final tables only.
"""

import http.client
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .idx import read_idx
from .splits import Split, Splits, hold_out

# Per-pixel mean and std of the 60k Fashion-MNIST training images, with pixels scaled to [0, 1].
# Fixed constants rather than recomputed, so every split and every run is normalised the same way.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

IMAGE_SIZE = 28

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# Where Debian's `dataset-fashion-mnist` package installs the gzipped files.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where downloads go; expanded at call time so HOME can change (tests, containers).
CACHE_DIR = Path("~/.cache/neumeta/fashion-mnist")
DATA_DIR_ENV = "NEUMETA_DATA_DIR"
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 60

def load_fashion_mnist(
    data_dir=None, val_size: int = 5000, seed: int = 0, download: bool = True
) -> Splits:
    """Find (or download) Fashion-MNIST and return seeded, disjoint train / val splits plus test.

    Looks only in `data_dir` (else $NEUMETA_DATA_DIR) when one is named; otherwise in the Debian
    package's directory, then the user cache, and finally downloads into the user cache when
    `download` is true.
    """
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    files = find_fashion_mnist(data_dir, download)
    return hold_out(_read_split(files[TRAIN_IMAGES], files[TRAIN_LABELS]),
                    _read_split(files[TEST_IMAGES], files[TEST_LABELS]), val_size, seed)


def fashion_mnist_available(data_dir=None) -> bool:
    """Whether the files are on this machine (nothing is downloaded)."""
    try:
        find_fashion_mnist(data_dir, download=False)
        return True
    except FileNotFoundError:
        return False


def find_fashion_mnist(data_dir=None, download: bool = True) -> dict:
    """Map each of the four file names to an existing path, or raise FileNotFoundError saying why.

    A folder the user names (``data_dir``, else $NEUMETA_DATA_DIR) is the only place looked in:
    training on other data than the one asked for would be silently wrong. Without one, the
    Debian package's folder, then the user cache, then a download into that cache.
    """
    named = _named_dir(data_dir)
    if named is not None:
        return _files_in_named(*named)
    looked_in: List[Path] = []
    for directory in (SYSTEM_DIR, CACHE_DIR.expanduser()):
        looked_in.append(directory)
        files = _files_in(directory)
        if files is not None:
            return files

    cache = CACHE_DIR.expanduser()
    download_error = None
    if download:
        try:
            _download(cache)
            files = _files_in(cache)
            if files is not None:
                return files
            download_error = f"files missing from {cache} after download"
        except (OSError, http.client.HTTPException, ValueError) as error:
            download_error = f"{type(error).__name__}: {error}"

    places = "\n".join(f"  - {place}" for place in looked_in)
    message = (
        f"Fashion-MNIST not found. Looked for {', '.join(FILE_NAMES)} (optionally .gz) in:\n{places}\n"
    )
    if download_error is not None:
        message += f"Download from {DOWNLOAD_URL} into {cache} failed: {download_error}\n"
    else:
        message += "Download was disabled.\n"
    message += (
        "Fix: pass --data-dir DIR (or set NEUMETA_DATA_DIR) to a directory holding the four files, "
        "or install them with `apt-get install dataset-fashion-mnist`."
    )
    raise FileNotFoundError(message)


def _named_dir(data_dir) -> Optional[Tuple[Path, str]]:
    """(folder, how it was named) where the user named one: ``data_dir``, else $NEUMETA_DATA_DIR."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "--data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    return None


def _files_in_named(root: Path, option: str) -> dict:
    """The four files in a folder the user named (or its fashion-mnist subfolder), else an error
    naming the folder and what it lacks."""
    if not root.is_dir():
        raise FileNotFoundError(f"{option} {root}: no such folder (when a folder is named, Fashion-MNIST is "
                                f"looked for only there; leave {option} out to use the default places)")
    folders = (root, root / "fashion-mnist")
    for directory in folders:
        files = _files_in(directory)
        if files is not None:
            return files
    missing = [name for name in FILE_NAMES
               if not any((d / n).is_file() for d in folders for n in (name, f"{name}.gz"))]
    raise FileNotFoundError(f"{option} {root}: Fashion-MNIST is not there: missing {', '.join(missing)} "
                            f"(optionally .gz) in the folder or its fashion-mnist/ subfolder; leave {option} "
                            "out to use the Debian package's folder, the cache or a download")


def _files_in(directory: Path) -> Optional[dict]:
    """The four files in `directory` (raw preferred over .gz), or None if any is missing."""
    files = {}
    for name in FILE_NAMES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                files[name] = candidate
                break
        else:
            return None
    return files


def _download(cache: Path) -> None:
    """Fetch the missing .gz files into `cache`, each checked to parse before it is moved in place.

    Writing to a temp file and os.replace-ing it means an interrupted download never leaves a
    half-written file that a later run would pick up.
    """
    cache.mkdir(parents=True, exist_ok=True)
    for name in FILE_NAMES:
        target = cache / f"{name}.gz"
        if target.is_file():
            continue
        handle, temp_name = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".gz.part")
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(
                DOWNLOAD_URL + f"{name}.gz", timeout=DOWNLOAD_TIMEOUT_S
            ) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            read_idx(temp_name)
            os.replace(temp_name, target)
        finally:
            if os.path.exists(temp_name):
                os.remove(temp_name)


def _read_split(images_path: Path, labels_path: Path) -> Split:
    """Images as normalised float32 [N,1,28,28] and labels as int64 [N], with shapes checked."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{images_path}: expected images of shape [N,28,28], got {list(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels of shape [N], got {list(labels.shape)}")
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels but {images_path} has {len(images)} images"
        )

    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32)
    x = x.div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def load_fashion_mnist_32x3(data_dir=None, val_size: int = 5000, seed: int = 0, download: bool = True) -> Splits:
    """A stand-in for CIFAR-shaped data where CIFAR cannot be had: the real Fashion-MNIST images,
    padded with black to 32x32 and repeated over 3 channels, so a CIFAR-style network (3x32x32
    inputs) trains and is measured on real images. It is Fashion-MNIST, not CIFAR: its numbers
    are not comparable with CIFAR's."""
    splits = load_fashion_mnist(data_dir, val_size, seed, download)
    black = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD  # a black pixel, normalised

    def widen(split: Split) -> Split:
        x, y = split
        pad = (32 - IMAGE_SIZE) // 2
        return torch.nn.functional.pad(x, (pad, pad, pad, pad), value=black).expand(-1, 3, -1, -1).contiguous(), y
    return Splits(train=widen(splits.train), val=widen(splits.val), test=widen(splits.test))
