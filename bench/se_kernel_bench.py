"""Fused SqueezeExcitation kernel against the unfused ONNX Runtime ops, one SE block at a time.

For SE-ResNet-50 shapes (C=256 at 56x56, C=2048 at 7x7, reduction 16) and batch 1 and 8, two
one-block graphs are timed in the same process on the CPU provider:
  unfused  ReduceMean -> Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid -> Mul [-> Add -> Relu]
  fused    one SqueezeExcitation node (ai.seresnet) with the same weights
at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL. Runs alternate between the two graphs so that load
from other processes hits both alike; medians (and p10/p90) over the repeats are reported,
with the ratio unfused/fused (> 1: the fused kernel is faster).

    python bench/se_kernel_bench.py                    # writes bench/results/se_kernel_cpu.json
    python bench/se_kernel_bench.py --threads 4 --repeats 100 --out se.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import ops  # noqa: E402  (the repository's ops package, found from any working directory)
from bench.machine import cpu_name  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "se_kernel_cpu.json"
# (channels, height, width) of SE-ResNet-50's first and last stage; reduction 16.
SHAPES = [(256, 56, 56), (2048, 7, 7)]
BATCHES = [1, 8]
REDUCTION = 16
LEVELS = {
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
IR_VERSION = 10
OPSET = 17


def weights(channels: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    reduced = channels // REDUCTION
    return {
        "w1": (rng.standard_normal((reduced, channels)) * channels**-0.5).astype(np.float32),
        "b1": (rng.standard_normal(reduced) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((channels, reduced)) * reduced**-0.5).astype(np.float32),
        "b2": (rng.standard_normal(channels) * 0.1).astype(np.float32),
    }


def _inputs(channels: int, height: int, width: int, residual: bool) -> list:
    shape = ["batch", channels, height, width]
    names = ["x", "residual"] if residual else ["x"]
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names]


def unfused_model(
    channels: int, height: int, width: int, w: dict[str, np.ndarray], residual: bool
) -> bytes:
    reduced = channels // REDUCTION
    inits = [
        numpy_helper.from_array(w["w1"].reshape(reduced, channels, 1, 1), "w1"),
        numpy_helper.from_array(w["b1"], "b1"),
        numpy_helper.from_array(w["w2"].reshape(channels, reduced, 1, 1), "w2"),
        numpy_helper.from_array(w["b2"], "b2"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=1),
        helper.make_node("Conv", ["pooled", "w1", "b1"], ["fc1"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["fc1"], ["hidden"]),
        helper.make_node("Conv", ["hidden", "w2", "b2"], ["fc2"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["fc2"], ["gate"]),
        helper.make_node("Mul", ["x", "gate"], ["scaled" if residual else "y"]),
    ]
    if residual:
        nodes += [
            helper.make_node("Add", ["scaled", "residual"], ["summed"]),
            helper.make_node("Relu", ["summed"], ["y"]),
        ]
    return _model(nodes, channels, height, width, inits, residual, [])


def fused_model(
    channels: int, height: int, width: int, w: dict[str, np.ndarray], residual: bool
) -> bytes:
    inits = [numpy_helper.from_array(w[name], name) for name in ("w1", "b1", "w2", "b2")]
    node = ops.make_node(
        "x", "w1", "b1", "w2", "b2", "y", residual="residual" if residual else None, relu=residual
    )
    return _model([node], channels, height, width, inits, residual, [ops.opset_import()])


def _model(nodes, channels, height, width, inits, residual, extra_opsets) -> bytes:
    graph = helper.make_graph(
        nodes,
        "se_block",
        _inputs(channels, height, width, residual),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET), *extra_opsets],
    )
    return model.SerializeToString()


def session(model: bytes, level: ort.GraphOptimizationLevel, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    ops.register(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _stats(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)
    deciles = statistics.quantiles(ms, n=10)
    return {
        "median_ms": round(statistics.median(ms), 4),
        "p10_ms": round(deciles[0], 4),
        "p90_ms": round(deciles[-1], 4),
    }


def bench_case(
    batch: int,
    shape: tuple[int, int, int],
    residual: bool,
    level: str,
    threads: int,
    args: argparse.Namespace,
) -> dict:
    channels, height, width = shape
    w = weights(channels)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((batch, *shape)).astype(np.float32)}
    if residual:
        feeds["residual"] = rng.standard_normal((batch, *shape)).astype(np.float32)
    sessions = {
        "fused": session(fused_model(*shape, w, residual), LEVELS[level], threads),
        "unfused": session(unfused_model(*shape, w, residual), LEVELS[level], threads),
    }
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    for _ in range(args.warmup):
        for s in sessions.values():
            s.run(None, feeds)
    samples: dict[str, list[int]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():  # alternate, so background load hits both alike
            start = time.perf_counter_ns()
            s.run(None, feeds)
            samples[name].append(time.perf_counter_ns() - start)
    fused, unfused = _stats(samples["fused"]), _stats(samples["unfused"])
    return {
        "batch": batch,
        "channels": channels,
        "height": height,
        "width": width,
        "reduced": channels // REDUCTION,
        "residual_relu": residual,
        "optimization": level,
        "threads": threads,
        "fused": fused,
        "unfused": unfused,
        "unfused_over_fused": round(unfused["median_ms"] / fused["median_ms"], 3),
        "max_abs_diff": float(np.abs(outputs["fused"] - outputs["unfused"]).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="intra-op thread counts to measure (default: 1 2)",
    )
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per graph")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per graph first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")

    load_at_start = os.getloadavg()[0]
    results = []
    for threads in args.threads:
        for shape in SHAPES:
            for batch in BATCHES:
                for residual in (False, True):
                    for level in LEVELS:
                        row = bench_case(batch, shape, residual, level, threads, args)
                        results.append(row)
                        print(_line(row), flush=True)
    report = {
        "benchmark": "se_kernel_cpu",
        "what": "one SE block: fused SqueezeExcitation vs unfused ONNX ops, CPU provider",
        "onnxruntime": ort.__version__,
        "library": ops.build_info(),
        "machine": {
            "processor": cpu_name(),
            "cpus": os.cpu_count(),
            "load_average_1m_at_start": round(load_at_start, 2),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _line(row: dict) -> str:
    return (
        f"threads={row['threads']} N={row['batch']} C={row['channels']} "
        f"{row['height']}x{row['width']} residual+relu={row['residual_relu']!s:5} "
        f"{row['optimization']:8}  fused {row['fused']['median_ms']:8.3f} ms  "
        f"unfused {row['unfused']['median_ms']:8.3f} ms  x{row['unfused_over_fused']:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
