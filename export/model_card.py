"""Writes the model card (``model.json``) for an exported folder; the schema itself lives in the
torch-free :mod:`modelcard` package that the service reads it with."""

from __future__ import annotations

import datetime as dt
import json
import platform
from importlib import metadata
from pathlib import Path

from export import fashion_mnist
from export.architectures import arch_spec
from export.errors import ExportError
from modelcard import InputSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FASHION_MNIST = "fashion-mnist"


def input_spec_for(
    arch: str,
    in_chans: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> InputSpec:
    """The input rule for ``arch``: 28x28 stretch for the CIFAR-style nets, the ImageNet rule
    (shorter side 256, centre crop 224) otherwise."""
    spec = arch_spec(arch)
    channels = in_chans or spec.defaults["in_chans"]
    size = spec.defaults["img_size"]
    if channels not in (1, 3):
        raise ExportError(f"only 1- or 3-channel inputs can be served, not {channels}")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([0.5], [0.5])
    small = spec.stem == "cifar"
    return InputSpec(
        channels=1 if channels == 1 else 3,
        height=size,
        width=size,
        color="L" if channels == 1 else "RGB",
        resize="stretch" if small else "shorter-side-crop",
        resize_shorter=None if small else round(size / 0.875),
        mean=mean or default_mean,
        std=std or default_std,
    )


def read_labels(source: str | None, num_classes: int) -> list[str]:
    """``fashion-mnist``, a text file with one label per line, or ``class_<i>`` names."""
    if source is None:
        return [f"class_{i}" for i in range(num_classes)]
    if source == FASHION_MNIST:
        labels = list(fashion_mnist.LABELS)
    else:
        path = Path(source)
        if not path.is_file():
            raise ExportError(
                f"labels file {path} not found (one label per line, or '{FASHION_MNIST}')"
            )
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ExportError(
            f"{source} has {len(labels)} labels but the model has {num_classes} classes"
        )
    return labels


def read_record(path: Path | None) -> dict | None:
    """A training record written by ``export train`` (``*.train.json``), if there is one."""
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"training record {path} is not valid JSON: {e}") from e


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in (
        "torch",
        "onnx",
        "onnxscript",
        "onnxruntime-gpu",
        "onnxruntime",
        "numpy",
        "pillow",
        "seresnet-serve",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
