"""CIFAR's own python-version files, read from tiny files written here, without running any pickle
code; and the 32x32 three-channel Fashion-MNIST stand-in for CIFAR-style networks."""
import os
import pickle

import numpy as np
import pytest
import torch

from neumeta.data import load_cifar, read_cifar_file
from neumeta.data.cifar import CIFAR_MEAN, CIFAR_STD
from neumeta.data.fashion_mnist import fashion_mnist_available, load_fashion_mnist, load_fashion_mnist_32x3
from neumeta.experiment import DataConfig, load_data


def write_cifar(root, classes, per_file=6, protocol=2, seed=0):
    """A CIFAR folder in the real layout with ``per_file`` random images per file; returns the
    images as written ([N, 3, 32, 32] uint8, training files then test) and their labels."""
    rng = np.random.default_rng(seed)
    if classes == 10:
        folder, names, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, names, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), key: labels, b"data": data}, f, protocol=protocol)
        written[name] = (data.reshape(-1, 3, 32, 32), labels)
    return written


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_files_read_back_as_written(tmp_path, classes, protocol):
    written = write_cifar(tmp_path, classes, protocol=protocol)
    splits = load_cifar(classes, data_dir=tmp_path, val_size=0 if classes == 10 else 2, seed=0)
    test_images, test_labels = written["test_batch" if classes == 10 else "test"]
    mean, std = torch.tensor(CIFAR_MEAN[classes]).view(1, 3, 1, 1), torch.tensor(CIFAR_STD[classes]).view(1, 3, 1, 1)
    pixels = (splits.test[0] * std + mean) * 255
    torch.testing.assert_close(pixels, torch.from_numpy(test_images).float(), atol=1e-3, rtol=0)
    assert splits.test[1].tolist() == test_labels and splits.test[0].shape[1:] == (3, 32, 32)
    train_files = 5 if classes == 10 else 1
    assert len(splits.train[0]) + len(splits.val[0]) == 6 * train_files


def test_the_first_cifar10_training_image_is_channel_planes(tmp_path):
    """The 3072 bytes of a row are the red plane, then green, then blue, each row-major."""
    written = write_cifar(tmp_path, 10)
    splits = load_cifar(10, data_dir=tmp_path, val_size=0)
    data, _ = written["data_batch_1"]
    raw = data.reshape(-1, 3072)[0]
    red_top_right = raw[31]          # plane 0, row 0, column 31
    green_second_row = raw[1024 + 32]  # plane 1, row 1, column 0
    x = splits.train[0][0] * torch.tensor(CIFAR_STD[10]).view(3, 1, 1) + torch.tensor(CIFAR_MEAN[10]).view(3, 1, 1)
    assert round(float(x[0, 0, 31]) * 255) == red_top_right and round(float(x[1, 1, 0]) * 255) == green_second_row


class _Trap:
    def __reduce__(self):
        return (os.system, ("touch TRAPPED",))


def test_a_cifar_file_that_asks_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "d", 10)
    with open(tmp_path / "d" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Trap(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"test_batch.*refusing to build"):
        load_cifar(10, data_dir=tmp_path / "d", val_size=0)
    assert not (tmp_path / "TRAPPED").exists()


@pytest.mark.parametrize("content, says", [(b"not a pickle", "not a CIFAR batch file"),
                                           (pickle.dumps([1, 2, 3]), "a list, not a dict"),
                                           (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}),
                                            r"shape \[N, 3072\]"),
                                           (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
                                            r"labels must lie in 0..9")])
def test_a_damaged_cifar_file_is_named(tmp_path, content, says):
    write_cifar(tmp_path, 10)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=says) as err:
        load_cifar(10, data_dir=tmp_path, val_size=0)
    assert "data_batch_3" in str(err.value)


def test_missing_cifar_files_are_named(tmp_path):
    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar(10, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_cifar(10, data_dir=None)


def test_read_cifar_file_gives_str_keys(tmp_path):
    write_cifar(tmp_path, 100)
    batch = read_cifar_file(tmp_path / "cifar-100-python" / "train")
    assert {"data", "fine_labels", "batch_label"} <= set(batch)


def test_cifar_through_the_data_config(tmp_path):
    write_cifar(tmp_path, 10, per_file=8)
    data = load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path), val_size=4, batch_size=4))
    assert data.example.shape == (2, 3, 32, 32) and data.task.num_classes == 10
    assert sum(len(b[0]) for b in data.train) == 36


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Fashion-MNIST files "
                    "(CI installs dataset-fashion-mnist)")
def test_the_32x32_stand_in_is_fashion_mnist_padded_and_repeated():
    plain, wide = load_fashion_mnist(val_size=100, seed=1), load_fashion_mnist_32x3(val_size=100, seed=1)
    for a, b in ((plain.train, wide.train), (plain.val, wide.val), (plain.test, wide.test)):
        assert b[0].shape == (len(a[0]), 3, 32, 32) and torch.equal(a[1], b[1])
        for channel in range(3):
            assert torch.equal(b[0][:50, channel, 2:30, 2:30], a[0][:50, 0])
    border = wide.test[0][:50, :, :2]  # the padding is black, like Fashion-MNIST's own background
    assert torch.allclose(border, torch.full_like(border, float(plain.test[0].min())))
