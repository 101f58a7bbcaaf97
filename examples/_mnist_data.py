"""The image data of ``examples/odenet_mnist.py``: the ``--dataset`` fallback chain (MNIST via
torchvision, else Fashion-MNIST, else scikit-learn's 8x8 digits), resizing and subsetting.

Under torchrun rank 0 loads first (a torchvision download goes into ``--out/data``), then
the other ranks read what it fetched; every rank ends up with the same images (same seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import log, main_first

from pydiffbridge.errors import BackendUnavailableError
from pydiffbridge.nn._data import ImageData, load_dataset

DATASETS = ["auto", "fashion", "mnist", "digits", "dir"]


def get_data(args: argparse.Namespace) -> ImageData:
    names = ["mnist", "fashion", "digits"] if args.dataset == "auto" else [args.dataset]
    with main_first():
        for i, name in enumerate(names):
            try:
                data = load_dataset(name, args.data_dir, root=Path(args.out) / "data")
                break
            except (BackendUnavailableError, FileNotFoundError, OSError, ValueError) as exc:
                if i == len(names) - 1:
                    raise
                log(f"dataset {name} unavailable ({exc}); trying {names[i + 1]}")
    size = args.image_size or (16 if data.image_shape[-1] < 16 else None)
    if size:
        data = data.resized(size)
    return data.subset(args.subset or None, args.test_subset, seed=args.seed)
