"""The service's engine on a GPU: float16 and CUDA graphs per batch bucket, as the auto policy
chooses them, against the float32 CPU engine on real Fashion-MNIST images. Skipped without a
GPU (scripts/gpu-check.sh runs it on one)."""

from __future__ import annotations

import numpy as np
import pytest
from serverutil import EMBEDDED_MODEL

from service.engine.model import Engine
from service.engine.policy import cuda_device_count
from service.settings import load_settings

pytestmark = pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU")


def _engine(**kw: object) -> Engine:
    config = load_settings({"model_dir": EMBEDDED_MODEL, "max_batch_size": 16, **kw})
    engine = Engine.load(config.engine_config())
    engine.warm_up(3)
    return engine


def _images(n: int) -> list[np.ndarray]:
    from export.fashion_mnist import load

    pixels, _ = load("test")
    return [p[None, :, :].copy() for p in pixels[:n]]


@pytest.fixture(scope="module")
def reference() -> Engine:
    return _engine(provider="cpu", precision="fp32")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_replays_match_plain_runs_on_fresh_inputs(reference: Engine, precision: str) -> None:
    graphs = _engine(provider="cuda", precision=precision, cuda_graphs="on")
    plain = _engine(provider="cuda", precision=precision, cuda_graphs="off")
    assert graphs.info.cuda_graphs and not plain.info.cuda_graphs
    assert graphs.info.precision == precision
    images = _images(200)
    tolerance = 2e-2 if precision == "fp16" else 1e-3
    # Every bucket, replayed again and again on inputs it has never seen.
    start = 0
    for n in (1, 3, 8, 16, 2, 5, 1, 16):
        batch = images[start : start + n]
        start += n
        replayed = graphs.run(batch)
        # Two sessions may pick different cuDNN algorithms: equal within the precision's
        # rounding, not bit for bit.
        np.testing.assert_allclose(replayed, plain.run(batch), atol=tolerance / 4, rtol=0)
        np.testing.assert_allclose(replayed, reference.run(batch), atol=tolerance, rtol=0)
        assert (replayed.argmax(1) == reference.run(batch).argmax(1)).mean() >= 0.99


def test_auto_runs_float16_with_graphs_on_cuda() -> None:
    engine = _engine(provider="cuda")
    assert engine.info.precision == "fp16", engine.info.precision_reason
    assert engine.info.graph_file == "model.fp16.se.onnx"
    assert engine.info.cuda_graphs, engine.info.cuda_graphs_reason
    assert engine.info.tf32 is True
