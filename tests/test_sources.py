"""Tests for engram.data.sources: IDX, CIFAR-10 pickles and the bundled digits."""

from __future__ import annotations

import ast
import builtins
import gzip
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.data import sources
from engram.data.sources import (
    FASHION_MNIST_CLASSES,
    SourceData,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from engram.errors import DataError

MNIST_T10K = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"


# ---------------------------------------------------------------------------- helpers


def idx_images_bytes(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    n, rows, cols = images.shape
    header = b"".join(v.to_bytes(4, "big") for v in (magic, n, rows, cols))
    return header + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    header = magic.to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    return header + np.asarray(labels, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_pair(folder: Path, prefix: str, n: int, seed: int, gz: bool = False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write(folder / f"{prefix}-images-idx3-ubyte", idx_images_bytes(images), gz)
    write(folder / f"{prefix}-labels-idx1-ubyte", idx_labels_bytes(labels), gz)
    return images, labels


def esc(path: Path) -> str:
    return re.escape(str(path))


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_exact(tmp_path, gz):
    train_x, train_y = make_pair(tmp_path, "train", 5, seed=0, gz=gz)
    test_x, test_y = make_pair(tmp_path, "t10k", 3, seed=1, gz=gz)
    data = load_mnist(str(tmp_path))
    assert isinstance(data, SourceData)
    assert data.name == "mnist"
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.shape == (5, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    assert torch.equal(data.x_train, torch.from_numpy(train_x[:, None].astype(np.float32) / 255))
    assert torch.equal(data.x_test, torch.from_numpy(test_x[:, None].astype(np.float32) / 255))
    assert data.y_train.tolist() == train_y.tolist()
    assert data.y_test.tolist() == test_y.tolist()
    assert data.class_names == [str(i) for i in range(10)]
    # Extremes map exactly onto 0 and 1.
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0


def test_only_t10k_pair_becomes_train(tmp_path):
    x, y = make_pair(tmp_path, "t10k", 4, seed=2, gz=True)
    data = load_fashion_mnist(str(tmp_path))
    assert data.name == "fashion_mnist"
    assert data.x_test is None and data.y_test is None
    assert data.x_train.shape == (4, 1, 28, 28)
    assert data.y_train.tolist() == y.tolist()
    assert data.class_names == FASHION_MNIST_CLASSES
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_only_train_pair_becomes_train(tmp_path):
    _, y = make_pair(tmp_path, "train", 2, seed=3)
    data = load_mnist(str(tmp_path))
    assert data.x_test is None and data.y_train.tolist() == y.tolist()


def test_truncated_images_file(tmp_path):
    make_pair(tmp_path, "t10k", 3, seed=4)
    images = tmp_path / "t10k-images-idx3-ubyte"
    full = images.read_bytes()
    images.write_bytes(full[:-10])
    expected, actual = 16 + 3 * 784, 16 + 3 * 784 - 10
    with pytest.raises(DataError, match=esc(images) + f".*truncated.*{expected} bytes.*{actual} bytes"):
        load_mnist(str(tmp_path))


def test_truncated_gz_content(tmp_path):
    # A valid gzip whose content is short: the IDX check, not gzip, must catch it.
    make_pair(tmp_path, "t10k", 3, seed=5)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    short = labels.read_bytes()[:-1]
    labels.unlink()
    gz = write(labels, short, gz=True)
    with pytest.raises(DataError, match=esc(gz) + ".*truncated.*11 bytes.*10 bytes"):
        load_mnist(str(tmp_path))


def test_bad_magic(tmp_path):
    make_pair(tmp_path, "t10k", 2, seed=6)
    images = tmp_path / "t10k-images-idx3-ubyte"
    # Swap in a labels file where the images should be.
    images.write_bytes(idx_labels_bytes(np.zeros(2)))
    with pytest.raises(DataError, match=esc(images) + ".*not an IDX images file"):
        load_mnist(str(tmp_path))


def test_bad_magic_labels(tmp_path):
    make_pair(tmp_path, "t10k", 2, seed=6)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    with pytest.raises(DataError, match=esc(labels) + ".*not an IDX labels file"):
        load_mnist(str(tmp_path))


def test_count_mismatch(tmp_path):
    rng = np.random.default_rng(7)
    images = write(tmp_path / "t10k-images-idx3-ubyte",
                   idx_images_bytes(rng.integers(0, 256, (3, 28, 28))))
    labels = write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels_bytes(np.arange(4)))
    with pytest.raises(DataError, match=esc(images) + ".*3 images.*" + esc(labels) + ".*4 labels"):
        load_mnist(str(tmp_path))


def test_missing_folder(tmp_path):
    folder = tmp_path / "nope"
    with pytest.raises(DataError, match=esc(folder) + ".*no such folder.*t10k-images-idx3-ubyte"):
        load_mnist(str(folder))


def test_folder_without_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=esc(tmp_path) + ".*found no mnist files.*"
                       "train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_mnist(str(tmp_path))


def test_unpaired_file(tmp_path):
    make_pair(tmp_path, "t10k", 2, seed=8)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=esc(tmp_path / "t10k-images-idx3-ubyte")
                       + ".*lacks t10k-labels-idx1-ubyte"):
        load_mnist(str(tmp_path))


def test_path_none():
    with pytest.raises(DataError, match="data.path"):
        load_mnist(None)
    with pytest.raises(DataError, match="data.path"):
        load_cifar10(None)


def test_corrupt_gzip(tmp_path):
    make_pair(tmp_path, "t10k", 2, seed=9, gz=True)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match=esc(gz) + ".*not a valid gzip file or is corrupt"):
        load_mnist(str(tmp_path))
    # A gzip cut off mid-stream is also reported, not raised as EOFError.
    make_pair(tmp_path, "t10k", 2, seed=9, gz=True)
    gz.write_bytes(gz.read_bytes()[:30])
    with pytest.raises(DataError, match=esc(gz) + ".*corrupt"):
        load_mnist(str(tmp_path))


def test_label_out_of_range(tmp_path):
    rng = np.random.default_rng(10)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_images_bytes(rng.integers(0, 256, (2, 28, 28))))
    labels = write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels_bytes(np.array([1, 12])))
    with pytest.raises(DataError, match=esc(labels) + ".*label 12"):
        load_mnist(str(tmp_path))


def test_real_mnist_t10k():
    if not MNIST_T10K.is_dir():
        pytest.skip(f"real MNIST test set not found at {MNIST_T10K}")
    data = load_mnist(str(MNIST_T10K))
    assert data.x_train.shape == (10000, 1, 28, 28)
    assert data.x_test is None
    assert data.y_train[:5].tolist() == [7, 2, 1, 0, 4]
    counts = torch.bincount(data.y_train, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0


# ---------------------------------------------------------------------------- CIFAR-10


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def write_cifar(folder: Path, n: int = 3, meta: bool = True, protocol: int = 2) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(n + i, seed=i)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=protocol))
    if meta:
        names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                 b"ship", b"truck"]
        (folder / "batches.meta").write_bytes(
            pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_shapes_values_and_chw(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder, protocol=protocol)
    data = load_cifar10(str(tmp_path))  # the folder above cifar-10-batches-py works too
    n_train = sum(3 + i for i in range(5))
    assert data.name == "cifar10"
    assert data.x_train.shape == (n_train, 3, 32, 32) and data.x_train.dtype == torch.float32
    assert data.y_train.shape == (n_train,) and data.y_train.dtype == torch.int64
    assert data.x_test.shape == (8, 3, 32, 32)
    assert data.class_names[:2] == ["plane", "car"]

    train_rows = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
    assert torch.equal(
        data.x_train, torch.from_numpy(train_rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255))
    labels = sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    assert data.y_train.tolist() == labels
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]

    # CHW: the first 1024 values of a row are red, row-major; then green, then blue.
    row = batches["test_batch"][b"data"][0]
    img = data.x_test[0]
    assert img[0, 0, 0] == row[0] / np.float32(255)
    assert img[0, 0, 1] == row[1] / np.float32(255)
    assert img[0, 1, 0] == row[32] / np.float32(255)
    assert img[1, 0, 0] == row[1024] / np.float32(255)
    assert img[2, 31, 31] == row[3071] / np.float32(255)


def test_cifar_without_meta_uses_standard_names(tmp_path):
    write_cifar(tmp_path, meta=False)
    data = load_cifar10(str(tmp_path))
    assert data.class_names[0] == "airplane" and data.class_names[9] == "truck"


def test_cifar_missing_batches(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match=esc(tmp_path) + ".*missing.*data_batch_3, test_batch"):
        load_cifar10(str(tmp_path))


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(DataError, match=esc(tmp_path / "absent") + ".*no such folder"):
        load_cifar10(str(tmp_path / "absent"))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_runs_nothing(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(DataError, match=esc(batch) + r".*refused.*(posix|os|nt)\.system"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()


def test_cifar_refuses_builtins_eval(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned2"
    batch = tmp_path / "test_batch"
    # Hand-written protocol-0 pickle: builtins.eval("open(marker, 'w')")
    payload = f"cbuiltins\neval\n(V__import__('pathlib').Path({str(marker)!r}).touch()\ntR."
    batch.write_bytes(payload.encode())
    with pytest.raises(DataError, match=esc(batch) + r".*refused.*builtins\.eval"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"shape \(n, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must lie in 0\.\.9"),
        ({b"labels": [0]}, "lacks its 'data' or 'labels'"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_cifar_bad_batch(tmp_path, bad, problem):
    write_cifar(tmp_path)
    batch = tmp_path / "data_batch_4"
    batch.write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=esc(batch) + ".*" + problem):
        load_cifar10(str(tmp_path))


def test_cifar_garbage_file(tmp_path):
    write_cifar(tmp_path)
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match=esc(batch) + ".*not a readable CIFAR-10 pickle"):
        load_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------- digits


def test_digits_shape_and_range():
    data = load_digits()
    assert data.name == "digits"
    assert data.x_train.shape == (1797, 1, 8, 8) and data.x_train.dtype == torch.float32
    assert data.y_train.shape == (1797,) and data.y_train.dtype == torch.int64
    assert data.x_test is None and data.y_test is None
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    assert sorted(set(data.y_train.tolist())) == list(range(10))
    assert data.class_names == [str(i) for i in range(10)]
    assert load_digits("ignored/path").y_train.shape == (1797,)


def test_digits_both_read_paths_identical(monkeypatch):
    if sources._bundled_digits_file() is None:
        pytest.skip("scikit-learn's digits.csv.gz is not where expected; only the fallback runs")
    fast = load_digits()
    monkeypatch.setattr(sources, "_bundled_digits_file", lambda: None)
    fallback = load_digits()
    assert torch.equal(fast.x_train, fallback.x_train)
    assert torch.equal(fast.y_train, fallback.y_train)
    assert fast.x_train.dtype == fallback.x_train.dtype
    assert fast.y_train.dtype == fallback.y_train.dtype
    assert fast.class_names == fallback.class_names


def test_digits_fast_path_never_imports_sklearn(monkeypatch):
    # Importing sklearn.datasets costs ~0.6 s of start-up; the fast path must not do it.
    if sources._bundled_digits_file() is None:
        pytest.skip("scikit-learn's digits.csv.gz is not where expected")
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise AssertionError(f"load_digits imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    assert load_digits().x_train.shape == (1797, 1, 8, 8)


def test_module_has_no_top_level_sklearn_import():
    tree = ast.parse(Path(sources.__file__).read_text())
    for node in tree.body:  # only module-level statements; function bodies may import lazily
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "sklearn" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "sklearn"
