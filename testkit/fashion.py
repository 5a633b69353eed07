"""The embedded model's own test data: Fashion-MNIST's 10,000 test images with their true labels,
read once per process, and the image files tests make of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from export import fashion_mnist
from testkit.images import png

LABELS = fashion_mnist.LABELS


@dataclass(frozen=True)
class FashionTest:
    images: np.ndarray  # (10000, 28, 28) uint8
    labels: np.ndarray  # (10000,) class numbers

    def label(self, i: int) -> str:
        return LABELS[int(self.labels[i])]

    def png(self, i: int) -> bytes:
        return png(self.images[i])

    def pngs(self, n: int) -> list[bytes]:
        """The first ``n`` test images as PNG files."""
        return [self.png(i) for i in range(n)]

    def save_pngs(
        self, folder: Path, indices: range | list[int], *, by_class: bool = False
    ) -> list[Path]:
        """The test images ``indices`` as PNGs in ``folder`` (in a folder per class when
        ``by_class``, as labelled datasets are laid out), each named after its index and label."""
        paths = []
        for i in indices:
            where = folder / class_folder(self.label(i)) if by_class else folder
            where.mkdir(parents=True, exist_ok=True)
            path = where / f"{i:05d}_{class_folder(self.label(i))}.png"
            path.write_bytes(self.png(i))
            paths.append(path)
        return paths


@cache
def fashion_test() -> FashionTest:
    images, labels = fashion_mnist.load("test")
    return FashionTest(images, labels)


def class_folder(label: str) -> str:
    """A file or folder name for a class label, as datasets often spell them: "T-shirt/top"
    cannot be one (it has a slash) and "Ankle boot" becomes "Ankle_boot"."""
    return label.replace("/", "_").replace(" ", "_")
