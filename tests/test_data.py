"""Tests for the IDX reader, Fashion-MNIST loading and TensorLoader, on tiny generated files."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from neumeta.data import Splits, TensorLoader, load_fashion_mnist, read_idx
from neumeta.data import fashion_mnist

DTYPE_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype("int16"): 0x0B,
    np.dtype("int32"): 0x0C,
    np.dtype("float32"): 0x0D,
    np.dtype("float64"): 0x0E,
}

REAL_DATA = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode `array` as IDX: zero magic, type code, ndim, big-endian sizes, big-endian data."""
    header = bytes([0, 0, DTYPE_CODES[array.dtype], array.ndim])
    sizes = struct.pack(f">{array.ndim}I", *array.shape)
    return header + sizes + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` as IDX, gzipped when the name ends in .gz."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fake_fashion_mnist(directory: Path, n_train=40, n_test=12, gz=True, seed=0) -> dict:
    """Four IDX files with random 28x28 images, whose labels encode the image index (mod 256)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 256).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / f"{name}{suffix}", array)
    return arrays


@pytest.fixture
def no_default_places(tmp_path, monkeypatch):
    """Point the system directory and the user cache at empty dirs, and clear NEUMETA_DATA_DIR."""
    system_dir = tmp_path / "system"
    cache_dir = tmp_path / "cache"
    system_dir.mkdir()
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", system_dir)
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", cache_dir)
    monkeypatch.delenv("NEUMETA_DATA_DIR", raising=False)
    return system_dir, cache_dir


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_read_idx_round_trips_every_dtype(tmp_path, suffix, dtype):
    # Negative and multi-byte values (where the type allows) catch sign and byte-order mistakes.
    values = np.arange(30) * 8 if dtype == np.uint8 else (np.arange(30) - 7) * (1 if dtype == np.int8 else 301)
    array = values.reshape(2, 3, 5).astype(dtype)
    path = write_idx(tmp_path / f"values.idx{suffix}", array)

    result = read_idx(path)

    assert result.shape == (2, 3, 5)
    assert result.dtype == dtype
    np.testing.assert_array_equal(result, array)


def test_read_idx_gzip_detected_by_content_without_gz_name(tmp_path):
    array = np.array([1, 2, 300000], dtype=np.int32)
    path = tmp_path / "labels-idx1"
    path.write_bytes(gzip.compress(idx_bytes(array)))

    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_returns_a_writable_native_array(tmp_path):
    path = write_idx(tmp_path / "f.idx", np.array([1.5, -2.25], dtype=np.float32))

    result = read_idx(path)

    assert result.dtype.isnative
    assert result.flags.writeable
    assert torch.from_numpy(result).tolist() == [1.5, -2.25]


def test_read_idx_empty_array(tmp_path):
    empty = write_idx(tmp_path / "empty.idx", np.zeros((0, 28, 28), dtype=np.uint8))
    assert read_idx(empty).shape == (0, 28, 28)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "type"),
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x04\x01\x02", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "unexpected bytes"),
    ],
)
def test_read_idx_rejects_bad_files_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "bad-file.idx"
    path.write_bytes(content)

    with pytest.raises(ValueError) as error:
        read_idx(path)

    assert str(path) in str(error.value)
    assert problem in str(error.value)


def test_read_idx_truncated_gzip_raises_value_error(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(good[: len(good) // 2])

    with pytest.raises(ValueError, match="gzip") as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_read_idx_gz_name_with_garbage_raises_value_error(tmp_path):
    path = tmp_path / "garbage.idx.gz"
    path.write_bytes(b"this is not gzip at all")

    with pytest.raises(ValueError, match="gzip") as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_read_idx_missing_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "absent.idx"
    with pytest.raises(ValueError, match="absent.idx"):
        read_idx(path)


# ---------------------------------------------------------------- load_fashion_mnist


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_data_dir_shapes_dtypes_and_normalisation(tmp_path, no_default_places, gz):
    arrays = write_fake_fashion_mnist(tmp_path / "fm", n_train=40, n_test=12, gz=gz)

    splits = load_fashion_mnist(tmp_path / "fm", val_size=10, seed=0, download=False)

    assert isinstance(splits, Splits)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits.train, splits.val, splits.test
    assert train_x.shape == (30, 1, 28, 28) and val_x.shape == (10, 1, 28, 28)
    assert test_x.shape == (12, 1, 28, 28)
    for x, y in (splits.train, splits.val, splits.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert len(x) == len(y)

    expected_test = (arrays["t10k-images-idx3-ubyte"] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(test_x[:, 0].numpy(), expected_test, rtol=1e-5, atol=1e-5)
    assert test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()

    # Labels encode the source index, so each image must still sit next to its own label.
    train_images = arrays["train-images-idx3-ubyte"]
    for x, y in (splits.train, splits.val):
        source = train_images[y.numpy()]
        np.testing.assert_allclose(x[:, 0].numpy(), (source / 255.0 - 0.2860) / 0.3530, atol=1e-5)


def test_split_is_disjoint_covers_train_and_is_deterministic(tmp_path, no_default_places):
    write_fake_fashion_mnist(tmp_path / "fm", n_train=100)

    first = load_fashion_mnist(tmp_path / "fm", val_size=25, seed=3, download=False)
    again = load_fashion_mnist(tmp_path / "fm", val_size=25, seed=3, download=False)
    other = load_fashion_mnist(tmp_path / "fm", val_size=25, seed=4, download=False)

    train_ids, val_ids = set(first.train[1].tolist()), set(first.val[1].tolist())
    assert len(val_ids) == 25 and len(train_ids) == 75
    assert train_ids.isdisjoint(val_ids)
    assert train_ids | val_ids == set(range(100))
    assert torch.equal(first.val[1], again.val[1])
    assert torch.equal(first.train[0], again.train[0])
    assert set(other.val[1].tolist()) != val_ids


def test_val_size_too_large_is_rejected(tmp_path, no_default_places):
    write_fake_fashion_mnist(tmp_path / "fm", n_train=20)
    with pytest.raises(ValueError, match="val_size"):
        load_fashion_mnist(tmp_path / "fm", val_size=20, download=False)


def test_label_count_mismatch_names_the_file(tmp_path, no_default_places):
    directory = tmp_path / "fm"
    write_fake_fashion_mnist(directory, n_train=20)
    labels = directory / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(19, dtype=np.uint8))

    with pytest.raises(ValueError, match="19 labels") as error:
        load_fashion_mnist(directory, val_size=5, download=False)
    assert str(labels) in str(error.value)


def test_corrupt_file_in_data_dir_names_the_file(tmp_path, no_default_places):
    directory = tmp_path / "fm"
    write_fake_fashion_mnist(directory)
    broken = directory / "t10k-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:50])

    with pytest.raises(ValueError) as error:
        load_fashion_mnist(directory, val_size=5, download=False)
    assert str(broken) in str(error.value)


def test_env_var_with_fashion_mnist_subfolder(tmp_path, no_default_places, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "datasets" / "fashion-mnist", n_train=30, gz=False)
    monkeypatch.setenv("NEUMETA_DATA_DIR", str(tmp_path / "datasets"))

    splits = load_fashion_mnist(val_size=5, download=False)

    assert len(splits.train[0]) == 25 and len(splits.val[0]) == 5


def test_system_dir_is_used_when_nothing_else_is_given(tmp_path, no_default_places):
    system_dir, _ = no_default_places
    write_fake_fashion_mnist(system_dir, n_train=16)

    splits = load_fashion_mnist(val_size=4, download=False)

    assert len(splits.train[1]) == 12


def test_missing_everywhere_lists_places_and_fix(tmp_path, no_default_places):
    system_dir, cache_dir = no_default_places

    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist(download=False)

    message = str(error.value)
    for place in (system_dir, cache_dir):
        assert str(place) in message
    assert "--data-dir" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert not cache_dir.exists(), "download=False must not create the cache"


@pytest.mark.parametrize("how", ["argument", "environment"])
@pytest.mark.parametrize("state", ["missing", "empty", "partial"])
def test_a_named_folder_without_the_files_is_an_error_not_another_dataset(tmp_path, no_default_places,
                                                                         monkeypatch, how, state):
    """Data elsewhere (here: the system folder) is never used in place of the folder the user named."""
    system_dir, _ = no_default_places
    write_fake_fashion_mnist(system_dir, n_train=16)
    named = tmp_path / "mine"
    if state != "missing":
        named.mkdir()
    if state == "partial":
        write_fake_fashion_mnist(named, n_train=16)
        (named / "t10k-labels-idx1-ubyte.gz").unlink()
    if how == "environment":
        monkeypatch.setenv("NEUMETA_DATA_DIR", str(named))
    option = "--data-dir" if how == "argument" else "$NEUMETA_DATA_DIR"

    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist(named if how == "argument" else None, val_size=4, download=True)

    message = str(error.value)
    assert f"{option} {named}" in message
    assert ("no such folder" in message) == (state == "missing")
    if state == "partial":
        assert "missing t10k-labels-idx1-ubyte" in message and "train-images" not in message.split("missing")[1]
    assert not fashion_mnist.fashion_mnist_available(named if how == "argument" else None)


def test_failed_download_is_reported(tmp_path, no_default_places, monkeypatch):
    """A download source with no files (a local file:// URL, no network) must surface its error."""
    empty_source = tmp_path / "empty-source"
    empty_source.mkdir()
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_URL", empty_source.as_uri() + "/")

    with pytest.raises(FileNotFoundError, match="Download from .* failed") as error:
        load_fashion_mnist(download=True)

    _, cache_dir = no_default_places
    assert list(cache_dir.iterdir()) == [], "a failed download must leave no partial files"
    assert "train-images-idx3-ubyte" in str(error.value)


def test_download_fills_the_cache_atomically(tmp_path, no_default_places, monkeypatch):
    """Download from a local file:// mirror (no network) into the cache, then load from it."""
    mirror = tmp_path / "mirror"
    write_fake_fashion_mnist(mirror, n_train=20, n_test=6, gz=True)
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_URL", mirror.as_uri() + "/")

    splits = load_fashion_mnist(val_size=5, download=True)

    _, cache_dir = no_default_places
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        f"{name}.gz" for name in fashion_mnist.FILE_NAMES
    )
    assert len(splits.train[0]) == 15 and len(splits.test[0]) == 6


@pytest.mark.skipif(not REAL_DATA.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.delenv("NEUMETA_DATA_DIR", raising=False)

    splits = load_fashion_mnist(REAL_DATA.parent, val_size=5000, seed=0, download=False)

    assert splits.train[0].shape == (55000, 1, 28, 28)
    assert splits.val[0].shape == (5000, 1, 28, 28)
    assert splits.test[0].shape == (10000, 1, 28, 28)
    assert len(splits.train[0]) + len(splits.val[0]) == 60000
    all_train_x = torch.cat([splits.train[0], splits.val[0]])
    # The documented constants are the train statistics, so the normalised train set is ~N(0, 1).
    assert abs(all_train_x.mean().item()) < 1e-3
    assert abs(all_train_x.std().item() - 1.0) < 1e-3
    assert torch.bincount(splits.test[1]).tolist() == [1000] * 10
    assert torch.bincount(torch.cat([splits.train[1], splits.val[1]])).tolist() == [6000] * 10


# ---------------------------------------------------------------- TensorLoader


def arange_data(n):
    """x holds each sample's index as a float image, y holds the index itself."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n)


def epoch_ids(loader):
    ids = []
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y), "x and y batches must stay aligned"
        ids += y.tolist()
    return ids


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_visits_every_sample_once_per_epoch(shuffle):
    x, y = arange_data(103)
    loader = TensorLoader(x, y, batch_size=10, shuffle=shuffle)

    ids = epoch_ids(loader)

    assert sorted(ids) == list(range(103))
    assert len(loader) == 11
    assert [len(b) for b, _ in loader] == [10] * 10 + [3]
    assert (ids == list(range(103))) == (not shuffle)


def test_loader_drop_last_drops_the_incomplete_batch():
    loader = TensorLoader(*arange_data(103), batch_size=10, drop_last=True)
    ids = epoch_ids(loader)
    assert len(loader) == 10 and len(ids) == 100 and len(set(ids)) == 100


def test_set_epoch_changes_order_deterministically():
    loader = TensorLoader(*arange_data(50), batch_size=8, seed=1)
    epoch0 = epoch_ids(loader)
    assert epoch_ids(loader) == epoch0, "the order must not change without set_epoch"

    loader.set_epoch(1)
    epoch1 = epoch_ids(loader)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)

    twin = TensorLoader(*arange_data(50), batch_size=8, seed=1)
    twin.set_epoch(1)
    assert epoch_ids(twin) == epoch1


def test_different_seeds_give_different_orders():
    first = epoch_ids(TensorLoader(*arange_data(50), batch_size=8, seed=0))
    second = epoch_ids(TensorLoader(*arange_data(50), batch_size=8, seed=1))
    assert first != second


@pytest.mark.parametrize("epoch", [0, 5])
def test_rank_shards_are_disjoint_and_cover_the_data(epoch):
    data = arange_data(96)
    shards = []
    for rank in range(4):
        loader = TensorLoader(*data, batch_size=7, rank=rank, world_size=4, seed=2)
        loader.set_epoch(epoch)
        shards.append(epoch_ids(loader))

    assert all(len(shard) == 24 for shard in shards)
    seen = [i for shard in shards for i in shard]
    assert sorted(seen) == list(range(96))


def test_uneven_shards_are_padded_to_equal_batch_counts():
    data = arange_data(10)
    loaders = [TensorLoader(*data, batch_size=2, rank=r, world_size=3) for r in range(3)]
    shards = [epoch_ids(loader) for loader in loaders]

    assert [len(loader) for loader in loaders] == [2, 2, 2]
    assert [len(shard) for shard in shards] == [4, 4, 4]
    assert set(i for shard in shards for i in shard) == set(range(10))


def test_uneven_shards_with_drop_last_are_disjoint():
    data = arange_data(10)
    loaders = [TensorLoader(*data, batch_size=3, rank=r, world_size=3, drop_last=True) for r in range(3)]
    shards = [epoch_ids(loader) for loader in loaders]

    assert [len(loader) for loader in loaders] == [1, 1, 1]
    seen = [i for shard in shards for i in shard]
    assert len(seen) == 9 and len(set(seen)) == 9


def test_more_ranks_than_samples_still_gives_every_rank_a_batch():
    data = arange_data(2)
    shards = [epoch_ids(TensorLoader(*data, batch_size=4, rank=r, world_size=5)) for r in range(5)]
    assert all(len(shard) == 1 for shard in shards)
    assert set(i for shard in shards for i in shard) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(batch_size=4, rank=2, world_size=2), "rank"),
        (dict(batch_size=4, rank=-1, world_size=2), "rank"),
        (dict(batch_size=4, world_size=0), "world_size"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorLoader(*arange_data(10), **kwargs)


def test_loader_rejects_length_mismatch():
    x, y = arange_data(10)
    with pytest.raises(ValueError, match="same length"):
        TensorLoader(x, y[:9], batch_size=2)
