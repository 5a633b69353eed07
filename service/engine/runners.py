"""How a batch reaches ONNX Runtime: plain ``session.run`` on the CPU, fixed-shape I/O-bound
buckets on CUDA."""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from service.engine.policy import EngineError
from service.ranking import softmax
from service.ranking import top_k as top_k_rows

__all__ = ["softmax", "top_k_rows"]  # the one ranking, for the engine's top-k answers


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

    With ``cuda_graphs`` (the session made with ``enable_cuda_graph``), each bucket's run carries
    its own ``gpu_graph_id``: ONNX Runtime captures one CUDA graph per bucket during warm-up and
    replays it afterwards, since the bound device buffers never move. That turns a batch of one,
    which is mostly kernel launches, into a single graph launch.
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
        cuda_graphs: bool = False,
    ) -> None:
        self._session = session
        self._device = device
        self.buckets = tuple(sorted(set(buckets)))
        self._slots: dict[int, tuple[np.ndarray, ort.OrtValue, ort.OrtValue, Any]] = {}
        self._run_options: dict[int, ort.RunOptions | None] = {}
        # Runs per (thread, bucket): ORT captures a bucket's graph once per thread, so a
        # bucket first run on a new thread captures again.
        self.runs: collections.Counter[tuple[int, int]] = collections.Counter()
        for graph_id, b in enumerate(self.buckets):
            options = None
            if cuda_graphs:
                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[b] = options
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
        bucket = self.bucket_for(n)
        host, x, y, binding = self._slots[bucket]
        np.stack(images, out=host[:n])
        host[n:] = 0
        if self._device != "cpu":  # on the CPU the OrtValue already wraps ``host``
            # A pageable copy on the legacy default stream, while ORT computes on its own
            # non-blocking stream: wait for it (synchronize_inputs syncs the device) before a
            # run, or a replayed graph can read the tail of the previous batch.
            x.update_inplace(host)
            binding.synchronize_inputs()
        self._session.run_with_iobinding(binding, self._run_options[bucket])
        self.runs[threading.get_ident(), bucket] += 1
        return np.array(y.numpy()[:n], copy=True)
