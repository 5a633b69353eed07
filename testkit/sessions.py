"""Reference ONNX Runtime sessions: what the service's answers are checked against."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

import ops

CPU = "CPUExecutionProvider"


def cpu_session(
    model: Path | str | bytes | onnx.ModelProto,
    *,
    fused: bool = True,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """A CPU session of ``model`` (a file, its bytes or a ModelProto), with the op library
    registered unless ``fused=False`` (harmless for an unfused graph)."""
    so = options or ort.SessionOptions()
    if fused:
        ops.register(so)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=[CPU])


def served_graph_session(engine: dict, folder: Path) -> ort.InferenceSession:
    """The graph a running service reports it serves (its metadata's ``engine`` object:
    ``graph`` and ``graph_file``), run directly on the CPU."""
    return cpu_session(folder / engine["graph_file"], fused=engine["graph"] == "fused")
