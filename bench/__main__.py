"""``python -m bench [NAME ...]``: run the named benchmarks (default: all), each writing its JSON
under bench/results/. ``python -m bench.NAME --help`` shows one benchmark's options."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "load": "bench.load",  # the service under HTTP load vs a naive baseline
    "frontend": "bench.frontend",  # CPU per request and throughput, workers vs one process
    "se-kernel": "bench.se_kernel_bench",  # fused SE op vs unfused ORT ops
    "fusion": "bench.fusion",  # SE-ResNet-50 fused/unfused vs ResNet-50 vs PyTorch
    # (bench.gpu_checks, the GPU checks that are not timings, runs from scripts/gpu-check.sh)
}


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(BENCHMARKS)
    if "-h" in names or "--help" in names:
        print(__doc__ + "\nbenchmarks: " + ", ".join(BENCHMARKS))
        return 0
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    for name in names:
        print(f"== bench {name}", flush=True)
        code = importlib.import_module(BENCHMARKS[name]).main([])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
