"""NumPy reference of the SqueezeExcitation op: the ground truth kernels and fusions are
tested against. Computes in float64 and returns float32, or float16 for float16 inputs."""

from __future__ import annotations

import numpy as np


def numpy_reference(
    x: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    residual: np.ndarray | None = None,
    relu: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """``y = x * sigmoid(w2 · relu(w1 · mean_hw(x) + b1) + b2)`` per (n, c), then
    ``+ residual`` when given and ``max(y, 0)`` when ``relu``.

    Shapes: x [N,C,H,W] ([N,H,W,C] when ``channels_last``), w1 [Cr,C], b1 [Cr], w2 [C,Cr],
    b2 [C], residual like x. float16 inputs are the float16 op's semantics: the exact values of
    the (rounded) inputs, computed exactly, rounded once to float16 at the end.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D, got shape {x.shape}")
    out_dtype = np.float16 if x.dtype == np.float16 else np.float32
    if channels_last:
        to_first = (0, 3, 1, 2)
        y = numpy_reference(
            x.transpose(to_first),
            w1,
            b1,
            w2,
            b2,
            None if residual is None else residual.transpose(to_first),
            relu,
        )
        return np.ascontiguousarray(y.transpose(0, 2, 3, 1))
    c = x.shape[1]
    cr = w1.shape[0]
    expected = {"w1": (cr, c), "b1": (cr,), "w2": (c, cr), "b2": (c,)}
    for name, array in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items():
        if array.shape != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {array.shape}")
    x64 = x.astype(np.float64)
    pooled = x64.mean(axis=(2, 3))  # [N, C]
    hidden = np.maximum(pooled @ w1.astype(np.float64).T + b1, 0.0)  # [N, Cr]
    logits = hidden @ w2.astype(np.float64).T + b2  # [N, C]
    gate = 1.0 / (1.0 + np.exp(-logits))
    y = x64 * gate[:, :, None, None]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {x.shape}, got {residual.shape}")
        y = y + residual
    if relu:
        y = np.maximum(y, 0.0)
    return y.astype(out_dtype)
