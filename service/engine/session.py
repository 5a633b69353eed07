"""Building the ONNX Runtime session for an :class:`~service.engine.plan.EnginePlan`: the op
library, session options, the providers and their options, the cause of a failure (what
:func:`~service.engine.plan.fall_back` keys on), and the check that the graph matches the
model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from modelcard.schema import UNFUSED_FILE, ModelCard
from service.engine.policy import CPU_EP, CUDA_EP, OPT_LEVELS, EngineError, GraphChoice

if TYPE_CHECKING:
    from service.engine.config import EngineConfig
    from service.engine.plan import Cause, EnginePlan

_ORT_DTYPE = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


@dataclass(frozen=True)
class OpsStatus:
    """What the custom-op library offers in this process."""

    loaded: bool
    providers: frozenset[str] = frozenset()
    path: str | None = None
    error: str | None = None
    fp16_cuda: bool = False  # a float16 CUDA kernel: what model.fp16.se.onnx needs

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
        fp16 = bool(ops.has_fp16_kernel(CUDA_EP))
    except Exception as e:  # reported, then the unfused graph is used
        return OpsStatus(False, error=f"{type(e).__name__}: {e}")
    return OpsStatus(True, providers, path, fp16_cuda=fp16)


def register_ops(options: ort.SessionOptions) -> None:
    import ops

    ops.register(options)


def session_options(
    choice: GraphChoice, provider: str, config: EngineConfig, cuda_graphs: bool = False
) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[choice.opt_level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if provider == "cpu":
        so.intra_op_num_threads = config.intra_op_threads
        # Spinning threads would burn the cores the ingress workers need between batches,
        # unless the model is so heavy that the workers need little (Engine.load measures).
        spin = "1" if config.intra_op_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    else:
        so.intra_op_num_threads = 1
    if cuda_graphs and provider == "cuda":
        # A graph replays only what ran on the GPU: refuse to build a session that would
        # leave any node on the CPU instead of capturing an incomplete graph.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if choice.graph == "fused":
        try:
            register_ops(so)
        except Exception as e:  # reported with its cause
            raise EngineError(f"cannot register the op library: {type(e).__name__}: {e}") from e
    return so


class LoadError(EngineError):
    """A session could not be built; ``cause`` says which choice of the plan it points at."""

    def __init__(self, message: str, cause: Cause, detail: str) -> None:
        super().__init__(message)
        self.cause: Cause = cause
        self.detail = detail


# ONNX Runtime's messages, as of 1.31, for the failures a plan can do something about.
_CAUSES: tuple[tuple[str, Cause], ...] = (
    ("Conflicting session configuration", "other"),  # our own options contradict: a bug
    ("fallback to CPU EP has been explicitly disabled", "cpu_node"),
    ("assigned to the default CPU EP", "cpu_node"),
    ("Could not find an implementation", "model_file"),
    ("NOT_IMPLEMENTED", "model_file"),
    ("INVALID_PROTOBUF", "model_file"),
    ("INVALID_GRAPH", "model_file"),
    ("Load model from", "model_file"),
    ("No Op registered", "model_file"),
    ("Type Error", "model_file"),
)


def load_cause(message: str) -> Cause:
    """Which part of the plan an ONNX Runtime error at session creation points at."""
    for needle, cause in _CAUSES:
        if needle in message:
            return cause
    return "other"


def session_providers(
    provider: str, options: dict[str, str], cuda_graphs: bool
) -> list[str | tuple[str, dict[str, str]]]:
    """The providers to list, in order. With CUDA graphs the CPU provider is not listed:
    ``session.disable_cpu_ep_fallback`` with an explicit CPU provider is an INVALID_ARGUMENT
    ("Conflicting session configuration") at InferenceSession::Initialize, and ORT still adds
    the CPU provider itself for the shape computations it allows."""
    if provider != "cuda":
        return [CPU_EP]
    if cuda_graphs:
        return [(CUDA_EP, options)]
    return [(CUDA_EP, options), CPU_EP]


def cuda_options(
    config: EngineConfig, cuda_graphs: bool = False, prefer_nhwc: bool = False
) -> dict[str, str]:
    """CUDA provider options. TF32 is ONNX Runtime's (and PyTorch's) default and about twice
    the fp32 throughput on Ampere and Hopper; ``SERESNET_CUDA_TF32=0`` keeps exact fp32."""
    return {
        "device_id": str(config.device_id),
        # Grow the arena by what is asked, not by doubling: memory does not ratchet up.
        "arena_extend_strategy": "kSameAsRequested",
        # Fixed, pre-warmed bucket shapes make an exhaustive search a one-off start-up cost.
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if config.cuda_tf32 else "0",
        "enable_cuda_graph": "1" if cuda_graphs else "0",
        "prefer_nhwc": "1" if prefer_nhwc else "0",
    }


def _model_source(path: Path, channels_last: bool) -> str | bytes:
    """The file's path, or the bytes of its channels-last form (made in memory: the folder
    holds one float16 file, and the rewrite takes a fraction of a second)."""
    if not channels_last:
        return str(path)
    import onnx

    import ops

    return bytes(ops.to_channels_last(onnx.load(str(path))).SerializeToString())


def make_session(
    model_dir: Path, plan: EnginePlan, config: EngineConfig
) -> tuple[ort.InferenceSession, dict[str, str]]:
    """The session ``plan`` asks for, or LoadError with the cause of the failure."""
    choice, provider = plan.graph, plan.provider.provider
    graphs = plan.cuda_graphs.enabled
    path = model_dir / choice.filename
    if not path.is_file():
        raise LoadError(
            f"{path} not found (a model folder needs {UNFUSED_FILE}, docs/design.md §3)",
            "model_file",
            f"{path.name} not found",
        )
    try:
        so = session_options(choice, provider, config, graphs)
    except EngineError as e:
        raise LoadError(str(e), "op_library", str(e)) from e
    opts: dict[str, str] = {}
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        opts = cuda_options(config, graphs, prefer_nhwc=plan.layout.layout == "nhwc")
    providers = session_providers(provider, opts, graphs)
    try:
        source = _model_source(path, plan.layout.layout == "nhwc")
        # enable_fallback=0: ORT's own retry on the CPU provider would hide the cause from
        # the plan (and with CUDA graphs it fails anyway, on the conflicting options).
        session = ort.InferenceSession(source, so, providers=providers, enable_fallback=0)
        return session, opts
    except Exception as e:  # onnxruntime raises several unrelated types
        detail = f"{type(e).__name__}: {e}"
        raise LoadError(f"cannot load {path}: {detail}", load_cause(str(e)), detail) from e


def check_signature(
    session: ort.InferenceSession,
    card: ModelCard,
    filename: str,
) -> tuple[str, str]:
    """The graph must take and give what the card says; else the card and model disagree."""
    spec = card.input
    inputs = session.get_inputs()
    by_name = {i.name: i for i in inputs}
    if spec.tensor not in by_name:
        raise EngineError(
            f"{filename}: no input named {spec.tensor!r} (model.json input.tensor);"
            f" the graph has {sorted(by_name)}"
        )
    inp = by_name[spec.tensor]
    if inp.type != _ORT_DTYPE[spec.dtype]:
        raise EngineError(
            f"{filename}: input {spec.tensor!r} is {inp.type}, but model.json says {spec.dtype}"
        )
    dims = list(inp.shape)
    if len(dims) != 4 or any(
        isinstance(d, int) and d != e for d, e in zip(dims[1:], spec.shape, strict=True)
    ):
        raise EngineError(
            f"{filename}: input shape {dims} does not match model.json"
            f" [N, {', '.join(map(str, spec.shape))}]"
        )
    if isinstance(dims[0], int) and dims[0] != -1:
        raise EngineError(f"{filename}: the batch axis is fixed at {dims[0]}; export it dynamic")
    outputs = {o.name: o for o in session.get_outputs()}
    if card.output.logits not in outputs:
        raise EngineError(
            f"{filename}: no output named {card.output.logits!r} (model.json "
            f"output.logits); the graph has {sorted(outputs)}"
        )
    out = outputs[card.output.logits]
    last = out.shape[-1] if out.shape else None
    if isinstance(last, int) and last != card.num_classes:
        raise EngineError(
            f"{filename}: output has {last} classes, model.json says {card.num_classes}"
        )
    return spec.tensor, card.output.logits
