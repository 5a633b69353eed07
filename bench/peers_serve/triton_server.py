"""Triton Inference Server (the binary the ``nvidia-pytriton`` wheel bundles) with the peer
model bound through PyTriton: Triton's C++ HTTP front end and dynamic batcher (max batch 32,
5 ms queue delay), and two model instances in Python. Requests are the Open Inference
Protocol with the binary data extension: one BYTES input holding the JPEG, one INT64 output
with the top-1 class.

    PEER_MODEL_DIR=... python -m bench.peers_serve.triton_server --http-port 8000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers_serve.model import Classifier

INSTANCES = 1


def instance() -> Callable[..., dict[str, np.ndarray]]:
    classifier = Classifier()

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        top1 = classifier.top1([bytes(row[0]) for row in image])
        return {"top1": np.asarray(top1, dtype=np.int64).reshape(-1, 1)}

    return infer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--delay-ms", type=float, default=5.0)
    args = p.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="peer",
            infer_func=[instance() for _ in range(INSTANCES)],
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="top1", dtype=np.int64, shape=(1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.delay_ms * 1000)),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
