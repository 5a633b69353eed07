"""Which execution provider, which graph (fused ``model.se.onnx``, its float16 variant
``model.fp16.se.onnx``, its int8 variant ``model.int8.se.onnx``, or ``model.onnx``), which
optimisation level, and whether CUDA graphs are captured, and why. The tables of providers
and optimisation levels live here and nowhere else; tune the auto policy from ``bench/``
results in one place.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import onnxruntime as ort

from modelcard.schema import FP16_FUSED_FILE, FUSED_FILE, INT8_FUSED_FILE, UNFUSED_FILE

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
PROVIDER_EP = {"cpu": CPU_EP, "cuda": CUDA_EP}
OPT_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

Graph = Literal["fused", "unfused"]
OptLevel = Literal["basic", "extended", "all"]
Precision = Literal["fp32", "fp16", "int8"]
PRECISION_FILE: dict[Precision, str] = {
    "fp32": FUSED_FILE,
    "fp16": FP16_FUSED_FILE,
    "int8": INT8_FUSED_FILE,
}
# auto serves int8 on the CPU only when the card's timing says it is at least this much faster.
MIN_INT8_SPEEDUP = 1.1


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
        return PRECISION_FILE[self.precision] if self.graph == "fused" else UNFUSED_FILE


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


@dataclass(frozen=True)
class Int8Offer:
    """What the model folder and this CPU say about ``model.int8.se.onnx``."""

    present: bool = False  # the file exists
    listed: bool = False  # the card has an int8 entry (export writes one past its gate)
    vouched: bool = False  # export's accuracy gate passed it (parity_gated)
    speedup: float | None = None  # the card's CPU timing, int8 vs float32
    card_isa: str | None = None  # the int8 instructions of the CPU that timed it
    here_isa: str | None = None  # ... and of this CPU


def _int8_choice(
    provider: str, requested: str, graph: Graph, offer: Int8Offer
) -> PrecisionChoice | None:
    """int8 when asked for (or error), or when auto may pick it; None leaves it to the rest.

    auto trusts the export's timing rather than timing both graphs at warm-up: a timing on a
    loaded box at start-up is noise, and the same card then serves the same graph on every
    replica. The timing carries over only to a CPU with the same int8 instructions (without
    VNNI, u8 x s8 convolutions lose most of their advantage), so a different CPU means fp32
    unless ``SERESNET_PRECISION=int8`` says otherwise."""
    missing = ""
    if provider != "cpu":
        missing = "int8 is served on the CPU provider only"
    elif graph != "fused":
        missing = "the int8 variant is a fused graph, and the unfused one is served"
    elif not offer.listed:
        missing = (
            f"the card (model.json) has no int8 entry: export writes {INT8_FUSED_FILE} and "
            "that entry only when the int8 graph passes its accuracy gate (re-export the "
            "folder, or serve fp32)"
        )
    elif not offer.present:
        missing = f"the model folder has no {INT8_FUSED_FILE}, which its card lists"
    elif requested == "int8":
        return PrecisionChoice("int8", "SERESNET_PRECISION=int8")
    if requested == "int8":
        raise EngineError(f"SERESNET_PRECISION=int8 but {missing}")
    if requested != "auto" or provider != "cpu" or missing:
        return None
    if not offer.vouched:
        return PrecisionChoice(
            "fp32", "auto: the int8 graph is benchmark-only (parity_gated false)"
        )
    if offer.speedup is None or offer.speedup < MIN_INT8_SPEEDUP:
        return PrecisionChoice(
            "fp32", f"auto: int8 measured {offer.speedup}x float32 (< {MIN_INT8_SPEEDUP}x)"
        )
    if offer.card_isa != offer.here_isa:
        return PrecisionChoice(
            "fp32",
            f"auto: int8 was timed on a CPU with {offer.card_isa}, this one has {offer.here_isa}",
        )
    return PrecisionChoice(
        "int8",
        f"auto: {INT8_FUSED_FILE} passed the accuracy gate and ran {offer.speedup:.2f}x float32 "
        f"on a CPU with {offer.card_isa}, as this one",
    )


def choose_precision(
    provider: str,
    requested: str,
    graph: Graph,
    fp16_present: bool,
    fp16_kernel: bool,
    int8: Int8Offer | None = None,
) -> PrecisionChoice:
    """``auto``: float16 on CUDA when the folder has ``model.fp16.se.onnx``, the fused graph is
    served and the op library has the float16 CUDA kernel; int8 on the CPU when the folder has
    a vouched ``model.int8.se.onnx`` measured faster (:func:`_int8_choice`); else float32. An
    explicit ``fp16`` or ``int8`` that cannot be honoured is an error."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "SERESNET_PRECISION=fp32")
    if requested not in ("auto", "fp16", "int8"):
        raise EngineError(f"unknown precision {requested!r} (auto, fp32, fp16 or int8)")
    if requested in ("auto", "int8"):
        choice = _int8_choice(provider, requested, graph, int8 or Int8Offer())
        if choice is not None:
            return choice
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
