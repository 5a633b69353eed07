"""Which execution provider, which graph (fused ``model.se.onnx``, its float16 variant
``model.fp16.se.onnx``, or ``model.onnx``), which optimisation level, and whether CUDA graphs
are captured, and why. The tables of providers and optimisation levels live here and nowhere
else; tune the auto policy from ``bench/`` results in one place.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import onnxruntime as ort

from modelcard.schema import FP16_FUSED_FILE, FUSED_FILE, UNFUSED_FILE

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
PROVIDER_EP = {"cpu": CPU_EP, "cuda": CUDA_EP}
OPT_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_DTYPE = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}

Graph = Literal["fused", "unfused"]
OptLevel = Literal["basic", "extended", "all"]
Precision = Literal["fp32", "fp16"]


class EngineError(RuntimeError):
    """The model cannot be served as configured; the message names the cause."""


def cuda_device_count() -> int:
    """GPUs the CUDA driver can see (0 without a driver). onnxruntime-gpu lists the CUDA EP as
    available whether or not a GPU exists, so ask the driver itself."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return count.value


@dataclass(frozen=True)
class ProviderChoice:
    provider: Literal["cpu", "cuda"]
    reason: str


def choose_provider(requested: str, gpu_count: int, ort_providers: Sequence[str]) -> ProviderChoice:
    """``auto`` means CUDA when onnxruntime has the CUDA EP *and* the driver sees a GPU."""
    has_ep = CUDA_EP in ort_providers
    if requested == "cpu":
        return ProviderChoice("cpu", "SERESNET_PROVIDER=cpu")
    if requested == "cuda":
        if not has_ep:
            raise EngineError(
                "SERESNET_PROVIDER=cuda but this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu)"
            )
        if gpu_count < 1:
            raise EngineError("SERESNET_PROVIDER=cuda but the CUDA driver sees no GPU")
        return ProviderChoice("cuda", "SERESNET_PROVIDER=cuda")
    if requested != "auto":
        raise EngineError(f"unknown provider {requested!r} (auto, cuda or cpu)")
    if has_ep and gpu_count > 0:
        return ProviderChoice("cuda", f"auto: CUDA provider and {gpu_count} GPU(s) visible")
    why = "onnxruntime has no CUDA provider" if not has_ep else "no GPU visible to the driver"
    return ProviderChoice("cpu", f"auto: {why}")


@dataclass(frozen=True)
class GraphChoice:
    graph: Graph
    opt_level: OptLevel
    reason: str
    precision: Precision = "fp32"

    @property
    def filename(self) -> str:
        if self.graph == "fused":
            return FP16_FUSED_FILE if self.precision == "fp16" else FUSED_FILE
        return UNFUSED_FILE


def choose_graph(
    provider: str,
    library_providers: frozenset[str],
    fused_present: bool,
    graph: str = "auto",
    opt_level: str = "auto",
    library_error: str | None = None,
) -> GraphChoice:
    """Fused or unfused graph, and the optimisation level, for ``provider`` (cpu|cuda).

    ``library_providers`` are the execution providers the built op library has kernels for
    (empty when it did not load: ``library_error`` says why). An explicit ``graph="fused"``
    that cannot be honoured is an error; ``auto`` falls back to the unfused graph and says why.

    The auto policy (tune it here from ``bench/`` results): use the fused graph whenever the
    library covers the provider, at ``all``. Measured on the CPU provider
    (bench/results/fusion_cpu.json, SE-ResNet-50 at 224, 2 cores): fused@all is the fastest
    SE-ResNet-50 at batch 1 and 8 (44.4 / 356 ms; unfused@all 45.6 / 364; fused@extended
    56.1 / 429): the NCHWc Reorders around the custom op cost less than NCHWc saves elsewhere.
    On CUDA the layout transforms do not apply and ``all`` is the default anyway.
    """
    ep = PROVIDER_EP[provider]
    covered = ep in library_providers
    if not fused_present:
        missing = f"the model folder has no {FUSED_FILE}"
    elif library_error:
        missing = f"op library unavailable ({library_error})"
    elif not covered:
        have = ", ".join(sorted(library_providers)) or "none"
        missing = f"op library has no {ep} kernel (has: {have})"
    else:
        missing = ""

    if graph == "fused":
        if missing:
            raise EngineError(f"SERESNET_GRAPH=fused but {missing}")
        chosen: Graph = "fused"
        why = "SERESNET_GRAPH=fused"
    elif graph == "unfused":
        chosen, why = "unfused", "SERESNET_GRAPH=unfused"
    elif graph == "auto":
        if missing:
            chosen, why = "unfused", f"auto: {missing}"
        else:
            chosen, why = "fused", f"auto: op library has a {ep} kernel"
    else:
        raise EngineError(f"unknown graph {graph!r} (auto, fused or unfused)")

    if opt_level != "auto":
        if opt_level not in OPT_LEVELS:
            raise EngineError(f"unknown optimisation level {opt_level!r}")
        level: OptLevel = opt_level  # type: ignore[assignment]
        why += f"; SERESNET_OPT_LEVEL={opt_level}"
    elif provider == "cpu":
        level = "all"
        why += "; opt level all (fastest for fused and unfused, bench/results/fusion_cpu.json)"
    else:
        level = "all"
        why += "; opt level all"
    return GraphChoice(chosen, level, why)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str


def choose_precision(
    provider: str, requested: str, graph: Graph, fp16_present: bool, fp16_kernel: bool
) -> PrecisionChoice:
    """``auto``: float16 on CUDA when the folder has ``model.fp16.se.onnx``, the fused graph is
    served and the op library has the float16 CUDA kernel; else float32. An explicit ``fp16``
    that cannot be honoured is an error."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "SERESNET_PRECISION=fp32")
    if requested not in ("auto", "fp16"):
        raise EngineError(f"unknown precision {requested!r} (auto, fp32 or fp16)")
    missing = ""
    if provider != "cuda":
        missing = "float16 runs on CUDA only (ONNX Runtime's CPU provider lacks fp16 convs)"
    elif graph != "fused":
        missing = "the float16 variant is a fused graph, and the unfused one is served"
    elif not fp16_present:
        missing = f"the model folder has no {FP16_FUSED_FILE}"
    elif not fp16_kernel:
        missing = "the op library has no float16 CUDA kernel"
    if requested == "fp16":
        if missing:
            raise EngineError(f"SERESNET_PRECISION=fp16 but {missing}")
        return PrecisionChoice("fp16", "SERESNET_PRECISION=fp16")
    if missing:
        return PrecisionChoice("fp32", f"auto: {missing}")
    return PrecisionChoice("fp16", f"auto: {FP16_FUSED_FILE} and the float16 CUDA kernel")


@dataclass(frozen=True)
class CudaGraphsChoice:
    enabled: bool
    reason: str


def choose_cuda_graphs(provider: str, requested: str) -> CudaGraphsChoice:
    """``auto``: on for CUDA (one graph per batch bucket, captured at warm-up: a launch-bound
    batch of 1 is mostly kernel launches), off elsewhere."""
    if requested == "off":
        return CudaGraphsChoice(False, "SERESNET_CUDA_GRAPHS=off")
    if requested not in ("auto", "on"):
        raise EngineError(f"unknown CUDA graphs setting {requested!r} (auto, on or off)")
    if provider != "cuda":
        if requested == "on":
            raise EngineError("SERESNET_CUDA_GRAPHS=on but the provider is not CUDA")
        return CudaGraphsChoice(False, "auto: not on CUDA")
    if requested == "on":
        return CudaGraphsChoice(True, "SERESNET_CUDA_GRAPHS=on")
    return CudaGraphsChoice(True, "auto: CUDA, one graph per batch bucket")
