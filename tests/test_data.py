from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pathguard.models import data
from pathguard.models.data import DatasetError, load_dataset

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_train_shapes_and_counts():
    s = load_dataset("mnist", "train")
    assert s.x.shape == (60000, 1, 28, 28) and s.x.dtype == np.float32
    assert s.y.dtype == np.uint8
    assert s.x.min() == 0.0 and s.x.max() == 1.0
    assert abs(float(s.x.mean()) - 0.1307) < 1e-3
    assert np.bincount(s.y, minlength=10).tolist() == MNIST_TRAIN_COUNTS


def test_mnist_test_counts(mnist_test):
    assert mnist_test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(mnist_test.y, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_cifar10_shapes_and_counts(cifar_test):
    assert cifar_test.x.shape == (10000, 3, 32, 32) and cifar_test.x.dtype == np.float32
    assert cifar_test.classes[0] == "airplane" and cifar_test.classes[9] == "truck"
    assert np.bincount(cifar_test.y, minlength=10).tolist() == [1000] * 10
    assert cifar_test.x.min() >= 0.0 and cifar_test.x.max() <= 1.0
    train = load_dataset("cifar10", "train")
    assert np.bincount(train.y, minlength=10).tolist() == [5000] * 10


def _copy_mnist(tmp_path: Path) -> Path:
    src = data.data_dir() / "mnist"
    dst = tmp_path / "mnist"
    shutil.copytree(src, dst)
    return dst


def test_mnist_corrupt_file_is_named(tmp_path, monkeypatch):
    dst = _copy_mnist(tmp_path)
    target = dst / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] ^= 0xFF
    target.chmod(0o644)
    target.write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setenv("PATHGUARD_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"corrupt dataset file .*t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", "test")
    # the untouched train split still loads from the same folder
    assert len(load_dataset("mnist", "train")) == 60000


def test_missing_file_names_it_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHGUARD_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz.*PATHGUARD_DATA_DIR"):
        load_dataset("mnist", "train")
    with pytest.raises(DatasetError, match=r"cifar10-jpeg.tar.gz.*pathguard download cifar10"):
        load_dataset("cifar10", "test")


def test_cifar_corrupt_archive_is_named(tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()
    target = tmp_path / "cifar10" / "cifar10-jpeg.tar.gz"
    blob = bytearray((data.data_dir() / "cifar10" / "cifar10-jpeg.tar.gz").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    monkeypatch.setenv("PATHGUARD_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"corrupt dataset file .*cifar10-jpeg.tar.gz"):
        load_dataset("cifar10", "test")


def test_cifar_binary_format_parser(tmp_path):
    """The canonical binary layout: one label byte then 3072 bytes (R, G, B planes) per record."""
    rng = np.random.default_rng(0)
    path = tmp_path / "cifar-10-binary.tar.gz"
    expected = {}
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name in names:
            labels = rng.integers(0, 10, 3, dtype=np.uint8)
            pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            expected[name] = (labels, pixels)
            blob = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    arrays = data._decode_cifar_binary(path)
    assert arrays["train_x"].shape == (15, 3, 32, 32) and arrays["test_x"].shape == (3, 3, 32, 32)
    labels, pixels = expected["test_batch.bin"]
    assert arrays["test_y"].tolist() == labels.tolist()
    assert np.array_equal(arrays["test_x"][1, 2], pixels[1, 2048:].reshape(32, 32))


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation")


def test_interleaved_order_visits_the_classes_in_turn(cifar_test):
    from pathguard.models.data import interleaved_order

    order = interleaved_order(cifar_test.y)  # the JPEG copy's test split is stored class by class
    assert sorted(order.tolist()) == list(range(len(cifar_test.y)))
    assert np.bincount(cifar_test.y[order[:100]], minlength=10).tolist() == [10] * 10
    y = np.array([2, 0, 0, 1, 0])  # within a class the stored order is kept
    assert interleaved_order(y).tolist() == [1, 3, 0, 2, 4]
