"""The fused op inside CUDA graphs (ONNX Runtime's enable_cuda_graph): captured once per batch
size (gpu_graph_id), replayed on fresh inputs written into the same device buffers, it must give
what a plain session gives, whichever graph ran before. Only runs where a GPU is usable; the
CUDA kernels are capture-safe by construction (launches only on ORT's compute stream, scratch
from ORT's allocator, no synchronisation or host copies), this proves it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from test_ops_kernel import (
    FP16_TOLERANCE,
    NP_TYPES,
    TOLERANCE,
    random_weights,
    se_model,
    usable_providers,
)

import ops

CUDA = "CUDAExecutionProvider"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA not in usable_providers(), reason="needs a usable GPU"),
]
BATCHES = (2, 5)  # one captured graph each


def _session(model_bytes: bytes, graphs: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    ops.register(so)
    options = {"enable_cuda_graph": "1" if graphs else "0"}
    return ort.InferenceSession(model_bytes, so, providers=[(CUDA, options)])


class Bound:
    """x, residual and y bound to fixed device buffers; run with ``gpu_graph_id``."""

    def __init__(
        self, sess: ort.InferenceSession, shape: tuple[int, ...], dtype: type, graph_id: int
    ) -> None:
        self.sess = sess
        self.binding = sess.io_binding()
        self.inputs = {}
        for meta in sess.get_inputs():
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), "cuda", 0)
            self.binding.bind_ortvalue_input(meta.name, value)
            self.inputs[meta.name] = value
        self.y = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)
        self.binding.bind_ortvalue_output(sess.get_outputs()[0].name, self.y)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, array in feeds.items():
            self.inputs[name].update_inplace(array)
        self.sess.run_with_iobinding(self.binding, self.options)
        return self.y.numpy().copy()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_graph_replays_equal_plain_runs_on_fresh_inputs(dtype: str, channels_last: bool) -> None:
    channels, reduced, height, width = 64, 16, 14, 14
    rng = np.random.default_rng(53)
    weights = {
        k: v.astype(NP_TYPES[dtype]) for k, v in random_weights(rng, channels, reduced).items()
    }
    model = se_model(
        channels,
        reduced,
        height,
        width,
        weights,
        "residual",
        relu=True,
        dtype=dtype,
        channels_last=channels_last,
    ).SerializeToString()
    graphed, plain = _session(model, graphs=True), _session(model, graphs=False)
    np_type = NP_TYPES[dtype]
    shapes = {
        b: (b, height, width, channels) if channels_last else (b, channels, height, width)
        for b in BATCHES
    }
    bound = {b: Bound(graphed, shapes[b], np_type, graph_id=i) for i, b in enumerate(BATCHES)}
    first_outputs: dict[int, tuple[dict, np.ndarray]] = {}
    # warm-up and capture each graph, then interleave replays of both on fresh inputs
    for round_ in range(4):
        for b in BATCHES:
            feeds = {
                name: rng.standard_normal(shapes[b]).astype(np_type) for name in ("x", "residual")
            }
            got = bound[b].run(feeds)
            (want,) = plain.run(None, feeds)
            reference = ops.numpy_reference(
                feeds["x"],
                **weights,
                residual=feeds["residual"],
                relu=True,
                channels_last=channels_last,
            )
            tolerance = FP16_TOLERANCE if dtype == "float16" else TOLERANCE
            # (not bit-equal by necessity: the plain session's buffers may take the other of
            # the vectorised/scalar paths, which sums in another order)
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), **tolerance)
            np.testing.assert_allclose(
                got.astype(np.float32), reference.astype(np.float32), **tolerance
            )
            first_outputs.setdefault(b, (feeds, got))
            assert round_ == 0 or not np.array_equal(got, first_outputs[b][1])
    # the first inputs again, after the other graph ran: the same bits as the first time (a
    # replay reading scratch another graph overwrote, or a stale input, would differ)
    for b in BATCHES:
        feeds, first = first_outputs[b]
        np.testing.assert_array_equal(bound[b].run(feeds), first)
