"""Dataset loading with checksums. All dataset I/O of the project lives here.

Data directory: ``PATHGUARD_DATA_DIR`` (default ``~/.cache/pathguard/data``), with

- ``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (the canonical idx files), and
- ``cifar10/cifar10-jpeg.tar.gz`` (ImageFolder layout ``{train,test}/<class>/NNNN.jpg``), or
  ``cifar10/cifar-10-binary.tar.gz`` (the canonical binary release, as downloaded).

Arrays come back as float32 NCHW in [0, 1] with uint8 labels. Nothing here unpickles anything.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathguard.models.errors import DatasetError

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_SUFFIXES",
    "DatasetError",
    "ImageFolder",
    "Split",
    "data_dir",
    "dataset_info",
    "download",
    "interleaved_order",
    "load_dataset",
]


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Indices that visit the images class by class in turn (the first of every class, then the second of every
    class, ...), keeping each class's own order: "the first n" of this order covers every class about equally,
    whatever order the split is stored in (the CIFAR-10 JPEG copy's splits are ordered by class)."""
    y = np.asarray(labels)
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((y, rank))  # by rank within its class, then by class


CIFAR10_CLASSES = (
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
)
MNIST_CLASSES = tuple(str(d) for d in range(10))

# sha256 of the *decompressed* canonical idx files (identical for any gzip of the same content).
_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR_JPEG = ("cifar10-jpeg.tar.gz", "sha256", "d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965")
# The canonical binary release (never the pickled "python version"), with its published md5.
_CIFAR_BIN = ("cifar-10-binary.tar.gz", "md5", "c32a1d4ab5d03f1284b67883e8d87530")
_CIFAR_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes
    ----------
    x : np.ndarray
        (N, C, H, W) float32 in [0, 1].
    y : np.ndarray
        (N,) integer class indices (uint8 for the bundled datasets).
    classes : tuple of str
        Class labels by index.
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.x[idx], self.y[idx], self.classes)


def data_dir() -> Path:
    """The data directory: ``$PATHGUARD_DATA_DIR`` or ``~/.cache/pathguard/data``."""
    env = os.environ.get("PATHGUARD_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pathguard" / "data"


def _cache_dir() -> Path:
    env = os.environ.get("PATHGUARD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pathguard"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo, usedforsecurity=False) if algo == "md5" else hashlib.new(algo)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hint(dataset: str) -> str:
    return (
        f"set PATHGUARD_DATA_DIR to a folder holding {dataset}/ (see README, 'Data'), "
        f"or run `pathguard download {dataset}` on a machine with internet access"
    )


def _require(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing dataset file {path}; {_hint(dataset)}")
    return path


def _read_idx(path: Path, expected_sha256: str) -> np.ndarray:
    raw = gzip.decompress(_require(path, "mnist").read_bytes())
    if _sha256(raw) != expected_sha256:
        raise DatasetError(f"corrupt dataset file {path}: sha256 of its content does not match; {_hint('mnist')}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_mnist(split: str) -> Split:
    prefix = "train" if split == "train" else "t10k"
    root = data_dir() / "mnist"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", _MNIST_FILES[f"{prefix}-images-idx3-ubyte.gz"])
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", _MNIST_FILES[f"{prefix}-labels-idx1-ubyte.gz"])
    x = images.astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
    return Split(x, labels.astype(np.uint8), MNIST_CLASSES)


def _decode_cifar_jpeg(path: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    found: dict[str, list[tuple[str, np.ndarray, int]]] = {"train": [], "test": []}
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:  # archive order: a gzip stream cannot seek backwards cheaply
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            split, cls, _ = Path(m.name).parts[-3:]
            f = tar.extractfile(m)
            assert f is not None
            img = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), dtype=np.uint8)
            found[split].append((m.name, img.transpose(2, 0, 1), CIFAR10_CLASSES.index(cls)))  # (3, 32, 32)
    arrays: dict[str, np.ndarray] = {}
    for split, items in found.items():
        items.sort(key=lambda t: t[0])  # by class folder, then file number: a stable order
        arrays[f"{split}_x"] = np.stack([t[1] for t in items])
        arrays[f"{split}_y"] = np.array([t[2] for t in items], dtype=np.uint8)
    return arrays


def _decode_cifar_binary(path: Path) -> dict[str, np.ndarray]:
    files = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    out: dict[str, np.ndarray] = {}
    with tarfile.open(path, "r:gz") as tar:
        by_name = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for split, names in files.items():
            recs = []
            for name in names:
                f = tar.extractfile(by_name[name])
                assert f is not None
                recs.append(np.frombuffer(f.read(), dtype=np.uint8).reshape(-1, 1 + 3072))
            rec = np.concatenate(recs)
            out[f"{split}_y"] = rec[:, 0].copy()
            out[f"{split}_x"] = rec[:, 1:].reshape(-1, 3, 32, 32)
    return out


def _load_cifar10(split: str) -> Split:
    root = data_dir() / "cifar10"
    candidates = [(_CIFAR_JPEG, _decode_cifar_jpeg), (_CIFAR_BIN, _decode_cifar_binary)]
    present = [(spec, decode) for spec, decode in candidates if (root / spec[0]).is_file()]
    if not present:
        raise DatasetError(
            f"missing dataset file {root / _CIFAR_JPEG[0]} (or {root / _CIFAR_BIN[0]}); {_hint('cifar10')}"
        )
    (fname, algo, expected), decode = present[0]
    path = root / fname
    digest = _hash_file(path, algo)
    if digest != expected:
        raise DatasetError(f"corrupt dataset file {path}: {algo} {digest} != expected {expected}; {_hint('cifar10')}")
    cache = _cache_dir() / f"cifar10-{digest[:16]}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        arrays = decode(path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: two first loads may run at once
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(cache)
    x = arrays[f"{split}_x"].astype(np.float32) / 255.0
    return Split(x, arrays[f"{split}_y"].astype(np.uint8), CIFAR10_CLASSES)


_SIZES = {("mnist", "train"): 60000, ("mnist", "test"): 10000, ("cifar10", "train"): 50000, ("cifar10", "test"): 10000}


def dataset_info(name: str, split: str) -> tuple[int, tuple[str, ...]]:
    """Number of images and classes of ``split`` of a bundled dataset, without reading it; :class:`DatasetError`
    (the message :func:`load_dataset` would give) when its files are not in :func:`data_dir`."""
    if (name, split) not in _SIZES:
        raise ValueError(f"unknown dataset split {name!r}/{split!r}; supported: mnist, cifar10 (train, test)")
    if name == "mnist":
        prefix = "train" if split == "train" else "t10k"
        for kind in ("images-idx3", "labels-idx1"):
            _require(data_dir() / "mnist" / f"{prefix}-{kind}-ubyte.gz", "mnist")
    else:
        root = data_dir() / "cifar10"
        if not any((root / spec[0]).is_file() for spec in (_CIFAR_JPEG, _CIFAR_BIN)):
            raise DatasetError(
                f"missing dataset file {root / _CIFAR_JPEG[0]} (or {root / _CIFAR_BIN[0]}); {_hint('cifar10')}"
            )
    return _SIZES[(name, split)], MNIST_CLASSES if name == "mnist" else CIFAR10_CLASSES


def load_dataset(name: str, split: str) -> Split:
    """Load ``split`` (``"train"`` or ``"test"``) of dataset ``name`` (``"mnist"`` or ``"cifar10"``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if name == "mnist":
        return _load_mnist(split)
    if name == "cifar10":
        return _load_cifar10(split)
    raise ValueError(f"unknown dataset {name!r}; supported: mnist, cifar10")


def _fetch(url: str, dest: Path) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed https URLs only)
        data: bytes = resp.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return data


def download(name: str) -> list[Path]:
    """Download the canonical files of ``name`` into :func:`data_dir`, verifying every checksum.

    Files already present with the right checksum are kept. Nothing is written if a checksum fails.
    """
    written: list[Path] = []
    if name == "mnist":
        for fname, expected in _MNIST_FILES.items():
            dest = data_dir() / "mnist" / fname
            if dest.is_file() and _sha256(gzip.decompress(dest.read_bytes())) == expected:
                continue
            data = _fetch(_MNIST_URL + fname, dest)
            if _sha256(gzip.decompress(data)) != expected:
                raise DatasetError(f"downloaded {fname} does not match its checksum; not saved")
            dest.write_bytes(data)
            written.append(dest)
        return written
    if name == "cifar10":
        fname, algo, expected = _CIFAR_BIN
        dest = data_dir() / "cifar10" / fname
        if dest.is_file() and _hash_file(dest, algo) == expected:
            return written
        data = _fetch(_CIFAR_BIN_URL, dest)
        if hashlib.md5(data, usedforsecurity=False).hexdigest() != expected:
            raise DatasetError(f"downloaded {fname} does not match its checksum; not saved")
        dest.write_bytes(data)
        return [dest]
    raise ValueError(f"unknown dataset {name!r}; supported: mnist, cifar10")


# --------------------------------------------------------------------------------------------------------- folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS_FILE = "classes.txt"


@dataclass(frozen=True)
class ImageFolder:
    """An image-folder dataset ``root/<class>/*.png|jpg|jpeg``, indexed without reading the images.

    Classes are the sub-folder names in sorted order, or the order of ``root/classes.txt`` (one folder name a
    line) when that file exists: class ``k`` is the classifier's output ``k``. Images are read in batches by
    :meth:`load`, converted to the classifier's channels (L or RGB) and resized (bilinear) to its input size.
    Unreadable files are skipped and counted, never silently relabelled.
    """

    root: Path
    files: tuple[Path, ...]
    labels: np.ndarray  # (N,) int64 class index per file
    classes: tuple[str, ...]

    @classmethod
    def scan(cls, root: str | Path) -> ImageFolder:
        """Index ``root``; :class:`DatasetError` for a missing folder, no classes or an empty class."""
        base = Path(root)
        if not base.is_dir():
            raise DatasetError(f"image folder {base} does not exist; expected {base}/<class>/*.png|jpg")
        folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = cls._classes(base, folders)
        files: list[Path] = []
        labels: list[int] = []
        for k, name in enumerate(classes):
            found = sorted(p for p in (base / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DatasetError(f"class folder {base / name} holds no .png/.jpg images")
            files += found
            labels += [k] * len(found)
        return cls(base, tuple(files), np.asarray(labels, dtype=np.int64), tuple(classes))

    @staticmethod
    def _classes(base: Path, folders: list[str]) -> list[str]:
        labels_file = base / LABELS_FILE
        if labels_file.is_file():
            names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
            missing = [n for n in names if n not in folders]
            if missing or len(set(names)) != len(names):
                raise DatasetError(f"{labels_file}: every line must name a distinct class folder; missing {missing}")
            return names
        if not folders:
            raise DatasetError(f"image folder {base} has no class sub-folders; expected {base}/<class>/*.png|jpg")
        return folders

    def __len__(self) -> int:
        return len(self.files)

    def load(self, shape: tuple[int, int, int], idx: np.ndarray | None = None) -> tuple[Split, list[Path]]:
        """Read the images ``idx`` (default: all) as a :class:`Split` of float32 (N, C, H, W) in [0, 1].

        Returns the split and the files that could not be read (skipped).
        """
        from PIL import Image, UnidentifiedImageError

        c, h, w = shape
        if c not in (1, 3):
            raise DatasetError(f"image folders feed 1- or 3-channel classifiers, this one takes {c} channels")
        order = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        x = np.empty((len(order), c, h, w), dtype=np.float32)
        keep = np.ones(len(order), dtype=bool)
        skipped: list[Path] = []
        for j, i in enumerate(order):
            try:
                with Image.open(self.files[i]) as raw:
                    img = raw.convert("L" if c == 1 else "RGB")
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError, ValueError):
                keep[j] = False
                skipped.append(self.files[i])
                continue
            x[j] = arr[None] if c == 1 else arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if not keep.any():
            raise DatasetError(f"none of the {len(order)} images under {self.root} could be read")
        return Split(x[keep], self.labels[order][keep], self.classes), skipped

    def batches(
        self, shape: tuple[int, int, int], idx: np.ndarray, batch_size: int = 512
    ) -> Iterator[tuple[Split, list[Path]]]:
        """:meth:`load` of ``idx`` in consecutive batches, so only one batch of pixels is in memory at a time."""
        for s in range(0, len(idx), batch_size):
            try:
                yield self.load(shape, idx[s : s + batch_size])
            except DatasetError:  # a batch of only unreadable files
                yield (
                    Split(np.empty((0, *shape), np.float32), np.empty(0, np.int64), self.classes),
                    [self.files[i] for i in idx[s : s + batch_size]],
                )
