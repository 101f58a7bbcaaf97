"""Small image-classification datasets for the ODE-Net examples and tests.

Four sources, all returned as float tensors in ``[0, 1]`` of shape ``(N, 1, H, W)`` with
``int64`` labels:

* ``"mnist"``   -- MNIST through :mod:`torchvision` when it is importable and the files can be
  downloaded (or are already cached under ``root``);
* ``"fashion"`` -- Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``) or any directory holding the same files;
* ``"dir"``     -- any directory of MNIST-format idx files (gzip-compressed or not);
* ``"digits"``  -- scikit-learn's 8x8 handwritten digits, bundled with scikit-learn and
  therefore always available offline.

The idx files are parsed here with NumPy, so no torchvision is needed for the file-based
sources.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailableError, InputError

__all__ = ["ImageData", "read_idx", "load_idx_dir", "load_digits_data", "load_dataset"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ImageData:
    """A train/test split of single-channel images.

    Attributes:
        x_train, x_test: float32 tensors ``(N, 1, H, W)`` with values in ``[0, 1]``.
        y_train, y_test: int64 label tensors ``(N,)``.
        name: short description of where the data came from.
        num_classes: number of label classes.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def resized(self, size: int) -> ImageData:
        """Return a copy with images bilinearly resized to ``size x size``."""
        import torch.nn.functional as F

        def rs(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=(size, size), mode="bilinear",
                                 align_corners=False).clamp_(0.0, 1.0)

        return ImageData(rs(self.x_train), self.y_train, rs(self.x_test), self.y_test,
                         f"{self.name} resized to {size}x{size}", self.num_classes)

    def subset(self, n_train: int | None, n_test: int | None = None, seed: int = 0) -> ImageData:
        """Return a random subset with ``n_train`` training and ``n_test`` test images.

        ``None`` keeps all images; ``n_test`` defaults to ``max(n_train // 5, 100)``.
        """
        if n_train is None:
            return self
        if n_train <= 0:
            raise InputError(f"subset: n_train={n_train} must be positive; pass None for all.")
        if n_test is None:
            n_test = max(n_train // 5, 100)
        g = torch.Generator().manual_seed(seed)
        itr = torch.randperm(len(self.y_train), generator=g)[:n_train]
        ite = torch.randperm(len(self.y_test), generator=g)[:n_test]
        return ImageData(self.x_train[itr], self.y_train[itr], self.x_test[ite],
                         self.y_test[ite], f"{self.name} (subset {len(itr)}/{len(ite)})",
                         self.num_classes)


def _open(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one idx file (the MNIST format), gzip-compressed or not, into a NumPy array.

    Header: two zero bytes, a dtype code, the number of dimensions, then one big-endian
    uint32 per dimension; the data follow in C order.
    """
    path = Path(path)
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"read_idx: {path} is not an idx file (bad magic number {raw[:4]!r}); "
                         "expected MNIST-format files such as train-images-idx3-ubyte[.gz].")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - offset < count * dtype.itemsize:
        raise InputError(f"read_idx: {path} is truncated: header says {dims} but only "
                         f"{len(raw) - offset} data bytes follow; re-download the file.")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (directory / cand).is_file():
            return directory / cand
    raise InputError(f"load_idx_dir: no file {stem}[.gz] in {directory}; the directory must hold "
                     "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                     "and t10k-labels-idx1-ubyte (gzip-compressed or not).")


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images.astype(np.float32))
    if images.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def load_idx_dir(directory: str | os.PathLike[str], name: str | None = None) -> ImageData:
    """Load the four MNIST-format files of ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"load_idx_dir: {directory} is not a directory; pass --data-dir with "
                         "the MNIST-format files.")
    parts = {}
    for split, (img, lab) in _SPLIT_FILES.items():
        images = read_idx(_find(directory, img))
        labels = read_idx(_find(directory, lab))
        if len(images) != len(labels):
            raise InputError(f"load_idx_dir: {split} split of {directory} has {len(images)} "
                             f"images but {len(labels)} labels.")
        parts[split] = _to_tensors(images, labels)
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return ImageData(xtr, ytr, xte, yte, name or f"idx:{directory}", n_classes)


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images), split at random into train and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - sklearn is a test dependency
        raise BackendUnavailableError("load_digits_data needs scikit-learn: "
                                      "pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], "sklearn-digits-8x8")


def _load_torchvision_mnist(root: str | os.PathLike[str]) -> ImageData:
    try:
        from torchvision import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendUnavailableError("torchvision is not installed") from exc
    tr = datasets.MNIST(str(root), train=True, download=True)
    te = datasets.MNIST(str(root), train=False, download=True)
    xtr, ytr = _to_tensors(tr.data.numpy(), tr.targets.numpy())
    xte, yte = _to_tensors(te.data.numpy(), te.targets.numpy())
    return ImageData(xtr, ytr, xte, yte, "mnist (torchvision)")


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None,
                 root: str | os.PathLike[str] = "runs/data") -> ImageData:
    """Load ``name`` in ``{"fashion", "mnist", "digits", "dir"}``.

    ``data_dir`` overrides the location of the idx files for ``fashion``/``mnist``/``dir``.
    ``mnist`` tries ``data_dir`` first, then torchvision (download into ``root``), and
    raises :class:`~pydiffbridge.errors.BackendUnavailableError` if neither works;
    callers wanting an offline fallback catch it and use ``"digits"``.
    """
    name = name.lower()
    if name == "digits":
        return load_digits_data()
    if name == "dir":
        if data_dir is None:
            raise InputError("load_dataset('dir') needs data_dir (--data-dir) pointing at "
                             "MNIST-format idx files.")
        return load_idx_dir(data_dir)
    if name == "fashion":
        return load_idx_dir(data_dir or FASHION_DIR, "fashion-mnist")
    if name == "mnist":
        if data_dir is not None:
            return load_idx_dir(data_dir, "mnist")
        try:
            return _load_torchvision_mnist(root)
        except Exception as exc:  # noqa: BLE001 - any download/import failure means fallback
            raise BackendUnavailableError(
                f"MNIST unavailable: torchvision import or download failed ({exc!s:.200}); "
                "pass --data-dir with MNIST idx files, or use --dataset fashion/digits."
            ) from exc
    raise InputError(f"load_dataset: unknown dataset {name!r}; choose fashion, mnist, digits "
                     "or dir.")
