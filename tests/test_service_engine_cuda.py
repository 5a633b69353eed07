"""The service's engine on a GPU: float16 and CUDA graphs per batch bucket, as the auto policy
chooses them, against the float32 CPU engine on real Fashion-MNIST images; graphs captured on
the thread that serves; the channels-last float16 graph. Skipped without a GPU
(scripts/gpu-check.sh runs it on one).

Parity runs use exact float32 (TF32 off: its 10-bit mantissa is an error of about 3e-2 on these
logits) and cuDNN's DEFAULT algorithm (no search: two sessions running the same algorithms
differ only by the graph replay)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.engine.batcher import Batcher
from service.engine.model import Engine
from service.engine.policy import cuda_device_count
from service.settings import load_settings
from testkit.server import EMBEDDED_MODEL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU"),
]


PARITY = {"cuda_tf32": False, "cudnn_conv_algo_search": "DEFAULT"}


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
    graphs = _engine(provider="cuda", precision=precision, cuda_graphs="on", **PARITY)
    plain = _engine(provider="cuda", precision=precision, cuda_graphs="off", **PARITY)
    assert graphs.info.tf32 is False and plain.info.tf32 is False
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
        # Same algorithms (DEFAULT, no search) in both sessions: equal within rounding.
        np.testing.assert_allclose(replayed, plain.run(batch), atol=tolerance / 4, rtol=0)
        np.testing.assert_allclose(replayed, reference.run(batch), atol=tolerance, rtol=0)
        assert (replayed.argmax(1) == reference.run(batch).argmax(1)).mean() >= 0.99


def test_auto_runs_float16_with_graphs_on_cuda() -> None:
    engine = _engine(provider="cuda")
    assert engine.info.precision == "fp16", engine.info.precision_reason
    assert engine.info.graph_file == "model.fp16.se.onnx"
    assert engine.info.cuda_graphs, engine.info.cuda_graphs_reason
    assert engine.info.tf32 is True


def test_graphs_are_captured_on_the_serving_thread_before_ready() -> None:
    """Warm-up through the batcher (as the engine server does) on its own thread, then batches
    of every bucket from the event loop: every run is on that one thread, and each bucket had
    run there often enough to be captured before the first live batch."""
    engine = Engine.load(
        load_settings(
            {"model_dir": EMBEDDED_MODEL, "max_batch_size": 16, "provider": "cuda"}
        ).engine_config()
    )
    assert engine.info.cuda_graphs, engine.info.cuda_graphs_reason
    runner = engine.runner
    images = _images(64)

    async def main() -> tuple[dict, int]:
        batcher = Batcher(engine.run, max_batch_size=16, max_queue_delay_s=0, max_queue_size=256)
        batcher.start()
        try:
            await batcher.call(engine.warm_up, 3)
            at_ready = dict(runner.runs)  # type: ignore[union-attr]
            for n in (1, 2, 3, 5, 9, 16):
                await batcher.submit(images[:n])
            return at_ready, await batcher.call(threading.get_ident)
        finally:
            await batcher.close(30)

    at_ready, serving = asyncio.run(main())
    assert engine.warm_thread == serving != threading.get_ident()
    assert {thread for thread, _ in runner.runs} == {serving}  # type: ignore[union-attr]
    for bucket in engine.info.batch_buckets:
        assert at_ready.get((serving, bucket), 0) >= 2, bucket  # ORT captures on the 2nd run


def test_the_channels_last_float16_graph_matches_channels_first() -> None:
    first = _engine(provider="cuda", precision="fp16", **PARITY)
    last = _engine(provider="cuda", precision="fp16", cuda_layout="nhwc", **PARITY)
    assert last.info.layout == "nhwc" and last.info.provider_options["prefer_nhwc"] == "1"
    assert last.info.cuda_graphs
    images = _images(48)
    for n in (1, 7, 16):
        np.testing.assert_allclose(last.run(images[:n]), first.run(images[:n]), atol=2e-2, rtol=0)


def test_back_to_back_replays_read_their_own_batch() -> None:
    """The input copy is synchronised with ORT's stream: replays in a tight loop, each batch
    different from the one before, each answer that of its own batch (a replay that read the
    tail of the previous batch would give the previous images' logits there)."""
    engine = _engine(provider="cuda", precision="fp32", cuda_graphs="on", **PARITY)
    plain = _engine(provider="cuda", precision="fp32", cuda_graphs="off", **PARITY)
    images = _images(32)
    batches = [images[:16], images[16:]]
    want = [plain.run(b) for b in batches]
    for i in range(100):
        got = engine.run(batches[i % 2])
        np.testing.assert_allclose(got, want[i % 2], atol=2.5e-4, rtol=0, err_msg=f"run {i}")
