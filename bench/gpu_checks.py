"""The checks of the GPU engine that need a GPU but are not timings, in one process:

1. float16 parity on real images on the CUDA provider: the embedded model's model.fp16.se.onnx
   (channels first, and its channels-last form with prefer_nhwc) against float32 on the whole
   Fashion-MNIST test set (top-5 agreement >= 99 %, test top-1 within 0.1 %); SE-ResNet-50
   (random weights) float16 vs float32 on real photographs, reported.
2. CUDA-graph replay equality of whole fused networks: SE-ResNet-50 fused float32 and float16
   channels-last, one graph per batch size (gpu_graph_id), replayed on fresh inputs written into
   the bound buffers, against a session without graphs; the first inputs replayed again at the
   end must give the same bits.
3. What ORT's CUDA layout transformer (prefer_nhwc=1) leaves: Transpose nodes in the optimised
   graph of ResNet-50, SE-ResNet-50 unfused, fused, and fused channels-last (float16).

    python -m bench.gpu_checks [--cache /tmp/bm] [--out bench/results/gpu_checks.json]
    python -m bench.gpu_checks --dry-run    # the same code on the CPU provider, small nets

Every CUDA session disables CPU fallback, so a node without a CUDA kernel fails the check
instead of running on the CPU. Exit status 1 when a parity or replay check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bench.fusion import CACHE, RESULTS
from bench.fusion_cuda import CUDA, BoundRun, model_files
from export.pipeline import MAX_FP16_TOP1_DELTA, MIN_FP16_TOP5_AGREEMENT

# Where the checks run: CUDA, or the CPU provider for --dry-run (which checks only that the code
# runs end to end: the CPU has no CUDA graphs and no NHWC layout transformer).
RUN_ON = {"provider": CUDA, "nets": ("seresnet50", "resnet50")}


def session(
    model: onnx.ModelProto | Path,
    provider: str | None = None,
    nhwc: bool = False,
    graphs: bool = False,
    tf32: bool = False,
    optimized: Path | None = None,
) -> ort.InferenceSession:
    import ops

    so = ort.SessionOptions()
    ops.register(so)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    provider = provider or RUN_ON["provider"]
    if provider != CUDA:
        return ort.InferenceSession(source, so, providers=[provider])
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options = {
        "use_tf32": str(int(tf32)),
        "prefer_nhwc": str(int(nhwc)),
        "enable_cuda_graph": str(int(graphs)),
    }
    return ort.InferenceSession(source, so, providers=[(CUDA, options)])


def logits(sess: ort.InferenceSession, pixels: np.ndarray, chunk: int = 1000) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: pixels[i : i + chunk]})[0] for i in range(0, len(pixels), chunk)]
    )


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    from export.onnx_export import compare

    result = compare(reference, candidate)
    return {
        "images": result.images,
        "max_abs_logit_diff": result.max_abs_diff,
        "top5_agreement": result.top5_agreement,
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "max_abs_logit": float(np.abs(reference).max()),
    }


def embedded_parity(folder: Path) -> dict[str, Any]:
    """The embedded model on its test set: float16 on CUDA (both layouts) vs float32."""
    import ops
    from export import fashion_mnist
    from export.onnx_export import accuracy
    from modelcard import read_card

    card = read_card(folder)
    images, labels = fashion_mnist.load("test")
    pixels = images[:, None]
    reference = logits(session(folder / "model.se.onnx", "CPUExecutionProvider"), pixels)
    fp32_top1, _ = accuracy(reference, labels)
    fp16 = onnx.load(str(folder / card.float16.file))
    variants = {
        "fp32 cuda (tf32 off)": session(folder / "model.se.onnx"),
        "fp16 cuda nchw": session(fp16),
        "fp16 cuda nhwc (channels-last SE)": session(ops.to_channels_last(fp16), nhwc=True),
    }
    report: dict[str, Any] = {
        "reference": "model.se.onnx, CPUExecutionProvider, float32",
        "reference_test_top1": fp32_top1,
        "variants": {},
    }
    ok = True
    for name, sess in variants.items():
        got = logits(sess, pixels)
        top1, top5 = accuracy(got, labels)
        entry = {
            **agreement(reference, got),
            "test_top1": top1,
            "test_top5": top5,
            "test_top1_delta": top1 - fp32_top1,
        }
        entry["ok"] = bool(
            entry["top5_agreement"] >= MIN_FP16_TOP5_AGREEMENT
            and abs(entry["test_top1_delta"]) <= MAX_FP16_TOP1_DELTA
        )
        ok &= entry["ok"]
        report["variants"][name] = entry
    report["ok"] = ok
    return report


def seresnet50_parity(files: dict[tuple[str, bool], Path]) -> dict[str, Any]:
    """Random-weight SE-ResNet-50 on real photos: float16 (both layouts) vs float32 on CUDA.
    Reported, not judged: random nets have small logit gaps between classes."""
    from export.model_card import input_spec_for
    from export.onnx_export import parity_images

    pixels = parity_images(input_spec_for(RUN_ON["nets"][0]), 32)
    reference = logits(session(files[("seresnet50-fused", False)]), pixels, chunk=8)
    return {
        "images": len(pixels),
        "fp16 nchw": agreement(
            reference, logits(session(files[("seresnet50-fused", True)]), pixels, chunk=8)
        ),
        "fp16 nhwc (channels-last SE)": agreement(
            reference,
            logits(session(files[("seresnet50-fused-cl", True)], nhwc=True), pixels, chunk=8),
        ),
    }


def graph_replay(
    path: Path, nhwc: bool, tolerance: float, batches: tuple[int, ...] = (1, 8), rounds: int = 4
) -> dict[str, Any]:
    """Graph replays vs plain runs on fresh inputs; then the first inputs again. (ORT runs a
    graph id's first call plainly and captures on the second: rounds 3+ are replays.)"""
    graphed, plain = session(path, nhwc=nhwc, graphs=True), session(path, nhwc=nhwc)
    rng = np.random.default_rng(61)
    provider = RUN_ON["provider"]
    bound = {b: BoundRun(graphed, b, i, provider) for i, b in enumerate(batches)}
    plain_bound = {b: BoundRun(plain, b, -1, provider) for b in batches}
    worst, first = 0.0, {}
    for _ in range(rounds):
        for b in batches:
            x = rng.integers(0, 256, bound[b].x.shape, dtype=np.uint8)
            got = bound[b].feed(x).copy()
            want = plain_bound[b].feed(x)
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)))
            first.setdefault(b, (x, got))
    again = all(np.array_equal(bound[b].feed(x), y) for b, (x, y) in first.items())
    return {
        "model": path.name,
        "nhwc": nhwc,
        "batches": list(batches),
        "rounds": rounds,
        "max_rel_diff_vs_plain": worst,
        "tolerance": tolerance,
        "first_inputs_again_bit_equal": again,
        "ok": bool(again and worst <= tolerance),
    }


def transposes_left(files: dict[tuple[str, bool], Path]) -> dict[str, Any]:
    """Transpose nodes in ORT's optimised graph with prefer_nhwc=1 (float16)."""
    report = {}
    for model in ("resnet50", "seresnet50-unfused", "seresnet50-fused", "seresnet50-fused-cl"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "optimized.onnx"
            try:
                session(files[(model, True)], nhwc=True, optimized=out)
                graph = onnx.load(str(out)).graph
                ops_by_type = Counter(n.op_type for n in graph.node)
                report[model] = {
                    "transposes": ops_by_type["Transpose"],
                    "nhwc_domain_nodes": sum(
                        n.domain == "com.ms.internal.nhwc" for n in graph.node
                    ),
                    "squeeze_excitation_nodes": ops_by_type["SqueezeExcitation"],
                    "nodes": len(graph.node),
                }
            except Exception as error:
                report[model] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_checks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "models" / "fashion-seresnet",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU provider, seresnet18/resnet18: checks the code runs; writes "
        "build/gpu_checks_dry_run.json",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        RUN_ON.update(provider="CPUExecutionProvider", nets=("seresnet18", "resnet18"))
        args.out = args.out or RESULTS.parent.parent / "build" / "gpu_checks_dry_run.json"
    elif CUDA not in ort.get_available_providers():
        print(f"{CUDA} is not available here", file=sys.stderr)
        return 2
    args.out = args.out or RESULTS / "gpu_checks.json"
    from bench.machine import gpu_name

    results: dict[str, Any] = {
        "gpu": gpu_name(),
        "onnxruntime": ort.__version__,
        "provider": RUN_ON["provider"],
        "dry_run": args.dry_run,
    }

    def step(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except Exception as error:
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        print(f"== {name}: {json.dumps(results[name])[:2000]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    step("embedded_fp16_parity", lambda: embedded_parity(args.model_dir))
    files = model_files(args.cache, *RUN_ON["nets"])
    step("seresnet50_fp16_parity", lambda: seresnet50_parity(files))
    step(
        "graph_replay_fp32",
        lambda: graph_replay(files[("seresnet50-fused", False)], nhwc=False, tolerance=1e-4),
    )
    step(
        "graph_replay_fp16_channels_last",
        lambda: graph_replay(files[("seresnet50-fused-cl", True)], nhwc=True, tolerance=2e-2),
    )
    step("prefer_nhwc_transposes", lambda: transposes_left(files))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"wrote {args.out}; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
