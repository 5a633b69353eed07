"""The inference engine: one ONNX Runtime session over a model folder (DESIGN.md §3, §4).

It picks the execution provider, the graph (fused ``model.se.onnx`` or unfused ``model.onnx``)
and the optimisation level, registers the custom-op library when the fused graph is used,
checks that the graph matches the model card, warms every batch shape up, and runs one batch
at a time. The provider/graph policy lives in :func:`choose_provider` and :func:`choose_graph`
so it can be tuned from benchmark results in one place.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from modelcard.schema import FUSED_FILE, UNFUSED_FILE, CardError, ModelCard, read_card
from service.settings import Settings

log = logging.getLogger("service.engine")

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


class EngineError(RuntimeError):
    """The model cannot be served as configured; the message names the cause."""


# --------------------------------------------------------------------------- policy


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
            raise EngineError("SERESNET_PROVIDER=cuda but this onnxruntime has no CUDA provider "
                              "(install onnxruntime-gpu)")
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

    @property
    def filename(self) -> str:
        return FUSED_FILE if self.graph == "fused" else UNFUSED_FILE


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


# --------------------------------------------------------------------------- op library


@dataclass(frozen=True)
class OpsStatus:
    """What the custom-op library offers in this process."""

    loaded: bool
    providers: frozenset[str] = frozenset()
    path: str | None = None
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = sorted(self.providers)
        return d


def probe_ops() -> OpsStatus:
    """Import ``ops`` and ask which providers its built library covers; never raises."""
    try:
        import ops
    except Exception as e:  # any import failure means "no fused graph"
        return OpsStatus(False, error=f"cannot import ops: {type(e).__name__}: {e}")
    try:
        path = str(ops.library_path())
        providers = frozenset(ops.providers())
    except Exception as e:  # reported, then the unfused graph is used
        return OpsStatus(False, error=f"{type(e).__name__}: {e}")
    return OpsStatus(True, providers, path)


def register_ops(options: ort.SessionOptions) -> None:
    import ops

    ops.register(options)


# --------------------------------------------------------------------------- runners


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (exact enough that ranking ties come from the logits)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` best (class id, probability) of one row, descending; ties keep class order;
    ``k`` is clamped to the number of classes."""
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


class PlainRunner:
    """``session.run`` with the exact batch: right for the CPU, where padding costs compute."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str) -> None:
        self._session = session
        self._input = input_name
        self._outputs = [output_name]

    def warm_shapes(self, buckets: Sequence[int]) -> tuple[int, ...]:
        # CPU kernels are shape-agnostic: one small and one full batch allocate the arena.
        return tuple(sorted({1, max(buckets)}))

    def run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack(images)
        return self._session.run(self._outputs, {self._input: batch})[0]


class BucketRunner:
    """I/O-bound runs over a fixed set of batch shapes (the CUDA path).

    Each bucket owns a host staging buffer, device input/output tensors and an IOBinding made
    once; a batch is padded up to the smallest bucket that holds it. Fixed shapes let cuDNN's
    algorithm search and the memory arena settle during warm-up, and binding skips ORT's
    per-run allocation and copies. Also correct on the CPU (device "cpu"), where tests run it.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        input_name: str,
        output_name: str,
        sample_shape: tuple[int, ...],
        dtype: np.dtype,
        num_classes: int,
        buckets: Sequence[int],
        device: str = "cuda",
        device_id: int = 0,
    ) -> None:
        self._session = session
        self._device = device
        self.buckets = tuple(sorted(set(buckets)))
        self._slots: dict[int, tuple[np.ndarray, ort.OrtValue, ort.OrtValue, Any]] = {}
        for b in self.buckets:
            host = np.zeros((b, *sample_shape), dtype=dtype)
            x = ort.OrtValue.ortvalue_from_numpy(host, device, device_id)
            y = ort.OrtValue.ortvalue_from_shape_and_type(
                [b, num_classes], np.float32, device, device_id
            )
            binding = session.io_binding()
            binding.bind_ortvalue_input(input_name, x)
            binding.bind_ortvalue_output(output_name, y)
            self._slots[b] = (host, x, y, binding)

    def warm_shapes(self, buckets: Sequence[int]) -> tuple[int, ...]:
        return self.buckets

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise EngineError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")

    def run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        n = len(images)
        host, x, y, binding = self._slots[self.bucket_for(n)]
        np.stack(images, out=host[:n])
        host[n:] = 0
        if self._device != "cpu":  # on the CPU the OrtValue already wraps ``host``
            x.update_inplace(host)
        self._session.run_with_iobinding(binding)
        return np.array(y.numpy()[:n], copy=True)


# --------------------------------------------------------------------------- engine


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

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = self.ops.describe()
        return d


class Engine:
    """A loaded model: ``run(images)`` -> logits [n, num_classes] (one batch, one thread)."""

    def __init__(self, card: ModelCard, model_dir: Path, session: ort.InferenceSession,
                 runner: PlainRunner | BucketRunner, info: EngineInfo) -> None:
        self.card = card
        self.model_dir = model_dir
        self.session = session
        self.info = info
        self._runner = runner
        self.input_dtype = np.dtype(card.input.dtype)
        self.sample_shape = (card.input.channels, card.input.height, card.input.width)

    @classmethod
    def load(cls, settings: Settings, ops_status: OpsStatus | None = None,
             gpu_count: int | None = None) -> Engine:
        """Read the card, choose provider and graph, build the session; no warm-up yet."""
        model_dir = Path(settings.model_dir)
        try:
            card = read_card(model_dir)
        except CardError as e:
            raise EngineError(str(e)) from e
        if gpu_count is None:
            gpu_count = cuda_device_count() if settings.provider != "cpu" else 0
        pchoice = choose_provider(settings.provider, gpu_count, ort.get_available_providers())
        ops_status = ops_status or probe_ops()
        choice = choose_graph(
            pchoice.provider, ops_status.providers, (model_dir / FUSED_FILE).is_file(),
            settings.graph, settings.opt_level, ops_status.error,
        )
        try:
            session, provider_options = _make_session(model_dir, pchoice.provider, choice, settings)
        except EngineError as e:
            if choice.graph == "fused" and settings.graph == "auto":
                # The library loaded but the fused graph does not: serve the unfused one.
                log.warning("fused graph failed to load, serving the unfused one",
                            extra={"cause": str(e)})
                choice = choose_graph(pchoice.provider, frozenset(), True, "auto",
                                      settings.opt_level, f"fused graph failed to load: {e}")
                session, provider_options = _make_session(model_dir, pchoice.provider, choice,
                                                          settings)
            else:
                raise
        if choice.graph == "unfused" and settings.graph == "auto":
            log.warning("serving the unfused graph", extra={"reason": choice.reason})
        input_name, output_name = _check_signature(session, card, choice.filename)
        ep = PROVIDER_EP[pchoice.provider]
        if session.get_providers()[0] != ep:
            raise EngineError(f"{ep} did not initialise (session runs on "
                              f"{session.get_providers()}); see onnxruntime's log above")
        buckets = settings.buckets()
        runner: PlainRunner | BucketRunner
        if pchoice.provider == "cuda":
            runner = BucketRunner(session, input_name, output_name,
                                  (card.input.channels, card.input.height, card.input.width),
                                  np.dtype(card.input.dtype), card.num_classes, buckets,
                                  "cuda", settings.device_id)
        else:
            runner = PlainRunner(session, input_name, output_name)
        info = EngineInfo(
            provider=pchoice.provider, provider_reason=pchoice.reason, graph=choice.graph,
            graph_file=choice.filename, opt_level=choice.opt_level, reason=choice.reason,
            ops=ops_status,
            intra_op_threads=settings.intra_threads() if pchoice.provider == "cpu" else 1,
            batch_buckets=buckets, session_providers=session.get_providers(),
            provider_options=provider_options,
        )
        log.info("engine loaded", extra={
            "model": card.name, "version": card.version, "provider": info.provider,
            "graph": info.graph, "opt_level": info.opt_level, "reason": info.reason,
            "provider_reason": info.provider_reason,
        })
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
        log.info("warm-up complete", extra={"shapes": list(shapes), "rounds": rounds,
                                            "seconds": round(seconds, 3)})
        return seconds

    def run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Logits [len(images), num_classes] for preprocessed [C, H, W] arrays."""
        if not images:
            raise ValueError("run() needs at least one image")
        return self._runner.run(images)


def _session_options(choice: GraphChoice, provider: str, settings: Settings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[choice.opt_level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if provider == "cpu":
        so.intra_op_num_threads = settings.intra_threads()
        # Spinning workers would burn the cores the decode threads need between batches.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        so.intra_op_num_threads = 1
    if choice.graph == "fused":
        try:
            register_ops(so)
        except Exception as e:  # reported with its cause
            raise EngineError(f"cannot register the op library: {type(e).__name__}: {e}") from e
    return so


def _cuda_options(settings: Settings) -> dict[str, str]:
    return {
        "device_id": str(settings.device_id),
        # Grow the arena by what is asked, not by doubling: memory does not ratchet up.
        "arena_extend_strategy": "kSameAsRequested",
        # Fixed, pre-warmed bucket shapes make an exhaustive search a one-off start-up cost.
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if settings.cuda_tf32 else "0",
    }


def _make_session(model_dir: Path, provider: str, choice: GraphChoice, settings: Settings,
                  ) -> tuple[ort.InferenceSession, dict[str, str]]:
    path = model_dir / choice.filename
    if not path.is_file():
        raise EngineError(f"{path} not found (a model folder needs {UNFUSED_FILE}, DESIGN.md §3)")
    so = _session_options(choice, provider, settings)
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        opts = _cuda_options(settings)
        providers: list[Any] = [(CUDA_EP, opts), CPU_EP]
    else:
        opts = {}
        providers = [CPU_EP]
    try:
        return ort.InferenceSession(str(path), so, providers=providers), opts
    except Exception as e:  # onnxruntime raises several unrelated types
        raise EngineError(f"cannot load {path}: {type(e).__name__}: {e}") from e


def _check_signature(session: ort.InferenceSession, card: ModelCard, filename: str,
                     ) -> tuple[str, str]:
    """The graph must take and give what the card says; else the card and model disagree."""
    spec = card.input
    inputs = session.get_inputs()
    by_name = {i.name: i for i in inputs}
    if spec.tensor not in by_name:
        raise EngineError(f"{filename}: no input named {spec.tensor!r} (model.json input.tensor);"
                          f" the graph has {sorted(by_name)}")
    inp = by_name[spec.tensor]
    if inp.type != _ORT_DTYPE[spec.dtype]:
        raise EngineError(f"{filename}: input {spec.tensor!r} is {inp.type}, but model.json says "
                          f"{spec.dtype}")
    expected = [spec.channels, spec.height, spec.width]
    dims = list(inp.shape)
    if len(dims) != 4 or any(isinstance(d, int) and d != e for d, e in zip(dims[1:], expected,
                                                                            strict=True)):
        raise EngineError(f"{filename}: input shape {dims} does not match model.json "
                          f"[N, {spec.channels}, {spec.height}, {spec.width}]")
    if isinstance(dims[0], int) and dims[0] != -1:
        raise EngineError(f"{filename}: the batch axis is fixed at {dims[0]}; export it dynamic")
    outputs = {o.name: o for o in session.get_outputs()}
    if card.output.logits not in outputs:
        raise EngineError(f"{filename}: no output named {card.output.logits!r} (model.json "
                          f"output.logits); the graph has {sorted(outputs)}")
    out = outputs[card.output.logits]
    last = out.shape[-1] if out.shape else None
    if isinstance(last, int) and last != card.num_classes:
        raise EngineError(f"{filename}: output has {last} classes, model.json says "
                          f"{card.num_classes}")
    return spec.tensor, card.output.logits
