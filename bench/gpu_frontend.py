"""Does HTTP keep up with the engine? SE-ResNet-50 at 224x224: the raw engine's images/s at
batch B against the service's images/s for many concurrent clients, same batch and precision.

1. raw: ``Engine.run`` on preprocessed real photos (scikit-image's samples when installed),
   batches of B, medians of rounds;
2. HTTP: ``python -m service`` (its default worker count, ``SERESNET_MAX_BATCH_SIZE=B``) under
   a closed-loop load of C concurrent single-image clients, then C/8 clients sending 8 images
   each; the load generator runs in several processes so that it is not the limit.

The front end's goal on an H100/H200: HTTP >= 85 % of raw at batch 64 with 256 clients. On a GPU
machine run it from scripts/gpu-check.sh; here ``--provider cpu --quick`` tries the set-up.

    python -m bench.gpu_frontend                      # -> bench/results/gpu_frontend.json
    python -m bench.gpu_frontend --provider cpu --quick --batch 8 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.frontend import _closed_loop, _jpeg, _multipart, _photos, _requests
from bench.gpu_summary import served_problem
from bench.machine import cpu_name, gpu_memory_mib, gpu_name
from testkit.server import running_service

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "bench" / "results" / "gpu_frontend.json"


def _export(folder: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "onnx",
            "--arch",
            "seresnet50",
            "--random-init",
            "--parity-images",
            "8",
            # Random weights miss the float16 parity gate; the float16 file is what is
            # measured, so keep it (the card says parity_gated: false).
            "--benchmark-only",
            "--out",
            str(folder),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return folder


def _photo_files(n: int) -> list[bytes]:
    photos = _photos()
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        # Different crops so that no two requests carry the same bytes.
        w, h = p.size
        k = i // len(photos)
        box = (k % 7, k % 5, w - (k % 11), h - (k % 3))
        out.append(_jpeg(p.crop(box).resize((640, 480))))
    return out


def bucket_costs(engine, arrays: list, rounds: int = 5) -> list[dict]:
    """Per bucket, after warm-up: the first run's latency (a capture would show here) against
    the median of the next ``rounds``, and the GPU memory held once the bucket has run."""
    rows = []
    for b in engine.info.batch_buckets:
        batch = (arrays * (b // max(1, len(arrays)) + 1))[:b]
        t0 = time.perf_counter()
        engine.run(batch)
        first = (time.perf_counter() - t0) * 1000
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            engine.run(batch)
            times.append((time.perf_counter() - t0) * 1000)
        rows.append(
            {
                "bucket": b,
                "first_ms": round(first, 3),
                "median_ms": round(statistics.median(times), 3),
                "gpu_memory_mib": gpu_memory_mib(),
            }
        )
    return rows


def raw_engine(
    model_dir: Path,
    provider: str,
    batch: int,
    seconds: float,
    rounds: int,
    files: list[bytes],
    precision: str = "auto",
) -> dict:
    from modelcard.preprocessing import load_array
    from service.engine.model import Engine
    from service.settings import load_settings

    settings = load_settings(
        {
            "model_dir": model_dir,
            "provider": provider,
            "max_batch_size": batch,
            "precision": precision,
        }
    )
    t0 = time.perf_counter()
    engine = Engine.load(settings.engine_config())
    memory_loaded = gpu_memory_mib()
    engine.warm_up(3)
    ready_s = time.perf_counter() - t0
    arrays = [load_array(f, engine.card.input) for f in files[:batch]]
    buckets = bucket_costs(engine, arrays)
    per_round = []
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            engine.run(arrays)
            n += 1
        per_round.append(n * batch / (time.perf_counter() - t0))
    info = engine.info.describe()
    del engine
    return {
        "images_per_s": round(statistics.median(per_round), 1),
        "rounds": [round(x, 1) for x in per_round],
        "seconds_to_ready": round(ready_s, 2),
        "gpu_memory_mib_loaded": memory_loaded,
        "buckets": buckets,
        "engine": info,
    }


def _tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree if p in stats)


def served(records: list[dict]) -> dict:
    """What the service's engine said it loaded (its 'engine loaded' and warm-up logs)."""
    loaded = [r for r in records if r.get("event") == "engine loaded"]
    return (
        {
            k: loaded[-1].get(k)
            for k in ("provider", "precision", "cuda_graphs", "graph_file", "layout", "fallbacks")
        }
        if loaded
        else {}
    )


def _load_process(
    url: str,
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    warmup: float,
    seconds: float,
    queue: multiprocessing.Queue,
) -> None:  # type: ignore[type-arg]
    run = asyncio.run(_closed_loop(url, _requests(url, bodies), concurrency, warmup, seconds))
    queue.put((run.requests, run.errors, run.latencies_ms))


def http_load(
    url: str,
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    images: int,
    warmup: float,
    seconds: float,
    processes: int,
) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    per = max(1, concurrency // processes)
    procs = [
        ctx.Process(
            target=_load_process,
            args=(url, bodies[k::processes] or bodies, per, warmup, seconds, queue),
        )
        for k in range(processes)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    requests = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[2]) or [float("nan")]
    return {
        "concurrency": per * processes,
        "images_per_request": images,
        "images_per_s": round(requests * images / seconds, 1),
        "errors": sum(r[1] for r in results),
        "p50_ms": round(lat[len(lat) // 2], 2),
        "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_frontend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="an exported SE-ResNet-50 folder (default: export one with random weights)",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load-processes", type=int, default=4)
    parser.add_argument(
        "--v2",
        action="store_true",
        help="then the Open Inference Protocol sweep on the same service: python -m bench.v2_load "
        "at concurrency 96 (Triton's published ResNet-50 setting) -> "
        "v2_load_gpu.json beside --out",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "fp16"),
        help="SERESNET_PRECISION for the raw engine and the service alike (a --benchmark-only "
        "folder's float16 file is served only when asked for by name)",
    )
    parser.add_argument(
        "--require-served",
        metavar="WHAT",
        help="fail (exit 1) unless the service serves this, e.g. fp16+graphs",
    )
    parser.add_argument("--quick", action="store_true", help="short levels, one round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    cfg = parser.parse_args(argv)
    if cfg.quick:
        cfg.seconds, cfg.rounds = 3.0, 1
    with tempfile.TemporaryDirectory(prefix="gpu-frontend-") as work:
        model_dir = cfg.model_dir or _export(Path(work) / "seresnet50")
        files = _photo_files(max(256, cfg.concurrency))
        print(f"raw engine, batch {cfg.batch} ...", flush=True)
        raw = raw_engine(
            model_dir, cfg.provider, cfg.batch, cfg.seconds, cfg.rounds, files, cfg.precision
        )
        print(f"  {raw['images_per_s']} img/s", flush=True)
        single = [_multipart([(f"{i}.jpg", f, "image/jpeg")]) for i, f in enumerate(files)]
        eight = [
            _multipart(
                [(f"{i}-{k}.jpg", files[(i + k) % len(files)], "image/jpeg") for k in range(8)]
            )
            for i in range(len(files) // 8)
        ]
        env = {
            "SERESNET_PROVIDER": cfg.provider,
            "SERESNET_MAX_BATCH_SIZE": str(cfg.batch),
            "SERESNET_MAX_QUEUE_SIZE": str(max(1024, 4 * cfg.concurrency)),
            "SERESNET_LOG_LEVEL": "info",
            "SERESNET_PRECISION": cfg.precision,
        }
        http: list[dict] = []
        t_start = time.perf_counter()
        with running_service(model_dir, env=env, ready_timeout=900, log_dir=Path(work)) as svc:
            service_ready_s = round(time.perf_counter() - t_start, 2)
            serving = served(svc.log_records())
            for _ in range(cfg.rounds):
                for bodies, images, conc in (
                    (single, 1, cfg.concurrency),
                    (eight, 8, max(1, cfg.concurrency // 8)),
                ):
                    cpu0 = _tree_cpu_seconds(svc.proc.pid)
                    row = http_load(
                        svc.url,
                        bodies,
                        conc,
                        images,
                        2.0,
                        cfg.seconds,
                        min(cfg.load_processes, conc),
                    )
                    # Warm-up seconds of the load included: an upper bound per request.
                    spent = _tree_cpu_seconds(svc.proc.pid) - cpu0
                    answered = row["images_per_s"] * cfg.seconds / images
                    row["service_cpu_ms_per_request"] = round(1000 * spent / max(1, answered), 3)
                    row["over_raw"] = round(row["images_per_s"] / raw["images_per_s"], 3)
                    http.append(row)
                    print(
                        f"  http {images} img/request, c={row['concurrency']}: "
                        f"{row['images_per_s']} img/s = {row['over_raw']:.0%} of raw, "
                        f"p99 {row['p99_ms']} ms",
                        flush=True,
                    )
            model = svc.metrics_text()
            if cfg.v2:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.v2_load",
                        "--url",
                        svc.url,
                        "--model-dir",
                        str(model_dir),
                        "--concurrency",
                        "1,32,96",
                        "--repeats",
                        "1",
                        "--duration",
                        str(cfg.seconds),
                        "--out",
                        str(cfg.out.with_name("v2_load_gpu.json")),
                    ],
                    cwd=REPO,
                    check=False,
                )
    summary = {}
    for images in (1, 8):
        rows = [r for r in http if r["images_per_request"] == images]
        summary[f"{images}_image_requests"] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in rows),
            "over_raw": statistics.median(r["over_raw"] for r in rows),
        }
    result = {
        "benchmark": "gpu_frontend",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu_name()},
        "settings": {
            "provider": cfg.provider,
            "batch": cfg.batch,
            "concurrency": cfg.concurrency,
            "seconds": cfg.seconds,
            "rounds": cfg.rounds,
        },
        "raw_engine": raw,
        "service_seconds_to_ready": service_ready_s,
        "served": serving,
        "http": http,
        "summary": summary,
        "goal": "HTTP >= 85% of the raw engine at batch 64 with 256 clients",
        "batch_size_metrics": [
            line for line in model.splitlines() if line.startswith("seresnet_inference_")
        ][:6],
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {cfg.out}")
    if cfg.require_served:
        problem = served_problem(serving, cfg.require_served)
        if problem:
            print(f"gpu_frontend: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
