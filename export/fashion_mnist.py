"""Fashion-MNIST reader (Xiao, Rasul, Vollgraf 2017), from Debian's ``dataset-fashion-mnist``.

NumPy only, so tests and benchmarks can read the data without torch.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from export.errors import ExportError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = [
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
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissingError(ExportError, FileNotFoundError):
    pass


def dataset_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = int.from_bytes(data[0:4], "big")
    if header != magic:
        raise ValueError(f"{path}: not an IDX file (magic {header:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` of ``split`` (train or test)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = directory or dataset_dir()
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = root / img_name, root / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DatasetMissingError(
                f"Fashion-MNIST file {p} is missing. Install it with "
                "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point "
                "FASHION_MNIST_DIR at a folder holding the four *-ubyte.gz files."
            )
    images = _read_idx(img_path, 0x00000803)
    labels = _read_idx(lbl_path, 0x00000801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels
