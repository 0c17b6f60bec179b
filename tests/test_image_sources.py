"""Tests for the CIFAR-100, TinyImageNet and class-per-folder readers (engram.data.sources),
data.labels (fine/coarse) and the standard split presets, all on small files written here."""

from __future__ import annotations

import ast
import dataclasses
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engram.config import DataConfig, StreamConfig, config_to_dict, load_config_dict, train_identity
from engram.data import DATASETS, build_stream, load_source
from engram.data import sources
from engram.data.sources import load_cifar10, load_cifar100, load_image_folder, load_tiny_imagenet
from engram.errors import ConfigError, DataError
from engram.experiments.continual import continual_run_id, run_plan_of
from engram.experiments.harness import run_id
from tests.conftest import tiny_config

Image = pytest.importorskip("PIL.Image")


def esc(path) -> str:
    return re.escape(str(path))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- CIFAR-100


def cifar100_split(fine: list[int], seed: int) -> dict:
    """A split file as the real one: bytes keys, fine and coarse label lists (coarse = fine // 5
    here, an arbitrary but checkable map), uint8 (n, 3072) rows."""
    rng = np.random.default_rng(seed)
    return {
        b"filenames": [b"img%d.png" % i for i in range(len(fine))],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": list(fine),
        b"coarse_labels": [f // 5 for f in fine],
        b"data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
    }


def write_cifar100(folder: Path, train_fine: list[int] | None = None,
                   test_fine: list[int] | None = None, protocol: int = 2) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": cifar100_split(train_fine or [0, 7, 99, 42, 5], seed=1),
              "test": cifar100_split(test_fine or [3, 98, 50], seed=2)}
    for name, split in splits.items():
        (folder / name).write_bytes(pickle.dumps(split, protocol=protocol))
    meta = {b"fine_label_names": [b"fine%d" % i for i in range(100)],
            b"coarse_label_names": [b"coarse%d" % i for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return splits


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_fine_labels_pixels_and_names(tmp_path, protocol):
    splits = write_cifar100(tmp_path / "cifar-100-python", protocol=protocol)
    data = load_cifar100(str(tmp_path))  # the folder above cifar-100-python works too
    assert data.name == "cifar100"
    assert data.x_train.shape == (5, 3, 32, 32) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (3, 3, 32, 32)
    assert data.y_train.dtype == torch.int64
    assert data.y_train.tolist() == [0, 7, 99, 42, 5] and data.y_test.tolist() == [3, 98, 50]
    assert len(data.class_names) == 100 and data.class_names[99] == "fine99"
    # Same row layout as CIFAR-10: 1024 red values row-major, then green, then blue.
    row = splits["train"][b"data"][2]
    assert data.x_train[2, 0, 0, 1] == row[1] / np.float32(255)
    assert data.x_train[2, 1, 0, 0] == row[1024] / np.float32(255)
    assert data.x_train[2, 2, 31, 31] == row[3071] / np.float32(255)
    assert torch.equal(data.x_test, torch.from_numpy(
        splits["test"][b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255))


def test_cifar100_coarse_labels(tmp_path):
    write_cifar100(tmp_path)
    data = load_cifar100(str(tmp_path), labels="coarse")
    assert data.y_train.tolist() == [f // 5 for f in [0, 7, 99, 42, 5]]
    assert data.y_test.tolist() == [f // 5 for f in [3, 98, 50]]
    assert len(data.class_names) == 20 and data.class_names[19] == "coarse19"
    fine = load_cifar100(str(tmp_path))
    assert torch.equal(data.x_train, fine.x_train)  # same images, other labels
    # The path `engram run` takes: load_source passes data.labels to the reader.
    assert load_source("cifar100", str(tmp_path), "coarse").y_train.tolist() == data.y_train.tolist()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_cifar100_malicious_pickle_runs_nothing(tmp_path, name):
    write_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps({b"data": _Evil(marker), b"fine_labels": [0]}))
    with pytest.raises(DataError) as excinfo:
        load_cifar100(str(tmp_path))
    assert re.match(esc(tmp_path / name) + r".*refused.*(posix|os|nt)\.system.*CIFAR-100",
                    one_line_error(excinfo))
    assert not marker.exists()


def test_one_refusing_unpickler_serves_both_cifars():
    """CIFAR-100 reuses CIFAR-10's unpickler: one Unpickler subclass in the module."""
    tree = ast.parse(Path(sources.__file__).read_text())
    unpicklers = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  and any("Unpickler" in ast.unparse(base) for base in node.bases)]
    assert unpicklers == ["_RestrictedUnpickler"]


@pytest.mark.parametrize("bad, problem", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, r"labels must lie in 0\.\.99"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"coarse_labels": [0, 1]}, "lacks its 'data' or 'fine_labels'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, r"shape \(n, 3072\)"),
])
def test_cifar100_bad_split(tmp_path, bad, problem):
    write_cifar100(tmp_path)
    (tmp_path / "test").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError) as excinfo:
        load_cifar100(str(tmp_path))
    assert re.match(esc(tmp_path / "test") + ".*" + problem, one_line_error(excinfo))


def test_cifar100_coarse_label_out_of_range(tmp_path):
    write_cifar100(tmp_path)
    split = cifar100_split([0, 1], seed=0)
    split[b"coarse_labels"] = [0, 20]
    (tmp_path / "train").write_bytes(pickle.dumps(split))
    load_cifar100(str(tmp_path))  # the fine labels are fine
    with pytest.raises(DataError, match=esc(tmp_path / "train") + r".*0\.\.19, found 0\.\.20"):
        load_cifar100(str(tmp_path), labels="coarse")


def test_cifar100_missing_and_damaged_files(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "meta").unlink()
    with pytest.raises(DataError) as excinfo:
        load_cifar100(str(tmp_path))
    assert re.match(esc(tmp_path) + ".*missing CIFAR-100 files: meta", one_line_error(excinfo))
    write_cifar100(tmp_path)
    (tmp_path / "train").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError) as excinfo:
        load_cifar100(str(tmp_path))
    assert re.match(esc(tmp_path / "train") + ".*not a readable CIFAR-100 pickle",
                    one_line_error(excinfo))
    write_cifar100(tmp_path)
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"]}))
    with pytest.raises(DataError, match=esc(tmp_path / "meta") + ".*list of 100 names"):
        load_cifar100(str(tmp_path))
    with pytest.raises(DataError, match="set `data.path`"):
        load_cifar100(None)


# ---------------------------------------------------------------------------- data.labels


def test_data_labels_is_checked_against_the_source():
    cfg = load_config_dict({"data": {"source": "cifar100", "path": "x", "labels": "coarse"}})
    assert cfg.data.labels == "coarse"
    with pytest.raises(ConfigError, match=r"data\.labels: 'coarse' applies only .*digits"):
        load_config_dict({"data": {"source": "digits", "labels": "coarse"}})
    with pytest.raises(ConfigError, match=r"data\.labels"):
        load_config_dict({"data": {"source": "cifar100", "labels": "medium"}})
    with pytest.raises(ConfigError, match=r"data\.labels: 'coarse' applies only .*mnist"):
        load_source("mnist", None, "coarse")


def test_default_labels_leave_run_ids_and_folder_identity_unchanged():
    """data.labels came after run ids were first written: at its default it is hashed nowhere,
    so the ids are those of the formula before it (the data section without the key)."""
    cfg = tiny_config()
    method = cfg.methods[0]
    data_before = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "labels"}
    id_before = run_id({
        "data": data_before, "stream": dataclasses.asdict(cfg.stream),
        "model": dataclasses.asdict(cfg.model), "train": train_identity(cfg.train),
        "method": {"name": method.name}, "seed": 0})
    assert continual_run_id(cfg, method, 0) == id_before
    assert "labels" not in run_plan_of(cfg).identity["data"]
    coarse = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="cifar100",
                                                               labels="coarse"))
    fine = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="cifar100"))
    assert continual_run_id(coarse, method, 0) != continual_run_id(fine, method, 0)
    assert run_plan_of(coarse).identity["data"]["labels"] == "coarse"


# ---------------------------------------------------------------------------- image files


def save(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Write uint8 pixels as a PNG (whatever the suffix): (H, W) gray, (H, W, 3) RGB, (H, W, 4)
    RGBA."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def pixels(seed: int, size: int = 4, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def as_chw(hwc: np.ndarray) -> torch.Tensor:
    """The expected tensor of an RGB uint8 (H, W, 3) image: (3, H, W) / 255."""
    return torch.from_numpy(hwc.astype(np.float32) / np.float32(255)).permute(2, 0, 1)


WNIDS = ["n0300", "n0100", "n0200"]  # listed unsorted: labels follow the sorted order


def write_tiny(root: Path, per_class: int = 2, val_per_class: int = 1, size: int = 4,
               wnids: list[str] = WNIDS) -> dict:
    """A tiny-imagenet-200 tree of PNG-encoded `.JPEG` files (lossless, so pixels are exact)."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = [f"{w}\tname of {w}, other name" for w in wnids] + ["n9999\tunused"]
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    written: dict = {"train": {}, "val": []}
    lines = []
    for k, wnid in enumerate(wnids):
        for i in range(per_class):
            path = folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            written["train"][path.name] = save(path, pixels(100 * k + i, size))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for i in range(val_per_class):
            name = f"val_{k * val_per_class + i}.JPEG"
            written["val"].append((wnid, save(folder / "val" / "images" / name,
                                              pixels(1000 + 10 * k + i, size))))
            lines.append(f"{name}\t{wnid}\t0\t0\t3\t3")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return written


def test_tiny_imagenet_layout_labels_pixels_and_names(tmp_path):
    written = write_tiny(tmp_path)
    data = load_tiny_imagenet(str(tmp_path))  # the folder above tiny-imagenet-200 works too
    assert data.name == "tiny_imagenet"
    assert data.x_train.shape == (6, 3, 4, 4) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (3, 3, 4, 4)
    assert data.class_names == ["name of n0100", "name of n0200", "name of n0300"]
    assert data.y_train.tolist() == [0, 0, 1, 1, 2, 2]  # sorted ids: n0100, n0200, n0300
    assert torch.equal(data.x_train[0], as_chw(written["train"]["n0100_0.JPEG"]))
    assert torch.equal(data.x_train[5], as_chw(written["train"]["n0300_1.JPEG"]))
    # val_annotations.txt labels the val images; n0300 comes first there but is class 2
    expected_val = [sorted(WNIDS).index(wnid) for wnid, _ in written["val"]]
    assert data.y_test.tolist() == expected_val == [2, 0, 1]
    assert torch.equal(data.x_test[0], as_chw(written["val"][0][1]))


def test_tiny_imagenet_converts_grayscale_and_real_jpeg(tmp_path):
    write_tiny(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    gray = save(folder / "train" / "n0100" / "images" / "n0100_0.JPEG", pixels(7, channels=1))
    jpeg = folder / "train" / "n0200" / "images" / "n0200_0.JPEG"
    Image.fromarray(pixels(8)).save(jpeg, format="JPEG")
    data = load_tiny_imagenet(str(folder))
    expected = torch.from_numpy(gray.astype(np.float32) / np.float32(255))
    assert all(torch.equal(data.x_train[0, c], expected) for c in range(3))
    assert data.x_train.shape == (6, 3, 4, 4)
    assert 0.0 <= float(data.x_train[2].min()) and float(data.x_train[2].max()) <= 1.0


def test_tiny_imagenet_without_words_uses_ids(tmp_path):
    write_tiny(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "words.txt").unlink()
    assert load_tiny_imagenet(str(tmp_path)).class_names == sorted(WNIDS)


def test_tiny_imagenet_missing_and_damaged_files(tmp_path):
    write_tiny(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    cases = []

    def expect(pattern: str) -> None:
        with pytest.raises(DataError) as excinfo:
            load_tiny_imagenet(str(folder))
        assert re.match(pattern, one_line_error(excinfo)), str(excinfo.value)
        cases.append(pattern)

    damaged = folder / "train" / "n0200" / "images" / "n0200_1.JPEG"
    good = damaged.read_bytes()
    damaged.write_bytes(b"not an image at all")
    expect(esc(damaged) + ".*cannot decode the image")
    damaged.write_bytes(good[: len(good) // 2])  # truncated
    expect(esc(damaged) + ".*cannot decode the image")
    damaged.write_bytes(good)

    val_image = folder / "val" / "images" / "val_1.JPEG"
    val_image.rename(folder / "moved.JPEG")
    expect(esc(val_image) + ": no such image file")
    (folder / "moved.JPEG").rename(val_image)

    annotations = folder / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.write_text(text + "val_9.JPEG\tn0400\t0\t0\t1\t1\n")
    expect(esc(annotations) + ": line 4 names class n0400")
    annotations.write_text(text + "just-one-field\n")
    expect(esc(annotations) + ": line 4 should be FILE<tab>WNID")
    annotations.unlink()
    expect(esc(annotations) + ": no such file")
    annotations.write_text(text)

    images = folder / "train" / "n0300" / "images"
    images.rename(folder / "train" / "n0300" / "elsewhere")
    expect(esc(images) + ": no such folder")
    (folder / "train" / "n0300" / "elsewhere").rename(images)

    (folder / "wnids.txt").write_text("n0100\nn0100\n")
    expect(esc(folder / "wnids.txt") + ": class id n0100 is listed twice")
    assert len(cases) == 8


def write_tree(root: Path, classes: dict[str, int], size: int = 4, seed: int = 0) -> dict:
    """root/<class>/<i>.png for `classes` {name: count}; returns {path: pixels}."""
    written = {}
    for k, (name, count) in enumerate(classes.items()):
        for i in range(count):
            path = root / name / f"{i}.png"
            written[path] = save(path, pixels(seed + 10 * k + i, size))
    return written


def test_image_folder_classes_sorted_labels_and_pixels(tmp_path):
    written = write_tree(tmp_path, {"zebra": 2, "apple": 3})
    rgba = np.dstack([pixels(5), np.full((4, 4), 128, np.uint8)])
    save(tmp_path / "apple" / "nested" / "rgba.png", rgba)  # subfolders count, RGBA -> RGB
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    save(tmp_path / "apple" / ".hidden" / "x.png", pixels(6, size=9))  # hidden: skipped
    data = load_image_folder(str(tmp_path))
    assert data.name == "image_folder" and data.class_names == ["apple", "zebra"]
    assert data.x_train.shape == (6, 3, 4, 4) and data.x_train.dtype == torch.float32
    assert data.y_train.tolist() == [0, 0, 0, 0, 1, 1]
    assert data.x_test is None and data.y_test is None  # the stream holds out a test split
    assert torch.equal(data.x_train[0], as_chw(written[tmp_path / "apple" / "0.png"]))
    assert torch.equal(data.x_train[3], as_chw(rgba[:, :, :3]))  # apple/nested/rgba.png
    assert torch.equal(data.x_train[5], as_chw(written[tmp_path / "zebra" / "1.png"]))


def test_image_folder_hand_made_image_values(tmp_path):
    """A 2x2 image whose every value is known: (row, col) -> RGB."""
    image = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [51, 102, 204]]], np.uint8)
    save(tmp_path / "only" / "a.png", image)
    x = load_image_folder(str(tmp_path)).x_train
    assert x.shape == (1, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]   # red, top left
    assert x[0, :, 0, 1].tolist() == [0.0, 1.0, 0.0]   # green, top right
    assert x[0, :, 1, 0].tolist() == [0.0, 0.0, 1.0]   # blue, bottom left
    assert x[0, :, 1, 1].tolist() == pytest.approx([0.2, 0.4, 0.8])


def test_image_folder_train_and_test_subfolders(tmp_path):
    write_tree(tmp_path / "train", {"b": 2, "a": 1, "c": 1})
    written = write_tree(tmp_path / "test", {"c": 1, "a": 2}, seed=50)
    data = load_image_folder(str(tmp_path))
    assert data.class_names == ["a", "b", "c"]
    assert data.y_train.tolist() == [0, 1, 1, 2] and data.y_test.tolist() == [0, 0, 2]
    assert torch.equal(data.x_test[2], as_chw(written[tmp_path / "test" / "c" / "0.png"]))


def test_image_folder_errors_name_the_file(tmp_path):
    write_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_tree(tmp_path / "test", {"a": 1})
    odd = tmp_path / "train" / "b" / "1.png"
    save(odd, pixels(3, size=5))
    with pytest.raises(DataError) as excinfo:
        load_image_folder(str(tmp_path))
    message = one_line_error(excinfo)
    assert message.startswith(f"{odd}: the image is 5x5 pixels but ") and "4x4" in message

    save(odd, pixels(3))
    save(tmp_path / "test" / "a" / "0.png", pixels(3, size=6))  # test must match train
    with pytest.raises(DataError, match=esc(tmp_path / "test" / "a" / "0.png") + ".*6x6"):
        load_image_folder(str(tmp_path))

    save(tmp_path / "test" / "a" / "0.png", pixels(3))
    write_tree(tmp_path / "test", {"d": 1})
    with pytest.raises(DataError, match=esc(tmp_path / "test" / "d") + ".*no folder in the train"):
        load_image_folder(str(tmp_path))

    (tmp_path / "test" / "d" / "0.png").unlink()
    (tmp_path / "test" / "d").rmdir()
    (tmp_path / "test" / "a" / "0.png").unlink()
    with pytest.raises(DataError, match=esc(tmp_path / "test" / "a") + ": holds no images"):
        load_image_folder(str(tmp_path))

    save(tmp_path / "test" / "a" / "0.png", pixels(3))
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError) as excinfo:
        load_image_folder(str(tmp_path))
    assert one_line_error(excinfo).startswith(f"{tmp_path / 'train' / 'a' / '0.png'}: cannot decode")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=esc(empty) + ": has no class subfolders"):
        load_image_folder(str(empty))
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(str(tmp_path / "absent"))


def test_missing_pillow_names_the_extra(tmp_path, monkeypatch):
    write_tree(tmp_path, {"a": 1})
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` raises ImportError
    with pytest.raises(DataError) as excinfo:
        load_image_folder(str(tmp_path))
    assert 'pip install -e ".[images]"' in one_line_error(excinfo)


# ---------------------------------------------------------------------------- presets


def write_cifar10_all_classes(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": list(range(10)),
                 b"data": rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def write_preset(name: str, root: Path) -> str:
    """Small files of every class of the named dataset; returns data.path."""
    if name == "cifar10":
        write_cifar10_all_classes(root)
    elif name == "cifar100":
        write_cifar100(root, train_fine=list(range(100)) * 2, test_fine=list(range(100)))
    else:  # 200 classes, one train and one val image each (2x2 pixels: fast to write)
        write_tiny(root, per_class=1, val_per_class=1, size=2,
                   wnids=[f"n{i:04d}" for i in reversed(range(200))])
    return str(root)


@pytest.mark.parametrize("dataset, n_tasks, per_task", [
    ("cifar10", 5, 2),         # Seq-CIFAR-10
    ("cifar100", 10, 10),      # Seq-CIFAR-100
    ("tiny_imagenet", 10, 20),  # Seq-TinyImageNet
])
def test_standard_sequences_are_split_streams(tmp_path, dataset, n_tasks, per_task):
    path = write_preset(dataset, tmp_path / dataset)
    cfg = load_config_dict({
        "data": {"source": dataset, "path": path},
        "stream": {"kind": "split", "scenario": "class", "n_tasks": n_tasks,
                   "classes_per_task": per_task}})
    source = load_source(cfg.data.source, cfg.data.path, cfg.data.labels)
    stream = build_stream(source, cfg.data, cfg.stream, seed=0)
    n_classes = n_tasks * per_task
    assert len(source.class_names) == n_classes and stream.head_dim == n_classes
    assert len(stream.tasks) == n_tasks
    for t, task in enumerate(stream.tasks):
        group = list(range(t * per_task, (t + 1) * per_task))
        assert task.classes == group  # consecutive groups of labels: 0..K-1, K..2K-1, ...
        # class-incremental targets are the source labels themselves here
        assert sorted(set(task.train.y.tolist())) == group
        assert sorted(set(task.test.y.tolist())) == group
    task_cfg = dataclasses.replace(cfg.stream, scenario="task")
    task_stream = build_stream(source, cfg.data, task_cfg, seed=0)
    assert task_stream.n_heads == n_tasks and task_stream.head_dim == per_task


# ---------------------------------------------------------------------------- engram run


@pytest.mark.parametrize("source", ["image_folder", "cifar100"])
def test_engram_run_reads_the_written_data(tmp_path, source):
    from engram.cli import main

    if source == "image_folder":
        write_tree(tmp_path / "data", {"cat": 6, "dog": 6, "eel": 6, "fox": 6})
        data = {"source": "image_folder", "path": str(tmp_path / "data"), "test_fraction": 0.25}
    else:
        write_cifar100(tmp_path / "data", train_fine=[0, 5, 10, 15] * 3, test_fine=[0, 5, 10, 15])
        data = {"source": "cifar100", "path": str(tmp_path / "data"), "labels": "coarse"}
    raw = config_to_dict(tiny_config(
        data=data, stream={"n_tasks": 2, "classes_per_task": 2},
        model={"kind": "mlp", "hidden": [8]}, train={"epochs": 1, "batch_size": 4}))
    if source == "image_folder":
        del raw["data"]["labels"]  # a config written without the key loads as before
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "-q"]) == 0
    results = (tmp_path / "out" / "results.csv").read_text()
    assert f",{source}," in results
