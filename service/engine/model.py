"""The inference engine: one ONNX Runtime session over a model folder (docs/design.md §3, §4).

:meth:`Engine.load` reads the card, asks :mod:`~service.engine.policy` for the provider, the
graph (fused ``model.se.onnx`` or unfused ``model.onnx``) and the optimisation level, builds the
session with :mod:`~service.engine.session`, and picks a runner
(:mod:`~service.engine.runners`). It takes an :class:`EngineConfig`, not the service's
settings: the engine knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcard.schema import FP16_FUSED_FILE, FUSED_FILE, CardError, ModelCard, read_card
from service.engine.config import EngineConfig
from service.engine.policy import (
    PROVIDER_EP,
    CudaGraphsChoice,
    EngineError,
    Graph,
    OptLevel,
    PrecisionChoice,
    choose_cuda_graphs,
    choose_graph,
    choose_precision,
    choose_provider,
    cuda_device_count,
)
from service.engine.runners import BucketRunner, PlainRunner
from service.engine.session import OpsStatus, check_signature, make_session, probe_ops

log = logging.getLogger("service.engine")


@dataclass
class EngineInfo:
    """What was chosen and why: served by ``/v2/models/{name}`` and used as metric labels."""

    provider: str
    provider_reason: str
    graph: Graph
    graph_file: str
    opt_level: OptLevel
    reason: str
    ops: OpsStatus
    intra_op_threads: int
    batch_buckets: tuple[int, ...]
    warm_shapes: tuple[int, ...] = ()
    warmup_seconds: float | None = None
    session_providers: list[str] = field(default_factory=list)
    provider_options: dict[str, str] = field(default_factory=dict)
    tf32: bool | None = None  # CUDA only: TF32 convolutions and matmuls allowed
    precision: str = "fp32"
    precision_reason: str = ""
    cuda_graphs: bool = False
    cuda_graphs_reason: str = ""

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = self.ops.describe()
        return d


class Engine:
    """A loaded model: ``run(images)`` -> logits [n, num_classes] (one batch, one thread)."""

    def __init__(
        self,
        card: ModelCard,
        model_dir: Path,
        session: ort.InferenceSession,
        runner: PlainRunner | BucketRunner,
        info: EngineInfo,
    ) -> None:
        self.card = card
        self.model_dir = model_dir
        self.session = session
        self.info = info
        self._runner = runner
        self.input_dtype = np.dtype(card.input.dtype)
        self.sample_shape = (card.input.channels, card.input.height, card.input.width)

    @classmethod
    def load(
        cls, config: EngineConfig, ops_status: OpsStatus | None = None, gpu_count: int | None = None
    ) -> Engine:
        """Read the card, choose provider, graph, precision and CUDA graphs, build the session;
        no warm-up yet. A choice made by ``auto`` that fails to load falls back (float16 to
        float32, CUDA graphs off, fused to unfused) and says why; an explicit one is an
        error."""
        model_dir = Path(config.model_dir)
        try:
            card = read_card(model_dir)
        except CardError as e:
            raise EngineError(str(e)) from e
        if gpu_count is None:
            gpu_count = cuda_device_count() if config.provider != "cpu" else 0
        pchoice = choose_provider(config.provider, gpu_count, ort.get_available_providers())
        ops_status = ops_status or probe_ops()
        choice = choose_graph(
            pchoice.provider,
            ops_status.providers,
            (model_dir / FUSED_FILE).is_file(),
            config.graph,
            config.opt_level,
            ops_status.error,
        )
        precision = choose_precision(
            pchoice.provider,
            config.precision,
            choice.graph,
            card.float16 is not None and (model_dir / card.float16.file).is_file(),
            ops_status.fp16_cuda,
        )
        choice = replace(choice, precision=precision.precision)
        graphs = choose_cuda_graphs(pchoice.provider, config.cuda_graphs)
        session, provider_options = None, {}
        while session is None:
            try:
                session, provider_options = make_session(
                    model_dir, pchoice.provider, choice, config, graphs.enabled
                )
            except EngineError as e:
                # Fall back one auto choice at a time, the most exotic first.
                if choice.precision == "fp16" and config.precision == "auto":
                    precision = PrecisionChoice(
                        "fp32", f"auto: {FP16_FUSED_FILE} failed to load ({e})"
                    )
                    choice = replace(choice, precision="fp32")
                elif graphs.enabled and config.cuda_graphs == "auto":
                    graphs = CudaGraphsChoice(False, f"auto: capture impossible ({e})")
                elif choice.graph == "fused" and config.graph == "auto":
                    choice = choose_graph(
                        pchoice.provider,
                        frozenset(),
                        True,
                        "auto",
                        config.opt_level,
                        f"fused graph failed to load: {e}",
                    )
                else:
                    raise
                log.warning(
                    "falling back",
                    extra={
                        "cause": str(e),
                        "graph": choice.filename,
                        "cuda_graphs": graphs.enabled,
                    },
                )
        if choice.graph == "unfused" and config.graph == "auto":
            log.warning("serving the unfused graph", extra={"reason": choice.reason})
        input_name, output_name = check_signature(session, card, choice.filename)
        ep = PROVIDER_EP[pchoice.provider]
        if session.get_providers()[0] != ep:
            raise EngineError(
                f"{ep} did not initialise (session runs on "
                f"{session.get_providers()}); see onnxruntime's log above"
            )
        buckets = config.batch_buckets
        runner: PlainRunner | BucketRunner
        if pchoice.provider == "cuda":
            runner = BucketRunner(
                session,
                input_name,
                output_name,
                (card.input.channels, card.input.height, card.input.width),
                np.dtype(card.input.dtype),
                card.num_classes,
                buckets,
                "cuda",
                config.device_id,
                cuda_graphs=graphs.enabled,
            )
        else:
            runner = PlainRunner(session, input_name, output_name)
        info = EngineInfo(
            provider=pchoice.provider,
            provider_reason=pchoice.reason,
            graph=choice.graph,
            graph_file=choice.filename,
            opt_level=choice.opt_level,
            reason=choice.reason,
            ops=ops_status,
            intra_op_threads=config.intra_op_threads if pchoice.provider == "cpu" else 1,
            batch_buckets=buckets,
            session_providers=session.get_providers(),
            provider_options=provider_options,
            tf32=provider_options.get("use_tf32") == "1" if pchoice.provider == "cuda" else None,
            precision=choice.precision,
            precision_reason=precision.reason,
            cuda_graphs=graphs.enabled,
            cuda_graphs_reason=graphs.reason,
        )
        log.info(
            "engine loaded",
            extra={
                "model": card.name,
                "version": card.version,
                "provider": info.provider,
                "graph": info.graph,
                "graph_file": info.graph_file,
                "opt_level": info.opt_level,
                "reason": info.reason,
                "provider_reason": info.provider_reason,
                "precision": info.precision,
                "cuda_graphs": info.cuda_graphs,
            },
        )
        return cls(card, model_dir, session, runner, info)

    def warm_up(self, rounds: int = 1) -> float:
        """Run every batch shape ``rounds`` times; returns the seconds it took."""
        t0 = time.perf_counter()
        shapes = self._runner.warm_shapes(self.info.batch_buckets)
        blank = np.zeros(self.sample_shape, dtype=self.input_dtype)
        for b in shapes:
            for _ in range(rounds):
                self.run([blank] * b)
        seconds = time.perf_counter() - t0
        self.info.warm_shapes = tuple(shapes)
        self.info.warmup_seconds = round(seconds, 4)
        log.info(
            "warm-up complete",
            extra={"shapes": list(shapes), "rounds": rounds, "seconds": round(seconds, 3)},
        )
        return seconds

    def run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Logits [len(images), num_classes] for preprocessed [C, H, W] arrays."""
        if not images:
            raise ValueError("run() needs at least one image")
        return self._runner.run(images)
