"""What the reduced-precision variants of the fused graph (float16, int8) share: a CPU session
with the op library, their logits, and the gate that keeps a variant only when it answers as
float32 does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from export.errors import ExportError
from export.onnx_export import accuracy, run_onnx, session
from modelcard import InputSpec
from modelcard.schema import Float16, Int8

Entry = TypeVar("Entry", Float16, Int8)


def fused_session(path: Path) -> ort.InferenceSession:
    """A CPU session for a fused model, with the op library registered."""
    import ops

    so = ort.SessionOptions()
    try:
        ops.register(so)
    except ops.OpsLibraryError as e:
        raise ExportError(f"cannot check the fused model: {e}") from e
    return session(path, so=so)


def fused_logits(path: Path, pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Logits of a fused model (float32, float16 or int8 inside) on the CPU, 1000 images per
    run."""
    sess = fused_session(path)
    return np.concatenate(
        [run_onnx(sess, pixels[i : i + 1000], spec) for i in range(0, len(pixels), 1000)]
    )


def gate(
    entry: Entry,
    logits: np.ndarray,
    test: tuple[np.ndarray, np.ndarray, float] | None,
    *,
    path: Path,
    kind: str,
    problem: str | None,
    max_top1_delta: float,
    gated: bool,
    say: Callable[[str], object],
) -> Entry | None:
    """``entry`` with the variant's test accuracy when ``test`` is ``(pixels, labels, float32
    top-1)``; None (and ``path`` removed) when ``problem`` (found by the caller on its own
    measure) or the top-1 change exceeds ``max_top1_delta``. With ``gated=False``
    (benchmark-only folders) the file is kept and the entry says ``parity_gated: false``."""
    if test is not None:
        _, labels, fp32_top1 = test
        top1, top5 = accuracy(logits, labels)
        delta = top1 - fp32_top1
        entry = entry.model_copy(
            update={"test_top1": top1, "test_top5": top5, "test_top1_delta_vs_fp32": delta}
        )
        say(
            f"test accuracy of {path.name}: top-1 {top1:.2%} ({delta:+.2%} vs float32), "
            f"top-5 {top5:.2%}"
        )
        if abs(delta) > max_top1_delta:
            problem = f"test top-1 {delta:+.2%} vs float32 (limit {max_top1_delta:.1%})"
    if not gated:
        if problem is not None:
            say(f"{kind} variant kept for benchmarks only ({problem}): parity_gated false")
        return entry.model_copy(update={"parity_gated": False})
    if problem is not None:
        path.unlink()
        say(f"{kind} variant not written: {problem}")
        return None
    return entry
