"""Load benchmark of the service, side by side with a naive baseline.

Part 1 — the embedded model over HTTP. bench.loadgen's closed loop (one keep-alive connection
per simulated client, each sending its next request as soon as the last one is answered) drives
``python -m service`` and ``python -m bench.naive_server`` (FastAPI + PyTorch eager, one image
per request, no batching) in turn with the same real files: Fashion-MNIST test images upscaled
to 224x224 JPEG and the original 28x28 PNGs, alternating; then a few large photos. For each
concurrency it reports images/s and p50/p90/p99 latency, and for the service the batch-size
distribution read from its own /metrics; ratios service/naive are given per concurrency.
With ``--baseline-env SERESNET_X=V`` the baseline is the service itself with those settings
(a before/after of one setting, side by side in one run) instead of the naive server.

Part 2 — SE-ResNet-50 at 224x224 (random weights, exported into a temporary folder): images/s
of the raw engine (service.engine.Engine.run on preprocessed arrays, batch B) against images/s
through HTTP when the service runs batches of B (concurrency 2B, single-image requests).

Servers run one at a time (they would fight for the cores otherwise); the load generator shares
the machine with them, and its own CPU use is reported.

    python -m bench.load                       # both parts -> bench/results/service_load.json
    python -m bench.load --quick               # short levels, to try the set-up
    python -m bench.load --skip-resnet50 --concurrency 1,8,32 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.loadgen import closed_loop, http_request, percentiles, raw_http_users
from bench.machine import cpu_name
from service import metrics as M
from testkit.server import EMBEDDED_MODEL, running_service

REPO = Path(__file__).resolve().parent.parent

Upload = tuple[str, bytes, str]  # filename, bytes, content type


# ----------------------------------------------------------------------------- images


def fashion_files(folder: Path, count: int) -> list[Upload]:
    """Fashion-MNIST test images as files: 224x224 JPEG (RGB) and the 28x28 PNG, alternating."""
    from export.fashion_mnist import load

    images, _ = load("test")
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Upload] = []
    for i, pixels in enumerate(images[:count]):
        small = Image.fromarray(pixels, "L")
        if i % 2 == 0:
            path = folder / f"fm{i:05d}.jpg"
            small.resize((224, 224), Image.Resampling.BICUBIC).convert("RGB").save(path, quality=90)
            out.append((path.name, path.read_bytes(), "image/jpeg"))
        else:
            path = folder / f"fm{i:05d}.png"
            small.save(path)
            out.append((path.name, path.read_bytes(), "image/png"))
    return out


def photo_files(folder: Path, count: int = 6) -> list[Upload]:
    """Large photo-like JPEGs (1600x1200 and 4000x3000): smooth colour fields, edges and fine
    texture, so decoding costs what a camera photo costs."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Upload] = []
    for i in range(count):
        w, h = (1600, 1200) if i % 2 == 0 else (4000, 3000)
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 127 + 100 * np.sin(x / w * 7 + i) + rng.normal(0, 12, (h, w))
        g = 127 + 100 * np.cos(y / h * 5 + i) + rng.normal(0, 12, (h, w))
        b = np.where(((x // 90) + (y // 70)) % 2 == 0, 60.0, 190.0) + rng.normal(0, 12, (h, w))
        rgb = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
        path = folder / f"photo{i}_{w}x{h}.jpg"
        Image.fromarray(rgb, "RGB").save(path, quality=88)
        out.append((path.name, path.read_bytes(), "image/jpeg"))
    return out


# ----------------------------------------------------------------------------- load


@dataclass
class Level:
    server: str
    workload: str
    concurrency: int
    images_per_request: int
    seconds: float
    requests: int
    images: int
    errors: int
    images_per_s: float
    latency_ms: dict[str, float]
    client_cpu_cores: float
    batching: dict | None = None
    load_avg_1m: float = 0.0


def multipart_bodies(
    files: Sequence[Upload],
    per_request: int,
) -> list[tuple[bytes, dict[str, str]]]:
    """Every request body encoded once up front, so the load generator spends its (shared)
    CPU on sending, not on encoding: consecutive groups of ``per_request`` files."""
    out = []
    for start in range(0, len(files), per_request):
        group = [files[(start + m) % len(files)] for m in range(per_request)]
        request = httpx.Request("POST", "http://x/classify", files=[("images", f) for f in group])
        out.append((request.read(), {"Content-Type": request.headers["Content-Type"]}))
    return out


async def _closed_loop(
    url: str,
    files: Sequence[Upload],
    concurrency: int,
    warmup: float,
    duration: float,
    per_request: int,
) -> tuple[list[float], int, int, float]:
    """(latencies of requests finished in the window, images ok, errors, window seconds):
    bench.loadgen's closed loop, one keep-alive connection per simulated user."""
    raw = [
        http_request(url, "/classify", body, headers)
        for body, headers in multipart_bodies(files, per_request)
    ]
    r = await closed_loop(raw_http_users(url, raw, concurrency, per_request), warmup, duration)
    return r.samples, r.images, r.errors, duration


INFERENCES = f"{M.INFERENCE_COUNT}_total"
EXECUTIONS = f"{M.INFERENCE_EXEC_COUNT}_total"


def _histogram(text: str) -> dict[str, float]:
    """Cumulative ``le`` buckets of seresnet_batch_size, and the inference/exec counters."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{M.BATCH_SIZE}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[f"le_{le}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{M.REQUEST_DURATION_SECONDS}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[f"req_{le}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith((f"{INFERENCES}{{", f"{EXECUTIONS}{{")):
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def batching_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """Batch-size distribution between two scrapes: runs per size range, and the mean."""
    images = after[INFERENCES] - before[INFERENCES]
    runs = after[EXECUTIONS] - before[EXECUTIONS]
    edges = sorted(
        (k for k in after if k.startswith("le_")), key=lambda k: float(k[3:].replace("+Inf", "inf"))
    )
    dist: dict[str, int] = {}
    prev_edge, prev_count = 0.0, 0.0
    for k in edges:
        edge = float(k[3:].replace("+Inf", "inf"))
        count = after[k] - before.get(k, 0.0)
        span = (
            f"{int(prev_edge) + 1}"
            if edge == prev_edge + 1
            else (
                f"{int(prev_edge) + 1}-{int(edge)}"
                if edge != float("inf")
                else f">{int(prev_edge)}"
            )
        )
        if count - prev_count:
            dist[span] = int(count - prev_count)
        prev_edge, prev_count = edge, count
    return {
        "model_runs": int(runs),
        "images_run": int(images),
        "mean_batch_size": round(images / runs, 2) if runs else None,
        "runs_by_batch_size": dist,
        "server_request_ms_at_most": _server_quantiles(before, after),
    }


def _server_quantiles(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """p50/p99 of the service's own request duration (handler start to response), as the
    upper edge of the histogram bucket they fall in: what the server adds, without the
    client's and the connection's share."""
    edges = sorted(
        (k for k in after if k.startswith("req_") and k != "req_+Inf"), key=lambda k: float(k[4:])
    )
    total = after.get("req_+Inf", 0.0) - before.get("req_+Inf", 0.0)
    out: dict[str, float] = {}
    for q in (0.5, 0.99):
        for k in edges:
            if total and after[k] - before.get(k, 0.0) >= q * total:
                out[f"p{round(q * 100)}"] = float(k[4:]) * 1000
                break
    return out


def run_level(
    server: str,
    url: str,
    workload: str,
    files: Sequence[Upload],
    concurrency: int,
    warmup: float,
    duration: float,
    per_request: int = 1,
    metrics_url: str | None = None,
) -> Level:
    before = _histogram(httpx.get(metrics_url).text) if metrics_url else None
    load = round(os.getloadavg()[0], 2)
    cpu0 = time.process_time()
    latencies, images, errors, window = asyncio.run(
        _closed_loop(url, files, concurrency, warmup, duration, per_request)
    )
    cpu = time.process_time() - cpu0
    batching = None
    if metrics_url and before is not None:
        batching = batching_delta(before, _histogram(httpx.get(metrics_url).text))
    level = Level(
        server,
        workload,
        concurrency,
        per_request,
        round(window, 2),
        len(latencies),
        images,
        errors,
        round(images / window, 1),
        percentiles(latencies),
        round(cpu / (warmup + duration), 2),
        batching,
        load,
    )
    lat = level.latency_ms
    print(
        f"  {server:<8} {workload:<10} c={concurrency:<3} {level.images_per_s:>8.1f} img/s  "
        f"p50 {lat.get('p50', 0):>7.1f}  p99 {lat.get('p99', 0):>7.1f} ms  errors {errors}"
        + (f"  mean batch {batching['mean_batch_size']}" if batching else ""),
        flush=True,
    )
    return level


# ----------------------------------------------------------------------------- parts


@dataclass
class Config:
    model_dir: Path
    concurrency: list[int]
    warmup: float
    duration: float
    photo_concurrency: list[int]
    resnet50_batch: int
    resnet50_duration: float
    rounds: int = 2
    service_env: dict[str, str] = field(default_factory=dict)
    baseline_env: dict[str, str] = field(default_factory=dict)  # empty: the naive server


def part_embedded(cfg: Config, work: Path, skip_naive: bool) -> dict:
    """Both servers stay up; each level runs on the service and then on the naive server, so
    a change in the machine's background load hits both alike."""
    mixed = fashion_files(work / "fashion", 512)
    photos = photo_files(work / "photos")
    levels: list[Level] = []
    print(f"part 1: {cfg.model_dir} ({len(mixed)} Fashion-MNIST files, {len(photos)} photos)")
    naive_cmd = [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model-dir",
        str(cfg.model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    with contextlib.ExitStack() as stack:
        svc = stack.enter_context(running_service(cfg.model_dir, env=cfg.service_env, log_dir=work))
        if cfg.baseline_env:
            baseline_env = {**cfg.service_env, **cfg.baseline_env}
            naive = stack.enter_context(
                running_service(cfg.model_dir, env=baseline_env, log_dir=work)
            )
        else:
            naive = (
                None
                if skip_naive
                else stack.enter_context(running_service(None, command=naive_cmd, log_dir=work))
            )
        other = "baseline" if cfg.baseline_env else "naive"
        with_metrics = {"service": svc, other: naive if cfg.baseline_env else None}
        engine = httpx.get(f"{svc.url}/v2/models/{_model_name(cfg.model_dir)}").json()["engine"]
        if engine.get("ops", {}).get("path"):  # where it was installed says nothing of the run
            engine["ops"]["path"] = Path(engine["ops"]["path"]).name
        plan = [("fashion", mixed, c) for c in cfg.concurrency] + [
            ("photos", photos, c) for c in cfg.photo_concurrency
        ]
        for r in range(cfg.rounds):
            for workload, files, c in plan:
                servers = [("service", svc)] + ([(other, naive)] if naive else [])
                for name, server in servers if r % 2 == 0 else servers[::-1]:
                    levels.append(
                        run_level(
                            name,
                            server.url,
                            workload,
                            files,
                            c,
                            cfg.warmup,
                            cfg.duration,
                            metrics_url=(
                                f"{with_metrics[name].url}/metrics" if with_metrics[name] else None
                            ),
                        )
                    )
        levels.append(
            run_level(
                "service",
                svc.url,
                "fashion",
                mixed,
                8,
                cfg.warmup,
                cfg.duration,
                per_request=8,
                metrics_url=f"{svc.url}/metrics",
            )
        )
    return {
        "engine": engine,
        "levels": [asdict(lv) for lv in levels],
        "side_by_side": _side_by_side(levels, other),
    }


def _median_level(levels: list[Level]) -> Level:
    """The round with the median images/s, the lower middle one for an even count (so its
    latencies belong to the same run)."""
    ranked = sorted(levels, key=lambda lv: lv.images_per_s)
    return ranked[(len(ranked) - 1) // 2]


def _side_by_side(levels: list[Level], other: str = "naive") -> list[dict]:
    """Per workload and concurrency: the median round of the service and of ``other`` (the
    naive server, or the service with --baseline-env), and the ratios."""
    groups: dict[tuple, list[Level]] = {}
    for lv in levels:
        groups.setdefault(
            (lv.server, lv.workload, lv.concurrency, lv.images_per_request), []
        ).append(lv)
    rows = []
    for (server, workload, c, per), runs in sorted(groups.items()):
        other_runs = groups.get((other, workload, c, 1))
        if server != "service" or per != 1 or not other_runs:
            continue
        svc, base = _median_level(runs), _median_level(other_runs)
        if not base.images_per_s or not svc.latency_ms or not base.latency_ms:
            continue
        rows.append(
            {
                "workload": workload,
                "concurrency": c,
                "rounds": len(runs),
                "service_images_per_s": svc.images_per_s,
                f"{other}_images_per_s": base.images_per_s,
                "throughput_ratio": round(svc.images_per_s / base.images_per_s, 2),
                "service_p50_ms": svc.latency_ms["p50"],
                f"{other}_p50_ms": base.latency_ms["p50"],
                "service_p99_ms": svc.latency_ms["p99"],
                f"{other}_p99_ms": base.latency_ms["p99"],
                "p99_ratio": round(svc.latency_ms["p99"] / base.latency_ms["p99"], 2),
                "service_batching": svc.batching,
                f"{other}_batching": base.batching,
            }
        )
    return rows


def _relative(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (results travel)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _model_name(model_dir: Path) -> str:
    return json.loads((model_dir / "model.json").read_text())["name"]


def part_resnet50(cfg: Config, work: Path) -> dict:
    """Raw engine vs HTTP for SE-ResNet-50 at 224x224, at the same batch size."""
    from modelcard.preprocessing import load_array
    from service.engine.model import Engine
    from service.settings import load_settings

    folder = work / "seresnet50"
    print(f"part 2: exporting a random-weight SE-ResNet-50 to {folder} ...", flush=True)
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
            "--out",
            str(folder),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    b = cfg.resnet50_batch
    files = fashion_files(work / "fashion224", 64)[::2]  # the 224x224 JPEGs
    env = {
        "SERESNET_MAX_BATCH_SIZE": str(b),
        "SERESNET_MAX_QUEUE_DELAY_MS": "100",
        **cfg.service_env,
    }
    settings = load_settings(
        {
            "model_dir": folder,
            "provider": "cpu",
            "max_batch_size": b,
            "graph": env.get("SERESNET_GRAPH"),
        }
    )
    engine = Engine.load(settings.engine_config())
    engine.warm_up(2)
    arrays = [load_array(data, engine.card.input) for _, data, _ in files]
    batches = [arrays[i : i + b] for i in range(0, len(arrays) - b + 1, b)]
    raw_runs: list[dict] = []
    http_runs: list[Level] = []

    def raw_round() -> None:
        times: list[float] = []
        t_end = time.perf_counter() + cfg.resnet50_duration
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            engine.run(batches[len(times) % len(batches)])
            times.append(time.perf_counter() - t0)
        ips = b * len(times) / sum(times)
        raw_runs.append(
            {
                "runs": len(times),
                "images_per_s": round(ips, 2),
                "median_batch_ms": round(statistics.median(times) * 1000, 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
        print(
            f"  raw engine  se50-224   batch {b}: {ips:8.2f} img/s (median "
            f"{raw_runs[-1]['median_batch_ms']} ms per batch)",
            flush=True,
        )

    # The service idles while the raw engine runs and the other way round; rounds alternate
    # so that the machine's background load hits both alike.
    with running_service(folder, env=env, log_dir=work) as svc:
        for r in range(cfg.rounds + 1):
            if r % 2 == 0:
                raw_round()
            http_runs.append(
                run_level(
                    "service",
                    svc.url,
                    "se50-224",
                    files,
                    2 * b,
                    cfg.warmup * 2,
                    cfg.resnet50_duration,
                    metrics_url=f"{svc.url}/metrics",
                )
            )
            if r % 2 == 1:
                raw_round()
    raw_ips = statistics.median(run["images_per_s"] for run in raw_runs)
    http = _median_level(http_runs)
    return {
        "batch_size": b,
        "graph": engine.info.graph,
        "opt_level": engine.info.opt_level,
        "raw_engine_images_per_s": raw_ips,
        "http_images_per_s": http.images_per_s,
        "http_over_raw": round(http.images_per_s / raw_ips, 3),
        "raw_rounds": raw_runs,
        "http_rounds": [asdict(lv) for lv in http_runs],
    }


def machine() -> dict:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, default=EMBEDDED_MODEL)
    p.add_argument(
        "--concurrency",
        default="1,4,16,64",
        help="closed-loop clients per level (default: %(default)s)",
    )
    p.add_argument("--photo-concurrency", default="4", help="levels for large photos")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--resnet50-batch", type=int, default=8)
    p.add_argument(
        "--resnet50-duration",
        type=float,
        default=12.0,
        help="seconds per raw-engine or HTTP round of part 2",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds per level, alternating which server goes first; the median "
        "round is reported (default: %(default)s)",
    )
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="SERESNET_X=V",
        help="compare against the service with this setting (repeatable) instead of the "
        "naive server, e.g. SERESNET_BATCH_WAIT=always",
    )
    p.add_argument("--skip-resnet50", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 s levels, c=1,16, short part 2")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="SERESNET_X=V",
        help="extra service setting for every run (repeatable)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "service_load.json")
    args = p.parse_args(argv)
    cfg = Config(
        model_dir=args.model_dir,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        warmup=args.warmup,
        duration=args.duration,
        photo_concurrency=[int(c) for c in args.photo_concurrency.split(",") if c],
        resnet50_batch=args.resnet50_batch,
        resnet50_duration=args.resnet50_duration,
        service_env=dict(e.split("=", 1) for e in args.env),
        baseline_env=dict(e.split("=", 1) for e in args.baseline_env),
        rounds=args.rounds,
    )
    if args.quick:
        cfg.concurrency, cfg.duration, cfg.warmup, cfg.rounds = [1, 16], 2.0, 1.0, 1
        cfg.resnet50_duration = 5.0
    result: dict = {
        "benchmark": "service_load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": {**asdict(cfg), "model_dir": _relative(cfg.model_dir)},
    }
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        result["embedded"] = part_embedded(cfg, work, args.skip_naive)
        if not args.skip_resnet50:
            result["seresnet50_224"] = part_resnet50(cfg, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    for row in result["embedded"]["side_by_side"]:
        print(
            f"  {row['workload']:<8} c={row['concurrency']:<3} service/baseline images/s "
            f"{row['throughput_ratio']:>5}x   p99 ratio {row['p99_ratio']}"
        )
    if "seresnet50_224" in result:
        print(f"  SE-ResNet-50 224: HTTP/raw engine = {result['seresnet50_224']['http_over_raw']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
