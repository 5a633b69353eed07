"""The service's front end: CPU per request and throughput, the single-process service
before the redesign against today's ingress workers around one engine process.

Side by side in one run, the same workloads against:

- ``single``: the single-process service as it was before the redesign (a git worktree of
  ``--baseline-ref``, serving its own copy of the embedded model with the same op library);
- ``workers=N``: today's service, N ingress workers around one engine process.

Measured per variant:

1. **CPU per request**: CPU seconds of every process of the service (the supervisor, each
   worker, the engine; read from /proc before and after) divided by the requests answered,
   for single-image requests of three kinds (28x28 PNG, 224x224 JPEG, 640x480 photo JPEG) and
   for 8-image requests, at a fixed concurrency;
2. **throughput and p99** of 224x224 JPEG single-image requests at concurrency 1, 16, 64, 256.

The load generator is bench.loadgen's: a minimal keep-alive HTTP/1.1 client on raw asyncio
streams sending pre-encoded requests, so that its own CPU (it shares this machine) is small;
it is reported.
Variants run one at a time, in rotating order each round; medians over rounds.

    python -m bench.frontend                      # -> bench/results/frontend.json
    python -m bench.frontend --quick              # short levels, to try the set-up
    python -m bench.frontend --variants single,1,2,4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.loadgen import closed_loop, http_request, raw_http_users
from bench.machine import cpu_name
from testkit.server import EMBEDDED_MODEL, running_service

REPO = Path(__file__).resolve().parent.parent

BASELINE_REF = "61136c6"  # the last commit of the single-process service
RESULTS = REPO / "bench" / "results" / "frontend.json"
_TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- requests


def _multipart(files: Sequence[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = "benchboundary7MA4YWxkTrZu0gW"
    parts = []
    for name, data, ctype in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{name}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    return b"".join(
        parts
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _photos() -> list[Image.Image]:
    """Real photographs when scikit-image is installed (its bundled samples), else
    photo-like synthetic images (smooth colour, edges, texture)."""
    try:
        from skimage import data

        names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
        return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    except Exception:  # optional dependency
        from testkit.images import photo

        return [photo(1000, 750, seed) for seed in range(5)]


def workloads(n: int = 64) -> dict[str, list[bytes]]:
    """Each workload: distinct pre-encoded request bodies (multipart), cycled by the load."""
    from export.fashion_mnist import load

    images, _ = load("test")
    fashion = [Image.fromarray(p, "L") for p in images[:n]]
    png28 = [_png(im) for im in fashion]
    jpeg224 = [
        _jpeg(im.resize((224, 224), Image.Resampling.BICUBIC).convert("RGB")) for im in fashion
    ]
    photo640 = [_jpeg(p.resize((640, 480), Image.Resampling.BICUBIC)) for p in _photos()]
    out: dict[str, list[tuple[bytes, str]]] = {
        "png28": [_multipart([(f"{i}.png", b, "image/png")]) for i, b in enumerate(png28)],
        "jpeg224": [_multipart([(f"{i}.jpg", b, "image/jpeg")]) for i, b in enumerate(jpeg224)],
        "photo640": [_multipart([(f"{i}.jpg", b, "image/jpeg")]) for i, b in enumerate(photo640)],
        "jpeg224x8": [
            _multipart([(f"{i}-{k}.jpg", jpeg224[(i + k) % n], "image/jpeg") for k in range(8)])
            for i in range(n // 8)
        ],
    }
    return out  # type: ignore[return-value]


def _requests(url: str, bodies: list[tuple[bytes, str]]) -> list[bytes]:
    return [http_request(url, "/classify", body, {"Content-Type": ctype}) for body, ctype in bodies]


@dataclass
class Run:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]


async def _closed_loop(
    url: str, raw: list[bytes], concurrency: int, warmup: float, duration: float
) -> Run:
    """bench.loadgen's closed loop (the one every HTTP benchmark uses) over ``raw`` requests."""
    r = await closed_loop(raw_http_users(url, raw, concurrency), warmup, duration)
    return Run(r.requests, r.errors, r.seconds, [s * 1000 for s in r.samples])


# ----------------------------------------------------------------------------- CPU


def _tree(pid: int) -> list[int]:
    out = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += _tree(int(child))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and every live descendant."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------- variants


@contextlib.contextmanager
def baseline_tree(ref: str) -> Iterator[Path]:
    """A git worktree of the single-process service."""
    folder = Path(tempfile.mkdtemp(prefix="seresnet-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), ref],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)], cwd=REPO, capture_output=True
        )


def _ops_library() -> str:
    import ops

    return str(ops.library_path())


@contextlib.contextmanager
def serve(variant: str, baseline: Path | None, log_dir: Path) -> Iterator[tuple[str, int]]:
    env = {
        "SERESNET_PROVIDER": "cpu",
        "SERESNET_OPS_LIBRARY": _ops_library(),
        "SERESNET_LOG_LEVEL": "warning",
    }
    if variant == "single":
        assert baseline is not None
        command = [
            sys.executable,
            "-m",
            "service",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model-dir",
            str(baseline / "models" / "fashion-seresnet"),
        ]
        env["SERESNET_LOG_LEVEL"] = "info"  # the launcher waits for its "listening" line
        with (
            _in_dir(baseline),
            running_service(None, env=env, command=command, log_dir=log_dir) as svc,
        ):
            yield svc.url, svc.proc.pid
    else:
        env["SERESNET_WORKERS"] = variant
        env["SERESNET_LOG_LEVEL"] = "info"
        with running_service(EMBEDDED_MODEL, env=env, log_dir=log_dir) as svc:
            yield svc.url, svc.proc.pid


@contextlib.contextmanager
def _in_dir(folder: Path) -> Iterator[None]:
    # serverutil starts the process in the repo root; the baseline must run from its tree.
    from testkit import server as serverutil

    old = serverutil.REPO_ROOT
    serverutil.REPO_ROOT = folder
    try:
        yield
    finally:
        serverutil.REPO_ROOT = old


def measure_variant(
    variant: str,
    baseline: Path | None,
    bodies: dict[str, list],
    cfg: argparse.Namespace,
    log_dir: Path,
) -> dict:
    out: dict[str, dict] = {"cpu": {}, "throughput": {}}
    with serve(variant, baseline, log_dir) as (url, pid):
        for name, items in bodies.items():
            raw = _requests(url, items)
            cpu0, self0 = tree_cpu_seconds(pid), _self_cpu()
            run = asyncio.run(_closed_loop(url, raw, cfg.cpu_concurrency, 0.0, cfg.duration))
            cpu1, self1 = tree_cpu_seconds(pid), _self_cpu()
            images = run.requests * (8 if name.endswith("x8") else 1)
            out["cpu"][name] = {
                "requests": run.requests,
                "errors": run.errors,
                "service_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, run.requests), 3),
                "service_cpu_ms_per_image": round((cpu1 - cpu0) * 1000 / max(1, images), 3),
                "client_cpu_ms_per_request": round(
                    (self1 - self0) * 1000 / max(1, run.requests), 3
                ),
                "images_per_s": round(images / run.seconds, 1),
            }
            row = out["cpu"][name]
            print(
                f"  {variant:>7} cpu   {name:<10} {row['service_cpu_ms_per_request']:7.3f}"
                f" ms/request  {row['images_per_s']:8.1f} img/s",
                flush=True,
            )
        raw = _requests(url, bodies["jpeg224"])
        for c in cfg.concurrency:
            run = asyncio.run(_closed_loop(url, raw, c, cfg.warmup, cfg.duration))
            lat = np.asarray(run.latencies_ms or [float("nan")])
            out["throughput"][str(c)] = {
                "images_per_s": round(run.requests / run.seconds, 1),
                "errors": run.errors,
                "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            t = out["throughput"][str(c)]
            print(
                f"  {variant:>7} c={c:<4} {t['images_per_s']:8.1f} img/s  p50 {t['p50_ms']:7.2f}"
                f"  p99 {t['p99_ms']:8.2f} ms  errors {t['errors']}",
                flush=True,
            )
    return out


def _median(rounds: list[dict]) -> dict:
    """Per variant, the median over rounds of every number."""

    def med(values: list) -> object:
        if isinstance(values[0], dict):
            return {k: med([v[k] for v in values]) for k in values[0]}
        return round(statistics.median(values), 3)

    return med(rounds)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.frontend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--variants",
        default="single,1,2,4",
        help="'single' (the baseline) and worker counts (default %(default)s)",
    )
    parser.add_argument(
        "--baseline-ref",
        default=BASELINE_REF,
        help="git commit of the single-process service (default %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--cpu-concurrency", type=int, default=16)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s levels")
    parser.add_argument("--out", type=Path, default=RESULTS)
    cfg = parser.parse_args(argv)
    cfg.concurrency = [int(c) for c in cfg.concurrency.split(",")]
    if cfg.quick:
        cfg.rounds, cfg.duration, cfg.warmup = 1, 2.0, 0.5
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    bodies = workloads()
    per_variant: dict[str, list[dict]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        baseline = (
            stack.enter_context(baseline_tree(cfg.baseline_ref)) if "single" in variants else None
        )
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fe-")))
        for r in range(cfg.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            print(f"round {r + 1}/{cfg.rounds}: {', '.join(order)}", flush=True)
            for v in order:
                per_variant[v].append(measure_variant(v, baseline, bodies, cfg, log_dir))
    medians = {v: _median(rs) for v, rs in per_variant.items()}
    result = {
        "benchmark": "frontend",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "rounds": cfg.rounds,
            "duration_s": cfg.duration,
            "cpu_concurrency": cfg.cpu_concurrency,
            "baseline_ref": cfg.baseline_ref,
            "model": "models/fashion-seresnet",
            "provider": "cpu",
        },
        "medians": medians,
        "ratios_vs_single": {
            v: {
                name: round(
                    medians["single"]["cpu"][name]["service_cpu_ms_per_request"]
                    / max(1e-9, m["cpu"][name]["service_cpu_ms_per_request"]),
                    2,
                )
                for name in m["cpu"]
            }
            for v, m in medians.items()
            if v != "single" and "single" in medians
        },
        "rounds": {v: rs for v, rs in per_variant.items()},
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {cfg.out}")
    print(
        json.dumps(
            {
                "medians": {
                    v: {
                        "cpu_ms_per_request": {
                            k: x["service_cpu_ms_per_request"] for k, x in m["cpu"].items()
                        },
                        "throughput": m["throughput"],
                    }
                    for v, m in medians.items()
                }
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
