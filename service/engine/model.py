"""The inference engine: one ONNX Runtime session over a model folder (docs/design.md §3, §4).

:meth:`Engine.load` reads the card and asks :mod:`~service.engine.plan` what to try (provider,
graph file, precision, layout, CUDA graphs; the single choices live in
:mod:`~service.engine.policy`); the engine builds that session with
:mod:`~service.engine.session`, falls back on the cause when it fails, and picks a runner
(:mod:`~service.engine.runners`). It takes an :class:`EngineConfig`, not the service's
settings: the engine knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcard.cpu import cpu_int8_isa
from modelcard.schema import FUSED_FILE, INT8_FUSED_FILE, CardError, ModelCard, read_card
from service.engine.config import EngineConfig
from service.engine.plan import EnginePlan, FolderFacts, fall_back, plan_engine
from service.engine.policy import (
    PROVIDER_EP,
    EngineError,
    Graph,
    Int8Offer,
    OptLevel,
    cuda_device_count,
)
from service.engine.runners import BucketRunner, PlainRunner
from service.engine.session import (
    LoadError,
    OpsStatus,
    check_signature,
    make_session,
    probe_ops,
)

log = logging.getLogger("service.engine")

# ORT's CPU threads when not set: a lone image is timed on one thread and on every core
# (two untimed runs, then up to TRIAL_RUNS timed ones within TRIAL_S), the pool's threads
# sleeping between operators. More threads are kept only when they are at least MIN_GAIN
# times faster: the cores they take are the ingress workers' (HTTP, decode), and a small model
# loses more to waking ORT's pool per operator than it gains by splitting the work. A model
# heavy enough to split then runs with the pool spinning between operators, which saves the
# wake-ups (SE-ResNet-50 on two cores: 38-40 -> 35-37 ms a lone image); timed with spinning,
# the small model would win as well, and burn a core the workers need under load.
TRIAL_RUNS = 15
TRIAL_S = 0.5
MIN_GAIN = 1.1


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str
    spinning: bool = False


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
    intra_op_reason: str = ""
    intra_op_spinning: bool = False
    warm_shapes: tuple[int, ...] = ()
    warmup_seconds: float | None = None
    session_providers: list[str] = field(default_factory=list)
    provider_options: dict[str, str] = field(default_factory=dict)
    tf32: bool | None = None  # CUDA only: TF32 convolutions and matmuls allowed
    precision: str = "fp32"
    precision_reason: str = ""
    cuda_graphs: bool = False
    cuda_graphs_reason: str = ""
    layout: str = "nchw"
    layout_reason: str = ""
    fallbacks: list[str] = field(default_factory=list)  # what was given up at load, and why

    @classmethod
    def of(
        cls,
        plan: EnginePlan,
        session: ort.InferenceSession,
        provider_options: dict[str, str],
        ops: OpsStatus,
        config: EngineConfig,
        threads: Threads,
    ) -> EngineInfo:
        """What ``plan`` became once its session was built."""
        choice, provider = plan.graph, plan.provider.provider
        return cls(
            provider=provider,
            provider_reason=plan.provider.reason,
            graph=choice.graph,
            graph_file=choice.filename,
            opt_level=choice.opt_level,
            reason=choice.reason,
            ops=ops,
            intra_op_threads=threads.count,
            intra_op_reason=threads.reason,
            intra_op_spinning=threads.spinning,
            batch_buckets=config.batch_buckets,
            session_providers=session.get_providers(),
            provider_options=provider_options,
            tf32=provider_options.get("use_tf32") == "1" if provider == "cuda" else None,
            precision=choice.precision,
            precision_reason=plan.precision.reason,
            cuda_graphs=plan.cuda_graphs.enabled,
            cuda_graphs_reason=plan.cuda_graphs.reason,
            layout=plan.layout.layout,
            layout_reason=plan.layout.reason,
            fallbacks=list(plan.fallbacks),
        )

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = self.ops.describe()
        return d


def pick_threads(one_ms: float, many_ms: float, cores: int) -> Threads:
    """One thread, or every core with the pool spinning: from the times of a lone image on
    one thread and on ``cores`` (pool sleeping), see MIN_GAIN."""
    reason = (
        f"measured: a lone image takes {one_ms:.2f} ms on one thread, {many_ms:.2f} ms on {cores}"
    )
    if many_ms * MIN_GAIN > one_ms:
        return Threads(1, reason)
    return Threads(cores, f"{reason}; spinning between operators", spinning=True)


def folder_facts(model_dir: Path, card: ModelCard, precision: str) -> FolderFacts:
    """What ``model_dir`` offers the plan. A benchmark-only folder keeps a float16 file that
    export's parity gate did not pass (``float16.parity_gated: false``): it is served when
    ``SERESNET_PRECISION=fp16`` asks for it by name, never by ``auto``; the int8 file likewise
    (``int8.parity_gated``), and only the card's int8 entry vouches for ``model.int8.se.onnx``."""
    fp16, int8 = card.float16, card.int8
    return FolderFacts(
        int8=Int8Offer(present=(model_dir / INT8_FUSED_FILE).is_file())
        if int8 is None
        else Int8Offer(
            present=(model_dir / int8.file).is_file(),
            listed=True,
            vouched=int8.parity_gated,
            speedup=int8.cpu_speedup_vs_fp32,
            card_isa=int8.cpu_int8_isa,
            here_isa=cpu_int8_isa(),
        ),
        fused_present=(model_dir / FUSED_FILE).is_file(),
        fp16_present=fp16 is not None
        and (model_dir / fp16.file).is_file()
        and (fp16.parity_gated or precision == "fp16"),
    )


class Engine:
    """A loaded model: ``run(images)`` -> logits [n, num_classes] (one batch, one thread)."""

    @classmethod
    def load(
        cls, config: EngineConfig, ops_status: OpsStatus | None = None, gpu_count: int | None = None
    ) -> Engine:
        """Read the card, plan provider, graph, precision, layout and CUDA graphs
        (:func:`~service.engine.plan.plan_engine`), and build the session, falling back on
        the cause of a failure (:func:`~service.engine.plan.fall_back`); no warm-up yet."""
        model_dir = Path(config.model_dir)
        try:
            card = read_card(model_dir)
        except CardError as e:
            raise EngineError(str(e)) from e
        if gpu_count is None:
            gpu_count = cuda_device_count() if config.provider != "cpu" else 0
        ops_status = ops_status or probe_ops()
        folder = folder_facts(model_dir, card, config.precision)
        plan = plan_engine(
            config,
            gpu_count=gpu_count,
            ort_providers=ort.get_available_providers(),
            ops=ops_status,
            folder=folder,
        )
        engine = cls(card, model_dir, config, ops_status, plan)
        return engine

    def __init__(
        self,
        card: ModelCard,
        model_dir: Path,
        config: EngineConfig,
        ops_status: OpsStatus,
        plan: EnginePlan,
    ) -> None:
        self.card = card
        self.model_dir = model_dir
        self.config = config
        self.ops_status = ops_status
        self.input_dtype = np.dtype(card.input.dtype)
        self.sample_shape = card.input.shape
        self.warm_thread: int | None = None  # the thread warm_up ran on
        self._build(plan)

    def _build(self, plan: EnginePlan) -> None:
        """Build the session of ``plan``, or of the plans fall_back gives for each failure."""
        while True:
            try:
                session, provider_options, threads = self._make_session(plan)
                break
            except LoadError as e:
                plan = fall_back(plan, e.cause, e.detail, self.config)
                log.warning(
                    "falling back",
                    extra={
                        "cause": e.cause,
                        "detail": e.detail,
                        "graph": plan.filename,
                        "cuda_graphs": plan.cuda_graphs.enabled,
                    },
                )
        self._adopt(plan, session, provider_options, threads)

    def _make_session(
        self, plan: EnginePlan
    ) -> tuple[ort.InferenceSession, dict[str, str], Threads]:
        """The session of ``plan`` with its intra-op thread count: as configured, else the
        faster of one thread and every core at a lone image (CPU only; CUDA runs on one)."""
        config = self.config
        if plan.provider.provider != "cpu":
            threads = Threads(1, "the GPU runs the model")
        elif config.intra_op_threads:
            threads = Threads(config.intra_op_threads, "as configured")
        elif config.cpu_cores < 2:
            threads = Threads(1, "one core")
        else:
            return self._measured_threads(plan, config.cpu_cores)
        session, options = make_session(
            self.model_dir, plan, replace(config, intra_op_threads=threads.count)
        )
        return session, options, threads

    def _measured_threads(
        self, plan: EnginePlan, cores: int
    ) -> tuple[ort.InferenceSession, dict[str, str], Threads]:
        built = {
            n: make_session(self.model_dir, plan, replace(self.config, intra_op_threads=n))
            for n in (cores, 1)
        }
        # A card that disagrees with the graph is refused before anything runs on it.
        check_signature(built[1][0], self.card, plan.graph.filename)
        ms = {n: self._lone_image_ms(session) for n, (session, _) in built.items()}
        threads = pick_threads(ms[1], ms[cores], cores)
        if threads.count == 1:
            session, options = built[1]
        else:
            built.clear()
            session, options = make_session(
                self.model_dir,
                plan,
                replace(self.config, intra_op_threads=cores, intra_op_spinning=threads.spinning),
            )
        log.info(
            "intra-op threads",
            extra={
                "threads": threads.count,
                "spinning": threads.spinning,
                "reason": threads.reason,
            },
        )
        return session, options, threads

    def _lone_image_ms(self, session: ort.InferenceSession) -> float:
        feed = {session.get_inputs()[0].name: np.zeros((1, *self.sample_shape), self.input_dtype)}
        for _ in range(2):
            session.run(None, feed)
        times: list[float] = []
        stop = time.perf_counter() + TRIAL_S
        while len(times) < TRIAL_RUNS and (len(times) < 3 or time.perf_counter() < stop):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    def _adopt(
        self,
        plan: EnginePlan,
        session: ort.InferenceSession,
        provider_options: dict[str, str],
        threads: Threads,
    ) -> None:
        card, config, choice = self.card, self.config, plan.graph
        if choice.graph == "unfused" and config.graph == "auto":
            log.warning("serving the unfused graph", extra={"reason": choice.reason})
        input_name, output_name = check_signature(session, card, choice.filename)
        provider = plan.provider.provider
        ep = PROVIDER_EP[provider]
        if session.get_providers()[0] != ep:
            raise EngineError(
                f"{ep} did not initialise (session runs on "
                f"{session.get_providers()}); see onnxruntime's log above"
            )
        self.plan = plan
        self.session = session
        self._runner = self._make_runner(plan, session, input_name, output_name)
        self.info = EngineInfo.of(plan, session, provider_options, self.ops_status, config, threads)
        log.info(
            "engine loaded",
            extra={
                "model": card.name,
                "version": card.version,
                "provider": provider,
                "graph": choice.graph,
                "graph_file": choice.filename,
                "opt_level": choice.opt_level,
                "reason": choice.reason,
                "provider_reason": plan.provider.reason,
                "precision": choice.precision,
                "layout": plan.layout.layout,
                "cuda_graphs": plan.cuda_graphs.enabled,
                "intra_op_threads": threads.count,
                "fallbacks": list(plan.fallbacks),
            },
        )

    def _make_runner(
        self, plan: EnginePlan, session: ort.InferenceSession, input_name: str, output_name: str
    ) -> PlainRunner | BucketRunner:
        """CUDA runs fixed bucket shapes on bound device buffers (what CUDA graphs need); the
        CPU runs each batch as it comes."""
        if plan.provider.provider != "cuda":
            return PlainRunner(session, input_name, output_name)
        return BucketRunner(
            session,
            input_name,
            output_name,
            self.sample_shape,
            self.input_dtype,
            self.card.num_classes,
            self.config.batch_buckets,
            "cuda",
            self.config.device_id,
            cuda_graphs=plan.cuda_graphs.enabled,
        )

    def warm_up(self, rounds: int = 1) -> float:
        """Run every batch shape ``rounds`` times; returns the seconds it took. Call it on the
        thread that will run the batches: ORT's CUDA provider keeps captured graphs per
        thread. A failure while CUDA graphs are on turns them off (when auto chose them) and
        warms the new session up instead of failing the engine."""
        t0 = time.perf_counter()
        while True:
            try:
                shapes = self._warm_shapes(rounds)
                break
            except Exception as e:  # any failure while capturing is the capture's
                if not self.plan.cuda_graphs.enabled:
                    raise
                detail = f"{type(e).__name__}: {e}"
                plan = fall_back(self.plan, "capture", detail, self.config)
                log.warning(
                    "CUDA graph capture failed; rebuilding without graphs",
                    extra={"cause": detail},
                )
                self._build(plan)
        seconds = time.perf_counter() - t0
        self.warm_thread = threading.get_ident()
        self.info.warm_shapes = tuple(shapes)
        self.info.warmup_seconds = round(seconds, 4)
        log.info(
            "warm-up complete",
            extra={"shapes": list(shapes), "rounds": rounds, "seconds": round(seconds, 3)},
        )
        return seconds

    def _warm_shapes(self, rounds: int) -> tuple[int, ...]:
        shapes = self._runner.warm_shapes(self.info.batch_buckets)
        blank = np.zeros(self.sample_shape, dtype=self.input_dtype)
        for b in shapes:
            for _ in range(rounds):
                self.run([blank] * b)
        return tuple(shapes)

    @property
    def runner(self) -> PlainRunner | BucketRunner:
        return self._runner

    def run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Logits [len(images), num_classes] for preprocessed [C, H, W] arrays."""
        if not images:
            raise ValueError("run() needs at least one image")
        return self._runner.run(images)
