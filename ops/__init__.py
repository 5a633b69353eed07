"""The SqueezeExcitation custom-op library for ONNX Runtime (domain ``ai.seresnet``).

The C++/CUDA sources under ``ops/src`` build into ``libseresnet_ops.so`` (``pip install .``
or ``make test``), which the wheel installs next to this file. This module finds that
library, says which execution providers it has kernels for, and registers it with a session::

    import onnxruntime as ort
    import ops

    options = ort.SessionOptions()
    ops.register(options)
    if "CUDAExecutionProvider" in ops.providers(): ...
    if ops.has_fp16_kernel("CUDAExecutionProvider"): ...   # model.fp16.se.onnx can run there

    # CUDA provider with prefer_nhwc=1: SE nodes channels-last, Transposes ORT cancels
    model = ops.to_channels_last(onnx.load("model.fp16.se.onnx"))

The op: ``y = x * sigmoid(w2 · relu(w1 · mean_hw(x) + b1) + b2)`` per (n, c), then
``+ residual`` (optional 6th input) and ``max(y, 0)`` when attribute ``relu`` is 1. x, residual
and y are [N,C,H,W], or [N,H,W,C] when attribute ``channels_last`` is 1. All tensors are float,
or all float16 (:func:`kernels` says which provider has which; float16 arithmetic is in float).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any

from ops.layout import to_channels_last
from ops.node import OP_DOMAIN, OP_TYPE, OP_VERSION, make_node, opset_import
from ops.reference import numpy_reference

__all__ = [
    "LIBRARY_ENV",
    "LIBRARY_NAME",
    "OP_DOMAIN",
    "OP_TYPE",
    "OP_VERSION",
    "OpsLibraryError",
    "build_info",
    "has_fp16_kernel",
    "kernels",
    "library_path",
    "make_node",
    "numpy_reference",
    "opset_import",
    "providers",
    "register",
    "to_channels_last",
]

LIBRARY_NAME = "libseresnet_ops.so"
LIBRARY_ENV = "SERESNET_OPS_LIBRARY"
DISTRIBUTION = "seresnet-serve"

_HOW_TO_BUILD = (
    "build it with `pip install .` (or `make test`) from the repository root, "
    f"or point {LIBRARY_ENV} at a built {LIBRARY_NAME}"
)


class OpsLibraryError(RuntimeError):
    """The custom-op library is missing, cannot be loaded, or does not fit this runtime."""


def library_path() -> Path:
    """Path of the built ``libseresnet_ops.so``.

    Looked up in order: the ``SERESNET_OPS_LIBRARY`` environment variable; next to this
    package (an installed wheel, or an in-place build); the files of the installed
    ``seresnet-serve`` distribution (tests run from the source tree import this folder, while
    the library sits in site-packages). Raises :class:`OpsLibraryError` when none exists.
    """
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise OpsLibraryError(f"{LIBRARY_ENV}={explicit} is not a file; {_HOW_TO_BUILD}")
        return path.resolve()
    beside = Path(__file__).with_name(LIBRARY_NAME)
    if beside.is_file():
        return beside
    installed = _installed_library()
    if installed is not None:
        return installed
    raise OpsLibraryError(
        f"{LIBRARY_NAME} not found (looked in {beside.parent} and in the installed "
        f"{DISTRIBUTION} distribution); {_HOW_TO_BUILD}"
    )


def _installed_library() -> Path | None:
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == LIBRARY_NAME and entry.parent.name == "ops":
            path = Path(str(entry.locate()))
            if path.is_file():
                return path.resolve()
    return None


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> ctypes.CDLL:
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise OpsLibraryError(f"cannot load {path}: {error}; {_HOW_TO_BUILD}") from error
    for name in ("SeresnetOpsProviders", "SeresnetOpsBuildInfo", "SeresnetOpsOrtApiVersion"):
        if not hasattr(library, name):
            raise OpsLibraryError(f"{path} is not a seresnet ops library (no {name}())")
    library.SeresnetOpsProviders.restype = ctypes.c_char_p
    library.SeresnetOpsBuildInfo.restype = ctypes.c_char_p
    library.SeresnetOpsOrtApiVersion.restype = ctypes.c_int
    return library


def providers() -> frozenset[str]:
    """Execution providers the built library has SqueezeExcitation kernels for.

    Asked of the library itself (a plain C function, no ONNX Runtime needed), so the answer
    describes the binary that ``register`` loads, e.g. ``{"CPUExecutionProvider"}`` for a
    build without nvcc.
    """
    raw: bytes = _load(library_path()).SeresnetOpsProviders()
    return frozenset(name for name in raw.decode().split(",") if name)


def kernels() -> frozenset[tuple[str, str]]:
    """(execution provider, element type) pairs the built library has kernels for, element type
    ``"float32"`` or ``"float16"``; every one of them takes the ``channels_last`` attribute.

    A library built before the float16 kernels (no ``SeresnetOpsKernels()``) has float32
    channels-first kernels only: it answers ``(provider, "float32")`` for each of its providers.
    """
    library = _load(library_path())
    query = getattr(library, "SeresnetOpsKernels", None)
    if query is None:
        return frozenset((provider, "float32") for provider in providers())
    query.restype = ctypes.c_char_p
    raw: bytes = query()
    pairs = (item.partition("/") for item in raw.decode().split(",") if item)
    return frozenset((provider, dtype) for provider, _, dtype in pairs)


def has_fp16_kernel(provider: str = "CUDAExecutionProvider") -> bool:
    """Whether the library can run a float16 graph's SqueezeExcitation nodes (including the
    ``channels_last`` form) on ``provider``: what the service asks before it chooses the float16
    model (``model.fp16.se.onnx``)."""
    return (provider, "float16") in kernels()


def build_info() -> dict[str, str]:
    """How the library was built: ``ort_api`` (header API version), ``cuda``,
    ``cuda_architectures`` (when built with CUDA) and ``compiler``."""
    raw: bytes = _load(library_path()).SeresnetOpsBuildInfo()
    pairs = (item.partition("=") for item in raw.decode().split(", ") if item)
    return {key: value for key, _, value in pairs}


def register(session_options: Any) -> None:
    """Register the library's custom ops with an ``onnxruntime.SessionOptions``.

    Raises :class:`OpsLibraryError` naming the cause: the library is missing, cannot be
    loaded, was built for a newer ONNX Runtime than the one installed, or ONNX Runtime
    refused it.
    """
    path = library_path()
    library = _load(path)
    import onnxruntime

    needed = int(library.SeresnetOpsOrtApiVersion())
    runtime = onnxruntime.__version__
    match = re.match(r"1\.(\d+)", runtime)
    if match and int(match.group(1)) < needed:
        raise OpsLibraryError(
            f"{path} was built against ONNX Runtime 1.{needed} headers and needs onnxruntime "
            f">= 1.{needed}; this environment has onnxruntime {runtime}"
        )
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as error:  # onnxruntime raises its own exception types
        raise OpsLibraryError(
            f"onnxruntime {runtime} refused {path}: {error}; rebuild it against this "
            f"environment ({_HOW_TO_BUILD})"
        ) from error
