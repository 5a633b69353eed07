"""int8 vs float32 on the CPU: images/s of the engine (service.engine.Engine.run) serving the
fused float32 graph and its int8 variant, side by side, interleaved rounds, medians.

SE-ResNet-50 at 224x224 uses random weights (exported with --benchmark-only into a temporary
folder, so its int8 file is kept whatever its agreement with float32: speed does not depend on
the weights); the embedded Fashion-MNIST model is the committed folder, whose int8 graph passed
export's accuracy gate, and its card figures are copied into the JSON.

    python -m bench.int8                  # -> bench/results/int8_cpu.json
    python -m bench.int8 --quick          # fewer rounds, to try the set-up
    python -m bench.int8 --batches 1,8 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO / "models" / "fashion-seresnet"
RESULT = REPO / "bench" / "results" / "int8_cpu.json"


def export_seresnet50(folder: Path) -> Path:
    print(f"exporting a random-weight SE-ResNet-50 (benchmark-only) to {folder} ...", flush=True)
    command = [sys.executable, "-m", "export", "onnx", "--arch", "seresnet50", "--random-init"]
    command += ["--parity-images", "8", "--benchmark-only", "--no-fp16", "--out", str(folder)]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return folder


def time_engines(folder: Path, batches: list[int], rounds: int, threads: int) -> dict:
    """Median images/s per batch size of each precision, rounds interleaved fp32/int8."""
    from modelcard import read_card
    from service.engine.config import EngineConfig
    from service.engine.model import Engine

    card = read_card(folder)
    engines = {
        p: Engine.load(
            EngineConfig(
                model_dir=str(folder),
                provider="cpu",
                precision=p,
                intra_op_threads=threads,
                batch_buckets=tuple(sorted(set(batches))),
            )
        )
        for p in ("fp32", "int8")
    }
    shape = (card.input.channels, card.input.height, card.input.width)
    rng = np.random.default_rng(0)
    out: dict = {"model": card.name, "architecture": card.architecture, "batches": {}}
    for b in batches:
        images = list(rng.integers(0, 256, (b, *shape), dtype=np.uint8))
        per: dict[str, list[float]] = {"fp32": [], "int8": []}
        for e in engines.values():
            e.run(images)  # warm
        for r in range(rounds):
            for p, e in engines.items():
                t = time.perf_counter()
                runs = 0
                while runs < 3 or time.perf_counter() - t < 0.5:
                    e.run(images)
                    runs += 1
                per[p].append(b * runs / (time.perf_counter() - t))
            print(
                f"  {card.architecture} batch {b} round {r + 1}/{rounds}: "
                f"fp32 {per['fp32'][-1]:.1f} img/s, int8 {per['int8'][-1]:.1f} img/s",
                flush=True,
            )
        fp32, int8 = statistics.median(per["fp32"]), statistics.median(per["int8"])
        out["batches"][str(b)] = {
            "fp32_img_s": round(fp32, 2),
            "int8_img_s": round(int8, 2),
            "int8_vs_fp32": round(int8 / fp32, 3),
            "rounds": {k: [round(v, 2) for v in vs] for k, vs in per.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.int8",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batches", default="1,8,32", help="batch sizes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    parser.add_argument("--quick", action="store_true", help="batches 1,8 and 2 rounds")
    parser.add_argument("--out", type=Path, default=RESULT, help="JSON to write")
    args = parser.parse_args(argv)
    batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 2 if args.quick else args.rounds

    from bench.machine import cpu_name
    from modelcard import read_card
    from modelcard.cpu import cpu_int8_isa

    results: dict = {
        "machine": {"cpu": cpu_name(), "int8_isa": cpu_int8_isa(), "threads": args.threads},
        "note": "SE-ResNet-50 has random weights (speed only); the machine may be shared",
        "models": [],
    }
    embedded = read_card(EMBEDDED_MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for folder in (EMBEDDED_MODEL, export_seresnet50(Path(tmp) / "seresnet50")):
            print(f"timing {folder.name}: batches {batches}, {rounds} rounds", flush=True)
            entry = time_engines(folder, batches, rounds, args.threads)
            if folder == EMBEDDED_MODEL and embedded.int8 is not None:
                entry["card_int8"] = embedded.int8.model_dump(mode="json")
            results["models"].append(entry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'model':<22}{'batch':>6}{'fp32 img/s':>12}{'int8 img/s':>12}{'ratio':>8}")
    for m in results["models"]:
        for b, row in m["batches"].items():
            print(
                f"{m['architecture']:<22}{b:>6}{row['fp32_img_s']:>12.1f}"
                f"{row['int8_img_s']:>12.1f}{row['int8_vs_fp32']:>7.2f}x"
            )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
