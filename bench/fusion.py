"""SE-ResNet-50 fused vs unfused vs ResNet-50 (the floor) vs PyTorch eager, side by side.

    python -m bench.fusion [--batch 1 8] [--repeats 7] [--provider cpu|cuda]
    python -m bench.fusion --provider cuda [--precision fp32 tf32 fp16] [--graphs off on]
    python -m bench.fusion --provider cpu --dry-run     # the CUDA matrix's plumbing, on the CPU

The CPU run compares the ORT optimisation levels. The CUDA run is the matrix of
bench/fusion_cuda.py (precision x layout x CUDA graphs, batch 1/8/32/128 by default, PyTorch
eager fp16 channels_last as the anchor); see its docstring.

Every configuration runs in the same process, interleaved round-robin over the repeats so
drift and noise from the machine hit them alike; each repeat times a few calls and the
report gives the median per call, and every ratio against ResNet-50's best time at that batch
size (the paper's question: what does SE cost?). Results: bench/results/fusion_<provider>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.machine import cpu_name, gpu_name
from service.engine.policy import OPT_LEVELS, PROVIDER_EP

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = REPO / "build" / "bench-models"
# The CPU engine's auto level (all) rests on this comparison; basic is only a user's override.
LEVELS = {level: OPT_LEVELS[level] for level in ("extended", "all")}
PROVIDERS = PROVIDER_EP


def exported(arch: str, cache: Path = CACHE) -> Path:
    """Random-weight export of ``arch`` (cached under ``cache``): model.onnx and model.se.onnx."""
    from export.fusion import fuse_file
    from export.model_card import input_spec_for
    from export.onnx_export import export_onnx
    from export.pipeline import load_model

    folder = cache / arch
    if not (folder / "model.se.onnx").exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"exporting {arch} (random weights) to {folder}", flush=True)
        export_onnx(load_model(arch, None), input_spec_for(arch), folder / "model.onnx")
        fuse_file(folder / "model.onnx", folder / "model.se.onnx")
    return folder


def ort_runner(
    path: Path, level: str, provider: str, fused: bool, x: np.ndarray, threads: int
) -> Callable[[], object]:
    import ops

    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    if fused:
        ops.register(so)
    sess = ort.InferenceSession(str(path), so, providers=[provider])
    if provider == PROVIDER_EP["cuda"]:
        binding = sess.io_binding()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding.bind_ortvalue_input(sess.get_inputs()[0].name, x_dev)
        binding.bind_output(sess.get_outputs()[0].name, "cuda")

        def run() -> object:
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return None

        return run
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def torch_runner(arch: str, x: np.ndarray, threads: int) -> Callable[[], object]:
    import torch

    from export.model_card import input_spec_for
    from export.onnx_export import normalize
    from export.pipeline import load_model

    torch.set_num_threads(threads)
    model = load_model(arch, None)
    xt = normalize(x, input_spec_for(arch))

    def run() -> object:
        with torch.inference_mode():
            return model(xt)

    return run


def time_calls(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        help="batch sizes (default: 1 8 on the CPU, 1 8 32 128 on CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--calls", type=int, default=0, help="calls per repeat (default: about 1 s of work)"
    )
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument("--out", type=Path)
    matrix = parser.add_argument_group("the CUDA matrix (--provider cuda, or --dry-run)")
    matrix.add_argument(
        "--precision", nargs="+", choices=["fp32", "tf32", "fp16"], default=["fp32", "tf32", "fp16"]
    )
    matrix.add_argument(
        "--graphs",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="CUDA graphs (one per batch size)",
    )
    matrix.add_argument(
        "--seconds", type=float, default=0.1, help="time per repeat and row (default: %(default)s)"
    )
    matrix.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help="where the random-weight exports are kept (default: build/)",
    )
    matrix.add_argument(
        "--dry-run",
        action="store_true",
        help="run the CUDA matrix's code on this provider with small nets "
        "(seresnet18/resnet18), batch 1, one repeat; checks the plumbing, "
        "writes build/fusion_dry_run.json",
    )
    args = parser.parse_args(argv)
    provider = PROVIDERS[args.provider]
    if provider not in ort.get_available_providers():
        print(f"{provider} is not available here", file=sys.stderr)
        return 2
    if args.provider == "cuda" or args.dry_run:
        return cuda_matrix(args, provider)
    args.batch = args.batch or [1, 8]

    se, plain = exported("seresnet50"), exported("resnet50")
    results: dict[str, object] = {
        "benchmark": "fusion",
        "provider": provider,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "gpu": gpu_name() if args.provider == "cuda" else None,
        },
        "repeats": args.repeats,
        "batches": {},
    }
    for batch in args.batch:
        x = np.random.default_rng(0).integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
        runners: dict[str, Callable[[], object]] = {}
        for level in LEVELS:
            runners[f"resnet50/{level}"] = ort_runner(
                plain / "model.onnx", level, provider, False, x, args.threads
            )
            runners[f"seresnet50-unfused/{level}"] = ort_runner(
                se / "model.onnx", level, provider, False, x, args.threads
            )
            runners[f"seresnet50-fused/{level}"] = ort_runner(
                se / "model.se.onnx", level, provider, True, x, args.threads
            )
        if not args.no_torch and args.provider == "cpu":
            runners["resnet50/pytorch-eager"] = torch_runner("resnet50", x, args.threads)
            runners["seresnet50/pytorch-eager"] = torch_runner("seresnet50", x, args.threads)
        calls = {}
        for name, fn in runners.items():  # warm-up, and size each repeat to about 1 s
            fn()
            once = time_calls(fn, 1)
            calls[name] = args.calls or max(1, min(50, round(1.0 / once)))
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for rep in range(args.repeats):
            for name, fn in runners.items():
                samples[name].append(time_calls(fn, calls[name]))
            print(f"batch {batch}: repeat {rep + 1}/{args.repeats}", flush=True)
        medians = {name: statistics.median(s) for name, s in samples.items()}
        floor = min(
            v for k, v in medians.items() if k.startswith("resnet50/") and "pytorch" not in k
        )
        rows = {
            name: {
                "median_ms": round(medians[name] * 1e3, 3),
                "images_per_s": round(batch / medians[name], 2),
                "vs_resnet50_best": round(medians[name] / floor, 4),
                "samples_ms": [round(s * 1e3, 3) for s in samples[name]],
                "calls_per_sample": calls[name],
            }
            for name in runners
        }
        best_se = min(
            (k for k in rows if k.startswith("seresnet50-")), key=lambda k: rows[k]["median_ms"]
        )
        results["batches"][str(batch)] = {
            "rows": rows,
            "best_seresnet50": best_se,
            "best_seresnet50_vs_resnet50_best": rows[best_se]["vs_resnet50_best"],
        }
        print(f"\nbatch {batch} ({provider}, {args.threads} threads): median per call")
        for name, row in sorted(rows.items(), key=lambda kv: kv[1]["median_ms"]):
            print(
                f"  {name:32s} {row['median_ms']:9.2f} ms  {row['images_per_s']:8.1f} img/s"
                f"  {row['vs_resnet50_best']:.3f}x ResNet-50 best"
            )
        print(f"  best SE-ResNet-50: {best_se}\n", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"fusion_{args.provider}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def cuda_matrix(args: argparse.Namespace, provider: str) -> int:
    from bench import fusion_cuda as fc

    if args.dry_run:
        se_arch, plain_arch, batches, repeats = "seresnet18", "resnet18", [1], 1
        out = args.out or REPO / "build" / "fusion_dry_run.json"
    else:
        se_arch, plain_arch = "seresnet50", "resnet50"
        batches, repeats = args.batch or [1, 8, 32, 128], args.repeats
        out = args.out or RESULTS / "fusion_cuda.json"
    files = fc.model_files(args.cache, se_arch, plain_arch)
    results: dict[str, object] = {
        "benchmark": "fusion",
        "provider": provider,
        "dry_run": args.dry_run,
        "nets": {"seresnet50": se_arch, "resnet50": plain_arch},
        "machine": {
            "cpu": cpu_name(),
            "gpu": gpu_name(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "settings": "ORT_ENABLE_ALL; I/O bound to device buffers; fp32 = use_tf32 0, tf32 and "
        "fp16 = use_tf32 1; nhwc = prefer_nhwc 1; graphs-on = enable_cuda_graph 1 "
        "with gpu_graph_id per batch; PyTorch: eager, cudnn.benchmark, fp16, "
        "channels_last",
        "repeats": repeats,
        "seconds_per_repeat": args.seconds,
        "goals": fc.GOALS,
        "anchor_h200_seresnet50_pytorch_fp16_channels_last_images_per_s": (
            fc.ANCHOR_H200_SERESNET50_FP16_CL
        ),
        "rows": {str(b): {} for b in batches},
    }

    def save() -> None:
        results["summary"] = fc.summarise(results["rows"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    if not args.no_torch:
        for batch in batches:
            runners = {
                f"{arch}/pytorch-eager-fp16-channels-last": fc.torch_anchor(
                    net, batch, args.dry_run
                )
                for arch, net in (("resnet50", plain_arch), ("seresnet50", se_arch))
            }
            for name, row in fc.measure(runners, repeats, args.seconds).items():
                row["images_per_s"] = round(batch / (row["median_ms"] / 1e3), 1)
                row.update(servable=False, why="PyTorch eager: the anchor, not the service")
                results["rows"][str(batch)][name] = row
        save()
    graphs = [g == "on" for g in args.graphs]
    for group in fc.groups(args.precision, graphs):
        for name, batch, row in fc.run_group(
            group, files, batches, provider, repeats, args.seconds
        ):
            results["rows"][str(batch)][name] = row
            shown = (
                f"{row['median_ms']:9.3f} ms {row['images_per_s']:9.1f} img/s"
                if "median_ms" in row
                else row["error"][:120]
            )
            print(f"batch {batch:4d} {name:48s} {shown}", flush=True)
        save()
    save()
    for batch, entry in results["summary"].items():
        print(f"batch {batch}: {json.dumps(entry)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
