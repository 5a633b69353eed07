"""What the engine tries, in order: :func:`plan_engine` turns the settings and the facts of
this machine and model folder into one :class:`EnginePlan` (provider, graph file, precision,
layout, CUDA graphs), and :func:`fall_back` gives the next plan when building or warming a
session fails, chosen by the *cause* of the failure. Both are pure: no session, no GPU.

The rules of :func:`fall_back`:

- only a choice that ``auto`` made is ever given up; when the fallback would give up an
  explicit setting, it raises :class:`~service.engine.policy.EngineError` naming the
  variable, so ``SERESNET_PRECISION=fp16`` never ends as unfused float32 without a word;
- the choice given up is the one the cause points at: a node left on the CPU or a failed
  capture turns CUDA graphs off (nothing else); a model file that does not load gives up its
  precision first (float16 -> float32, same fused graph), then the fused graph; an op library
  that cannot be registered gives up every fused file at once;
- a cause it does not know is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from service.engine.policy import (
    CudaGraphsChoice,
    EngineError,
    GraphChoice,
    Int8Offer,
    Precision,
    PrecisionChoice,
    ProviderChoice,
    choose_cuda_graphs,
    choose_graph,
    choose_precision,
    choose_provider,
)

if TYPE_CHECKING:
    from service.engine.config import EngineConfig
    from service.engine.session import OpsStatus

Cause = Literal[
    "op_library",  # the op library could not be registered with the session
    "model_file",  # the graph file is missing, invalid, or a node in it has no kernel
    "cpu_node",  # a node would run on the CPU, which CUDA graphs forbid
    "capture",  # capturing or replaying a CUDA graph failed (warm-up)
    "other",  # anything else: never a reason to degrade
]
Layout = Literal["nchw", "nhwc"]

# What auto gives up a precision for when its file cannot be loaded.
PRECISION_FALLBACK: dict[Precision, Precision] = {"fp16": "fp32", "int8": "fp32"}


@dataclass(frozen=True)
class LayoutChoice:
    layout: Layout
    reason: str


def choose_layout(provider: str, requested: str, precision: str) -> LayoutChoice:
    """``nhwc``: the float16 graph with channels-last SE nodes (``ops.to_channels_last``) on
    the CUDA provider with ``prefer_nhwc=1``, where ORT cancels the Transposes around them.
    ``auto`` is channels first: bench/results/fusion_cuda.json has not shown channels last
    faster for a served configuration; set ``SERESNET_CUDA_LAYOUT=nhwc`` to serve it."""
    if requested in ("auto", "nchw"):
        why = "SERESNET_CUDA_LAYOUT=nchw" if requested == "nchw" else "auto: channels first"
        return LayoutChoice("nchw", why)
    if requested != "nhwc":
        raise EngineError(f"unknown CUDA layout {requested!r} (auto, nchw or nhwc)")
    if provider != "cuda":
        raise EngineError("SERESNET_CUDA_LAYOUT=nhwc but the provider is not CUDA")
    if precision != "fp16":
        raise EngineError(
            f"SERESNET_CUDA_LAYOUT=nhwc but the precision is {precision} (channels last is "
            "served for the float16 graph only)"
        )
    return LayoutChoice("nhwc", "SERESNET_CUDA_LAYOUT=nhwc")


@dataclass(frozen=True)
class FolderFacts:
    """What the model folder holds that the plan depends on."""

    fused_present: bool
    fp16_present: bool  # the file exists and export's parity gate passed it
    int8: Int8Offer = field(default_factory=Int8Offer)


@dataclass(frozen=True)
class EnginePlan:
    provider: ProviderChoice
    graph: GraphChoice  # graph, optimisation level and precision (hence the file)
    precision: PrecisionChoice
    layout: LayoutChoice
    cuda_graphs: CudaGraphsChoice
    fallbacks: tuple[str, ...] = ()  # what was given up so far, and why

    @property
    def filename(self) -> str:
        return self.graph.filename


def plan_engine(
    config: EngineConfig,
    *,
    gpu_count: int,
    ort_providers: Sequence[str],
    ops: OpsStatus,
    folder: FolderFacts,
) -> EnginePlan:
    """The first configuration to try. Raises EngineError for a setting that cannot be
    honoured on this machine (the message names the variable)."""
    provider = choose_provider(config.provider, gpu_count, ort_providers)
    graph = choose_graph(
        provider.provider,
        ops.providers,
        folder.fused_present,
        config.graph,
        config.opt_level,
        ops.error,
    )
    precision = choose_precision(
        provider.provider,
        config.precision,
        graph.graph,
        folder.fp16_present,
        ops.fp16_cuda,
        folder.int8,
    )
    graph = replace(graph, precision=precision.precision)
    layout = choose_layout(provider.provider, config.cuda_layout, precision.precision)
    graphs = choose_cuda_graphs(provider.provider, config.cuda_graphs)
    return EnginePlan(provider, graph, precision, layout, graphs)


def _explicit(setting: str, value: str, plan: EnginePlan, detail: str) -> EngineError:
    return EngineError(f"SERESNET_{setting}={value} but {plan.filename} cannot be served: {detail}")


def fall_back(plan: EnginePlan, cause: Cause, detail: str, config: EngineConfig) -> EnginePlan:
    """The next plan after ``plan`` failed for ``cause`` (``detail``: ORT's message), or
    EngineError when nothing that auto chose can be given up for that cause."""
    note = f"{cause}: {detail}"
    if cause in ("cpu_node", "capture"):
        if not plan.cuda_graphs.enabled:
            raise EngineError(f"{plan.filename}: {detail}")
        if config.cuda_graphs != "auto":
            raise _explicit("CUDA_GRAPHS", config.cuda_graphs, plan, detail)
        why = "a node would run on the CPU" if cause == "cpu_node" else "capture failed"
        graphs = CudaGraphsChoice(False, f"auto: {why} ({detail})")
        return replace(plan, cuda_graphs=graphs, fallbacks=(*plan.fallbacks, note))
    if cause not in ("model_file", "op_library"):
        raise EngineError(f"cannot load {plan.filename}: {detail}")
    if plan.layout.layout == "nhwc":  # only ever explicit (auto is channels first)
        raise _explicit("CUDA_LAYOUT", "nhwc", plan, detail)
    precision = plan.graph.precision
    if precision in PRECISION_FALLBACK and cause == "model_file":
        if config.precision != "auto":
            raise _explicit("PRECISION", config.precision, plan, detail)
        lower = PRECISION_FALLBACK[precision]
        graph = replace(plan.graph, precision=lower)
        chosen = PrecisionChoice(lower, f"auto: {plan.filename} failed to load ({detail})")
        return replace(plan, graph=graph, precision=chosen, fallbacks=(*plan.fallbacks, note))
    if plan.graph.graph != "fused":
        raise EngineError(f"cannot load {plan.filename}: {detail}")
    # Every fused file needs the op library; the unfused graph is float32.
    if config.precision not in ("auto", "fp32"):
        raise _explicit("PRECISION", config.precision, plan, detail)
    if config.graph != "auto":
        raise _explicit("GRAPH", config.graph, plan, detail)
    graph = choose_graph(
        plan.provider.provider,
        frozenset(),
        True,
        "auto",
        config.opt_level,
        f"the fused graph failed to load ({detail})",
    )
    chosen = PrecisionChoice("fp32", "auto: the unfused graph is float32")
    return replace(plan, graph=graph, precision=chosen, fallbacks=(*plan.fallbacks, note))
