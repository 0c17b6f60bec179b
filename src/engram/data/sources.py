"""Readers that turn a labelled image dataset on disk into tensors.

Nothing here touches the network: every reader works from files that are already on
disk (the user's folder, or the digits file that ships inside scikit-learn). Each
problem with a file is reported as a `DataError` that names the file and says, in plain
words, what is wrong with it.

Every reader returns a `SourceData` whose images are float32 (N, C, H, W) in [0, 1] and
whose labels are int64 (N,).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.config import check_label_set
from engram.errors import ConfigError, DataError, one_line
from engram.registry import DATASETS

__all__ = [
    "SourceData",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_cifar100",
    "load_tiny_imagenet",
    "load_image_folder",
    "DIGIT_CLASSES",
    "MNIST_CLASSES",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
]

DIGIT_CLASSES = [str(i) for i in range(10)]
MNIST_CLASSES = DIGIT_CLASSES
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@dataclass
class SourceData:
    """A labelled image dataset as tensors. x: float32 (N, C, H, W) scaled to [0, 1]; y: int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None  # None when the source has no official test split (the stream splits it)
    y_test: torch.Tensor | None
    class_names: list[str]


def _images_to_tensor(pixels: np.ndarray, scale: float) -> torch.Tensor:
    """Convert integer-valued pixels to a float32 tensor in [0, 1] by dividing by `scale`."""
    # astype makes a writable copy, so torch.from_numpy neither warns nor shares a read-only buffer.
    x = pixels.astype(np.float32)
    x /= np.float32(scale)
    return torch.from_numpy(x)


def _labels_to_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels).astype(np.int64))


# --------------------------------------------------------------------------------------
# scikit-learn's bundled 8x8 digits
# --------------------------------------------------------------------------------------


def _bundled_digits_file() -> Path | None:
    """Path of scikit-learn's bundled digits.csv.gz, found without importing sklearn.

    Importing `sklearn.datasets` costs about 0.6 s, which every command would pay at
    start-up; `find_spec` only locates the package on disk.
    """
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if candidate.is_file():
            return candidate
    return None


def _digits_from_arrays(pixels: np.ndarray, labels: np.ndarray) -> SourceData:
    """Build the digits SourceData from (1797, 64) pixels in 0..16 and (1797,) labels."""
    x = _images_to_tensor(np.asarray(pixels).reshape(-1, 1, 8, 8), 16.0)
    y = _labels_to_tensor(np.asarray(labels))
    return SourceData(
        name="digits",
        x_train=x,
        y_train=y,
        x_test=None,  # the digits have no official test split
        y_test=None,
        class_names=list(DIGIT_CLASSES),
    )


def load_digits(path: str | None = None) -> SourceData:
    """Load scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    Pixels (0..16) are divided by 16, giving x_train of shape (1797, 1, 8, 8) in [0, 1].
    There is no official test split, so x_test and y_test are None.

    `path` is ignored; it is accepted so that every reader has the same signature.
    """
    del path  # the data ships with scikit-learn
    bundled = _bundled_digits_file()
    if bundled is not None:
        try:
            table = np.loadtxt(bundled, delimiter=",")
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise DataError(
                f"{bundled}: cannot read scikit-learn's bundled digits file ({exc}); "
                "reinstall scikit-learn"
            ) from exc
        if table.ndim != 2 or table.shape[1] != 65:
            raise DataError(
                f"{bundled}: expected 65 comma-separated columns (64 pixels and a label), "
                f"found shape {table.shape}; reinstall scikit-learn"
            )
        return _digits_from_arrays(table[:, :-1], table[:, -1].astype(np.int64))

    # The file layout changed or sklearn is packaged oddly: use its public loader.
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataError(
            "the digits dataset ships with scikit-learn, which is not installed; "
            "install it with `pip install scikit-learn`"
        ) from exc
    bunch = sk_load_digits()
    return _digits_from_arrays(bunch.data, bunch.target)


# --------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension
_MNIST_SIDE = 28

_TRAIN_IMAGES = "train-images-idx3-ubyte"
_TRAIN_LABELS = "train-labels-idx1-ubyte"
_TEST_IMAGES = "t10k-images-idx3-ubyte"
_TEST_LABELS = "t10k-labels-idx1-ubyte"
_IDX_NAMES = (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)


def _expected_idx_listing() -> str:
    return ", ".join(f"{name}[.gz]" for name in _IDX_NAMES)


def _read_file_bytes(path: Path) -> bytes:
    """Read a file, decompressing it when its name ends in .gz."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # BadGzipFile is an OSError; EOFError means the compressed stream was cut short.
        raise DataError(
            f"{path}: the file is not a valid gzip file or is corrupt ({exc}); "
            "download it again or decompress it yourself"
        ) from exc


def _parse_idx(path: Path, data: bytes, kind: str) -> np.ndarray:
    """Parse IDX bytes. kind "images" gives uint8 (N, 28, 28); kind "labels" gives uint8 (N,)."""
    magic_expected = _IDX_IMAGES_MAGIC if kind == "images" else _IDX_LABELS_MAGIC
    header_len = 16 if kind == "images" else 8
    if len(data) < 4:
        raise DataError(
            f"{path}: the file is truncated: it has {len(data)} bytes, too few even for "
            f"the 4-byte IDX magic number"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != magic_expected:
        raise DataError(
            f"{path}: not an IDX {kind} file (magic number 0x{magic:08x}, "
            f"expected 0x{magic_expected:08x})"
        )
    if len(data) < header_len:
        raise DataError(
            f"{path}: the file is truncated: expected a {header_len}-byte IDX header, "
            f"got {len(data)} bytes"
        )
    dims = [int.from_bytes(data[i : i + 4], "big") for i in range(4, header_len, 4)]
    count = dims[0]
    if kind == "images" and (dims[1], dims[2]) != (_MNIST_SIDE, _MNIST_SIDE):
        raise DataError(
            f"{path}: images are {dims[1]}x{dims[2]} pixels, expected "
            f"{_MNIST_SIDE}x{_MNIST_SIDE} (MNIST format)"
        )
    per_item = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
    expected = header_len + count * per_item
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{path}: the file is {problem}: the header describes {count} {kind}, "
            f"so the file should have {expected} bytes, but it has {len(data)} bytes"
        )
    # frombuffer views the bytes without a Python loop; the copy happens once, later.
    array = np.frombuffer(data, dtype=np.uint8, offset=header_len)
    return array.reshape([count, *dims[1:]])


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    """The raw file if present, else its .gz twin, else None."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = _parse_idx(images_path, _read_file_bytes(images_path), "images")
    labels = _parse_idx(labels_path, _read_file_bytes(labels_path), "labels")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the counts must match"
        )
    if len(labels) and int(labels.max()) > 9:
        raise DataError(
            f"{labels_path}: found label {int(labels.max())}, expected labels 0..9"
        )
    x = _images_to_tensor(images.reshape(-1, 1, _MNIST_SIDE, _MNIST_SIDE), 255.0)
    return x, _labels_to_tensor(labels)


def _data_folder(path: str | None, what: str, expected: str) -> Path:
    """The folder `data.path` names, or a DataError saying what it must hold."""
    if path is None:
        raise DataError(f"set `data.path` to {what} ({expected}); nothing is downloaded")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; `data.path` must name {what} ({expected})")
    return folder


def _load_idx_folder(path: str | None, name: str, class_names: list[str]) -> SourceData:
    folder = _data_folder(path, f"the folder holding the {name} IDX files",
                          _expected_idx_listing())
    found = {stem: _find_idx_file(folder, stem) for stem in _IDX_NAMES}
    if not any(found.values()) and (folder / "raw").is_dir():
        # torchvision keeps the files in <root>/<Dataset>/raw; accept that folder's parent.
        folder = folder / "raw"
        found = {stem: _find_idx_file(folder, stem) for stem in _IDX_NAMES}
    if not any(found.values()):
        raise DataError(
            f"{folder}: found no {name} files; expected {_expected_idx_listing()}"
        )

    splits: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images_stem, labels_stem in ((_TRAIN_IMAGES, _TRAIN_LABELS), (_TEST_IMAGES, _TEST_LABELS)):
        images_path, labels_path = found[images_stem], found[labels_stem]
        if images_path is None and labels_path is None:
            continue
        if images_path is None or labels_path is None:
            present = images_path or labels_path
            missing = images_stem if images_path is None else labels_stem
            raise DataError(
                f"{present} has no partner: {folder} lacks {missing}[.gz], "
                "and images and labels must come in pairs"
            )
        splits.append(_load_idx_pair(images_path, labels_path))

    if len(splits) == 1:
        # A single pair (train or t10k) becomes the training pool; the stream splits it.
        (x_train, y_train), (x_test, y_test) = splits[0], (None, None)
    else:
        (x_train, y_train), (x_test, y_test) = splits
    return SourceData(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=list(class_names),
    )


def load_mnist(path: str | None) -> SourceData:
    """Load MNIST from a folder of IDX files (raw or .gz).

    The folder may hold both the train and t10k pairs, or a single pair; a single pair
    is returned as x_train/y_train with x_test and y_test None. Images are float32
    (N, 1, 28, 28) in [0, 1].
    """
    return _load_idx_folder(path, "mnist", MNIST_CLASSES)


def load_fashion_mnist(path: str | None) -> SourceData:
    """Load Fashion-MNIST from a folder of IDX files (same layout and rules as `load_mnist`)."""
    return _load_idx_folder(path, "fashion_mnist", FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------------------
# CIFAR-10 (python version: pickled batches)
# --------------------------------------------------------------------------------------

_CIFAR_DATA_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_META = "batches.meta"
_CIFAR_ROW = 3 * 32 * 32


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch may name: what numpy needs to rebuild an ndarray.

    Both the numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) module names are mapped
    to whichever module this numpy has, so old pickles load on new numpy and vice versa
    without importing the deprecated `numpy.core` alias.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import _codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # protocol-2 pickles wrap raw bytes this way
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # used by protocol-5 pickles
            allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    A pickle may name any importable callable (os.system, say) and call it while loading;
    refusing every global outside a short list keeps a downloaded file from running code.
    `dataset` names the format in messages (CIFAR-10, CIFAR-100).
    """

    def __init__(self, file: Any, source: Path, dataset: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._dataset = dataset
        self._allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refused to load the pickle because it asks for "
                f"{module}.{name}, which a {self._dataset} file never needs; the file may be "
                "corrupt or malicious"
            ) from None


def _safe_unpickle(path: Path, dataset: str = "CIFAR-10") -> Any:
    """The object pickled in `path`, rebuilt by the refusing unpickler (numpy arrays and
    plain containers only); DataError naming the file for anything else or a damaged file."""
    try:
        with path.open("rb") as handle:
            return _RestrictedUnpickler(handle, path, dataset).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "bad file"
        raise DataError(
            f"{path}: not a readable {dataset} pickle ({one_line(exc)})"
        ) from exc


def _dict_get(obj: dict, key: str) -> Any:
    """Look up a key stored as bytes (Python 2 pickles) or str (Python 3 re-pickles)."""
    if key.encode() in obj:
        return obj[key.encode()]
    return obj.get(key)


def _load_cifar_batch(path: Path, label_key: str = "labels", n_classes: int = 10,
                      dataset: str = "CIFAR-10") -> tuple[np.ndarray, np.ndarray]:
    """Read one batch: uint8 (n, 3072) pixels and int64 (n,) labels (the `label_key` entry,
    each in 0..n_classes-1), validated."""
    obj = _safe_unpickle(path, dataset)
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: expected a pickled dict with 'data' and '{label_key}', "
            f"found {type(obj).__name__}"
        )
    data, labels = _dict_get(obj, "data"), _dict_get(obj, label_key)
    if data is None or labels is None:
        raise DataError(f"{path}: the batch lacks its 'data' or '{label_key}' entry")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_ROW:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(
            f"{path}: 'data' should be a uint8 array of shape (n, {_CIFAR_ROW}), "
            f"found {dtype} with shape {shape}"
        )
    try:
        label_array = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: '{label_key}' is not a list of integers ({exc})") from exc
    if label_array.ndim != 1 or (label_array.size and label_array.dtype.kind not in "iu"):
        raise DataError(f"{path}: '{label_key}' should be a flat list of integers")
    if len(label_array) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but {len(label_array)} labels; the counts must match"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() >= n_classes):
        raise DataError(
            f"{path}: labels must lie in 0..{n_classes - 1}, found {int(label_array.min())}.."
            f"{int(label_array.max())}"
        )
    return data, label_array.astype(np.int64)


def _meta_names(meta_path: Path, key: str, count: int, dataset: str) -> list[str]:
    """The `count` class names listed under `key` in a CIFAR meta pickle."""
    meta = _safe_unpickle(meta_path, dataset)
    names = _dict_get(meta, key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise DataError(f"{meta_path}: expected '{key}' to be a list of {count} names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_class_names(folder: Path) -> list[str]:
    meta_path = folder / _CIFAR_META
    if not meta_path.is_file():
        return list(CIFAR10_CLASSES)  # the names are fixed; the meta file is optional
    return _meta_names(meta_path, "label_names", 10, "CIFAR-10")


def _cifar_folder(path: str | None, name: str, marker: str, expected: str) -> Path:
    """The folder `name` (cifar-10-batches-py, cifar-100-python) that `data.path` names, or the
    one inside it when `data.path` names the folder above it (no `marker` file there)."""
    folder = _data_folder(path, f"the {name} folder", expected)
    if not (folder / marker).exists() and (folder / name).is_dir():
        folder = folder / name  # the user named the folder above it
    return folder


def _cifar_to_tensor(rows: np.ndarray) -> torch.Tensor:
    # Each row is 1024 red values, then 1024 green, then 1024 blue, each plane row-major,
    # so a plain reshape gives channels-first (C, H, W) images.
    return _images_to_tensor(rows.reshape(-1, 3, 32, 32), 255.0)


def load_cifar10(path: str | None) -> SourceData:
    """Load CIFAR-10 from the "python version" folder (data_batch_1..5, test_batch).

    `path` may name the `cifar-10-batches-py` folder or the folder that contains it.
    Batches are unpickled with an unpickler that refuses every global except the few
    numpy needs, so a tampered file cannot run code. Train is the five data batches,
    test is test_batch; images are float32 (N, 3, 32, 32) in [0, 1].
    """
    wanted = [*_CIFAR_DATA_BATCHES, _CIFAR_TEST_BATCH]
    folder = _cifar_folder(path, "cifar-10-batches-py", _CIFAR_TEST_BATCH, ", ".join(wanted))
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing CIFAR-10 batch files: {', '.join(missing)}")

    train = [_load_cifar_batch(folder / name) for name in _CIFAR_DATA_BATCHES]
    test_x, test_y = _load_cifar_batch(folder / _CIFAR_TEST_BATCH)
    return SourceData(
        name="cifar10",
        x_train=_cifar_to_tensor(np.concatenate([x for x, _ in train])),
        y_train=torch.from_numpy(np.concatenate([y for _, y in train])),
        x_test=_cifar_to_tensor(test_x),
        y_test=torch.from_numpy(test_y),
        class_names=_cifar_class_names(folder),
    )


# --------------------------------------------------------------------------------------
# CIFAR-100 (python version: pickled train, test and meta)
# --------------------------------------------------------------------------------------

_CIFAR100_FILES = ("train", "test", "meta")
_CIFAR100_CLASS_COUNTS = {"fine": 100, "coarse": 20}


def load_cifar100(path: str | None, labels: str = "fine") -> SourceData:
    """Load CIFAR-100 from the "python version" folder (train, test, meta).

    `path` may name the `cifar-100-python` folder or the folder that contains it. `labels`
    picks the label set: "fine" (100 classes, the `fine_labels` entries, names from meta's
    `fine_label_names`) or "coarse" (20 superclasses, `coarse_labels` and
    `coarse_label_names`). The files are read with the same refusing unpickler as CIFAR-10's
    batches, so a tampered file cannot run code. Train is `train` (50000 images), test is
    `test` (10000); images are float32 (N, 3, 32, 32) in [0, 1].
    """
    if labels not in _CIFAR100_CLASS_COUNTS:
        raise ConfigError(f"data.labels: {labels!r} is not a CIFAR-100 label set; choose "
                          "fine or coarse")
    folder = _cifar_folder(path, "cifar-100-python", "test", ", ".join(_CIFAR100_FILES))
    missing = [name for name in _CIFAR100_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing CIFAR-100 files: {', '.join(missing)}")

    n_classes = _CIFAR100_CLASS_COUNTS[labels]
    train_x, train_y, test_x, test_y = (
        part for name in ("train", "test")
        for part in _load_cifar_batch(folder / name, f"{labels}_labels", n_classes, "CIFAR-100"))
    return SourceData(
        name="cifar100",
        x_train=_cifar_to_tensor(train_x),
        y_train=torch.from_numpy(train_y),
        x_test=_cifar_to_tensor(test_x),
        y_test=torch.from_numpy(test_y),
        class_names=_meta_names(folder / "meta", f"{labels}_label_names", n_classes,
                                "CIFAR-100"),
    )


# --------------------------------------------------------------------------------------
# Image files (Pillow): TinyImageNet and class-per-folder trees
# --------------------------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm"})
PROGRESS_FROM = 10_000  # a progress bar when reading at least this many examples (user.py too)


def _pillow() -> Any:
    """PIL.Image, imported on first use: Pillow is an optional extra."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError('reading image files needs Pillow, which is not installed; install '
                        'it with `pip install -e ".[images]"`') from None
    return Image


def _decode_image(image_module: Any, path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB (grayscale, palette and RGBA converted)."""
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with image_module.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as exc:  # Pillow fails on damaged files in many ways; all mean "bad file"
        raise DataError(f"{path}: cannot decode the image ({one_line(exc)}); the file is "
                        "damaged or not an image") from None


def _decode_images(paths: list[Path], what: str) -> torch.Tensor:
    """The image files `paths` (at least one) decoded into float32 (N, 3, H, W) in [0, 1].
    Every image must have the size of the first; DataError naming the first file of another
    size."""
    image_module = _pillow()
    from tqdm.auto import tqdm

    images: torch.Tensor | None = None  # allocated once the first image gives (H, W)
    shown = tqdm(paths, desc=f"decoding {what}", unit="image", leave=False,
                 disable=True if len(paths) < PROGRESS_FROM else None)
    for i, path in enumerate(shown):
        pixels = _decode_image(image_module, path)  # (H, W, 3)
        if images is None:
            first = path
            images = torch.empty((len(paths), 3, *pixels.shape[:2]), dtype=torch.float32)
        elif pixels.shape[:2] != images.shape[2:]:
            height, width = images.shape[2:]
            raise DataError(
                f"{path}: the image is {pixels.shape[1]}x{pixels.shape[0]} pixels but {first} "
                f"is {width}x{height}; every image must have the same size (resize them first)")
        # Filled in place: a second full-size copy of a large dataset would double the memory.
        images[i] = _images_to_tensor(pixels.transpose(2, 0, 1), 255.0)
    assert images is not None, "callers pass at least one path"
    return images


def _decode_splits(train: list[Path], test: list[Path], what: str
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Train and test files decoded together (one size check across both, one progress bar):
    float32 (N_train, 3, H, W) and (N_test, 3, H, W), the second None without test files."""
    images = _decode_images(train + test, what)
    return images[:len(train)], (images[len(train):] if test else None)


def _image_files(folder: Path) -> list[Path]:
    """The image files anywhere under `folder` (by suffix, any case; hidden ones skipped),
    sorted by path so that the order, hence the examples' order, is the same everywhere."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the text file ({one_line(exc)})") from None


_TINY = "tiny-imagenet-200"


def _tiny_wnids(folder: Path) -> list[str]:
    """The WordNet ids of wnids.txt, sorted (label i is the i-th in sorted order, as
    torchvision's ImageFolder numbers train/<wnid> folders)."""
    wnids_path = folder / "wnids.txt"
    wnids = _read_text(wnids_path).split()
    if not wnids:
        raise DataError(f"{wnids_path}: the file lists no class ids")
    if len(set(wnids)) != len(wnids):
        twice = next(w for w in wnids if wnids.count(w) > 1)
        raise DataError(f"{wnids_path}: class id {twice} is listed twice")
    return sorted(wnids)


def _tiny_class_names(folder: Path, wnids: list[str]) -> list[str]:
    """The first name words.txt gives each id ("goldfish" of "goldfish, Carassius auratus");
    the id itself where words.txt is absent or lacks it."""
    words_path = folder / "words.txt"
    if not words_path.is_file():
        return list(wnids)
    words = {}
    for line in _read_text(words_path).splitlines():
        wnid, _, text = line.partition("\t")
        words[wnid.strip()] = text.split(",")[0].strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def _tiny_val(folder: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """The validation images and labels that val/val_annotations.txt lists."""
    annotations = folder / "val" / "val_annotations.txt"
    paths, labels = [], []
    for number, line in enumerate(_read_text(annotations).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations}: line {number} should be FILE<tab>WNID..., found "
                            f"{line[:80]!r}")
        if fields[1] not in index:
            raise DataError(f"{annotations}: line {number} names class {fields[1]}, which "
                            "wnids.txt does not list")
        paths.append(folder / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    if not paths:
        raise DataError(f"{annotations}: the file lists no images")
    return paths, labels


def load_tiny_imagenet(path: str | None) -> SourceData:
    """Load TinyImageNet (Le & Yang 2015) from the `tiny-imagenet-200` folder as unpacked.

    Classes are the 200 ids of wnids.txt in sorted order, named by words.txt. Train is
    train/<wnid>/images/*.JPEG (500 per class); test is the labelled validation set,
    val/images/*.JPEG with val/val_annotations.txt (50 per class), as the continual-learning
    literature does: the official test images have no labels. Images are decoded with
    Pillow (grayscale ones converted to RGB) to float32 (N, 3, 64, 64) in [0, 1]: about
    5.4 GB of memory for train and test together.
    """
    folder = _data_folder(path, f"the {_TINY} folder", "wnids.txt, words.txt, train/, val/")
    if not (folder / "wnids.txt").exists() and (folder / _TINY).is_dir():
        folder = folder / _TINY  # the user named the folder above it
    wnids = _tiny_wnids(folder)
    index = {wnid: i for i, wnid in enumerate(wnids)}

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        class_folder = folder / "train" / wnid / "images"
        if not class_folder.is_dir():
            raise DataError(f"{class_folder}: no such folder; wnids.txt lists {wnid}, so the "
                            "train split needs its images there")
        files = _image_files(class_folder)
        if not files:
            raise DataError(f"{class_folder}: holds no images")
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    val_paths, val_labels = _tiny_val(folder, index)
    x_train, x_test = _decode_splits(train_paths, val_paths, "TinyImageNet")
    return SourceData(
        name="tiny_imagenet",
        x_train=x_train,
        y_train=torch.tensor(train_labels, dtype=torch.int64),
        x_test=x_test,
        y_test=torch.tensor(val_labels, dtype=torch.int64),
        class_names=_tiny_class_names(folder, wnids),
    )


def _class_folders(root: Path) -> list[Path]:
    """The subfolders of `root` (hidden ones skipped), sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_tree_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The image files under root/<class>/ for every class folder of `root`, each labelled by
    its class's position in `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for class_folder in _class_folders(root):
        if class_folder.name not in index:
            raise DataError(f"{class_folder}: class {class_folder.name} has no folder in the "
                            "train split; the test split can only hold the train split's classes")
        files = _image_files(class_folder)
        if not files:
            raise DataError(f"{class_folder}: holds no images (expected "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
        paths += files
        labels += [index[class_folder.name]] * len(files)
    return paths, labels


def load_image_folder(path: str | None) -> SourceData:
    """Load a tree of image files with one folder per class: root/<class>/*.png (or .jpg,
    .jpeg, .bmp, .gif, .webp, .tif, .ppm, .pgm; in subfolders too, as torchvision's
    ImageFolder), or the same under root/train/ and root/test/ for an official test split.
    A root holding a train/ folder is read that way (train/ alone: the stream holds out
    data.test_fraction, as it does for a root of class folders).

    Classes are the train folders sorted by name (label i is the i-th name). Images are
    decoded with Pillow and converted to RGB: float32 (N, 3, H, W) in [0, 1]; all must share
    one size (DataError naming a file of another size).
    """
    root = _data_folder(path, "a folder with one subfolder of images per class",
                        "<class>/*.png or train/<class>/*.png and test/<class>/*.png")
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = root / "test" if train_root != root and (root / "test").is_dir() else None
    classes = [folder.name for folder in _class_folders(train_root)]
    if not classes:
        raise DataError(f"{train_root}: has no class subfolders; expected <class>/*.png")
    train_paths, train_labels = _class_tree_files(train_root, classes)
    test_paths, test_labels = ([], []) if test_root is None else \
        _class_tree_files(test_root, classes)
    x_train, x_test = _decode_splits(train_paths, test_paths, "images")
    return SourceData(
        name="image_folder",
        x_train=x_train,
        y_train=torch.tensor(train_labels, dtype=torch.int64),
        x_test=x_test,
        y_test=torch.tensor(test_labels, dtype=torch.int64) if test_paths else None,
        class_names=classes,
    )


@functools.lru_cache(maxsize=4)
def load_source(name: str, path: str | None, labels: str = "fine") -> SourceData:
    """The registered dataset `name` read from `path`, once per process: an experiment that
    runs several seeds or methods in one process (or one worker) reads its files once. The
    tensors are shared: streams and problems index them (copies), never write into them.
    `labels` (data.labels) other than "fine" is passed to readers that take it (cifar100)."""
    if labels == "fine":
        return DATASETS.get(name)(path)
    check_label_set(name, labels)
    return DATASETS.get(name)(path, labels=labels)
