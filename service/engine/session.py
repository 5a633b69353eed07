"""Building the ONNX Runtime session: the op library, session options, provider options
(one table per provider), and the check that the graph matches the model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from modelcard.schema import UNFUSED_FILE, ModelCard
from service.engine.policy import CPU_EP, CUDA_EP, OPT_LEVELS, EngineError, GraphChoice

if TYPE_CHECKING:
    from service.engine.config import EngineConfig

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
        fp16 = bool(ops.has_fp16_kernel("CUDAExecutionProvider"))
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
        # Spinning threads would burn the cores the ingress workers need between batches.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        so.intra_op_num_threads = 1
    if cuda_graphs:
        # A graph replays only what ran on the GPU: refuse to build a session that would
        # leave any node on the CPU instead of capturing an incomplete graph.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if choice.graph == "fused":
        try:
            register_ops(so)
        except Exception as e:  # reported with its cause
            raise EngineError(f"cannot register the op library: {type(e).__name__}: {e}") from e
    return so


def cuda_options(config: EngineConfig, cuda_graphs: bool = False) -> dict[str, str]:
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
    }


def make_session(
    model_dir: Path,
    provider: str,
    choice: GraphChoice,
    config: EngineConfig,
    cuda_graphs: bool = False,
) -> tuple[ort.InferenceSession, dict[str, str]]:
    path = model_dir / choice.filename
    if not path.is_file():
        raise EngineError(
            f"{path} not found (a model folder needs {UNFUSED_FILE}, docs/design.md §3)"
        )
    so = session_options(choice, provider, config, cuda_graphs)
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        opts = cuda_options(config, cuda_graphs)
        providers: list[Any] = [(CUDA_EP, opts), CPU_EP]
    else:
        opts = {}
        providers = [CPU_EP]
    try:
        return ort.InferenceSession(str(path), so, providers=providers), opts
    except Exception as e:  # onnxruntime raises several unrelated types
        raise EngineError(f"cannot load {path}: {type(e).__name__}: {e}") from e


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
    expected = [spec.channels, spec.height, spec.width]
    dims = list(inp.shape)
    if len(dims) != 4 or any(
        isinstance(d, int) and d != e for d, e in zip(dims[1:], expected, strict=True)
    ):
        raise EngineError(
            f"{filename}: input shape {dims} does not match model.json "
            f"[N, {spec.channels}, {spec.height}, {spec.width}]"
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
