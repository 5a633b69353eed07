"""The engine's configuration: what it needs of the service's settings, and nothing about HTTP.
Kept free of onnxruntime so the supervisor and workers can build it without loading ORT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# How the engine process tells the supervisor why it ended (kept here, free of onnxruntime,
# so that the supervisor can read them without loading it).
EXIT_LOAD_FAILED = 3
EXIT_WARMUP_FAILED = 4


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load and run a model folder."""

    model_dir: Path
    provider: str = "auto"
    graph: str = "auto"
    opt_level: str = "auto"
    device_id: int = 0
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # ORT's CPU threads; 0: measured at load between one and ``cpu_cores`` (Engine.load).
    intra_op_threads: int = 1
    cpu_cores: int = 1
    # ORT's pool threads spin between operators instead of sleeping (Engine.load turns it on
    # when it measured that splitting the model across cores pays).
    intra_op_spinning: bool = False
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    cuda_tf32: bool = True
    precision: str = "auto"  # auto | fp32 | fp16 | int8
    cuda_graphs: str = "auto"  # auto | on | off
    cuda_layout: str = "auto"  # auto | nchw | nhwc (float16 channels last, prefer_nhwc)

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_buckets)
