"""Whole networks, fused vs unfused, in real ONNX Runtime sessions: the fused model must give
the same logits (within 1e-5) and the same top-5 classes, on random and real inputs, at
several batch sizes and at every optimisation level the service may use."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import ops
from export.model_card import input_spec_for
from export.onnx_export import compare, parity_images
from testkit.sessions import cpu_session

pytestmark = pytest.mark.slow

LEVELS = {
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _session(path, level: str, fused: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    return cpu_session(path, fused=fused, options=so)


def _inputs(arch: str, batch: int, kind: str) -> np.ndarray:
    spec = input_spec_for(arch)
    if kind == "real":
        return parity_images(spec, batch)
    shape = (batch, spec.channels, spec.height, spec.width)
    return np.random.default_rng(batch).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("arch", ["seresnet18", "seresnet50"])
def test_fused_network_matches_unfused(random_onnx, arch: str, level: str) -> None:
    unfused = _session(random_onnx(arch), level, fused=False)
    fused = _session(random_onnx(arch, fuse=True), level, fused=True)
    for batch in (1, 3, 32):
        for kind in ("random", "real"):
            x = _inputs(arch, batch, kind)
            want = unfused.run(None, {"image": x})[0]
            got = fused.run(None, {"image": x})[0]
            result = compare(want, got)
            assert result.max_abs_diff <= 1e-5, (batch, kind, result)
            assert result.top5_agreement == 1.0, (batch, kind, result)
            # the inputs must actually tell images apart, or top-5 agreement proves nothing
            assert len({tuple(np.argsort(-row)[:5]) for row in want}) > 1 or batch == 1


def test_seresnet50_fuses_all_sixteen_blocks(random_onnx) -> None:
    import onnx

    model = onnx.load(str(random_onnx("seresnet50", fuse=True)))
    fused = [n for n in model.graph.node if n.op_type == ops.OP_TYPE]
    assert len(fused) == 16
    assert all(len(n.input) == 6 for n in fused)  # each absorbed its residual Add + ReLU
