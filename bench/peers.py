"""This service beside the servers a user would pick instead, on this machine, same traffic.

Every server runs the same ONNX graph (the file the service's engine serves, with the SE op
library when it is the fused one) through ONNX Runtime on the CPU, with the same Pillow decode
and card preprocessing (modelcard.preprocessing, see bench/peers_serve/), and answers 224x224
JPEG single-image requests sent by bench.loadgen's closed loop (one keep-alive connection per
user) at each concurrency. Batching is on where the server has it (max batch 32, delay 5 ms):

- ``service``: ``python -m service`` (default workers), ``POST /classify`` with the JPEG body;
- ``kserve``: the KServe model server, 2 workers, v1 protocol with a base64 JSON instance (its
  documented form for images; its Python server has no batcher);
- ``torchserve``: TorchServe, 2 workers, TorchServe's batcher, ``POST /predictions/peer``;
- ``mlserver``: MLServer, 2 parallel workers, its adaptive batching, the Open Inference
  Protocol with the JPEG base64 in JSON (its codec for binary data over REST);
- ``triton``: Triton Inference Server (bundled by ``nvidia-pytriton``), its C++ front end and
  dynamic batcher, two Python model instances through PyTriton, the Open Inference Protocol
  with the binary data extension.

Correctness first: every peer's top-1 must agree with the service's on the same images, or the
peer is reported and left out. Then rounds: each round runs every concurrency on every server
(the servers in a rotating order, one at a time; the others idle), and the JSON keeps every
round and the medians.

Each peer lives in its own virtual environment under ``--peers-dir`` (default
``$SERESNET_PEERS_DIR``, else ``~/.cache/seresnet-peers``); a peer whose environment is missing
is skipped with the command that makes it (``scripts/peers-setup.sh``).

    scripts/peers-setup.sh                     # once: a venv per peer
    python -m bench.peers                      # -> bench/results/peers.json
    python -m bench.peers --quick --peers service,kserve
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import loadgen
from bench.machine import cpu_name
from testkit.server import (
    EMBEDDED_MODEL,
    ServiceProcess,
    running_service,
    start_service,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
SETUP = "scripts/peers-setup.sh"
MAX_BATCH, DELAY_MS = 32, 5


def peers_dir(arg: Path | None) -> Path:
    default = os.environ.get("SERESNET_PEERS_DIR") or Path.home() / ".cache" / "seresnet-peers"
    return Path(arg or default)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpegs(count: int) -> list[bytes]:
    """224x224 JPEGs: Fashion-MNIST test images upscaled (what the embedded model knows),
    else photo-like noise when the data set is not at hand."""
    out = []
    try:
        from export.fashion_mnist import load

        images, _ = load("test")
        sources = [Image.fromarray(p, "L").convert("RGB") for p in images[:count]]
    except Exception:
        rng = np.random.default_rng(0)
        sources = [
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(count)
        ]
    for image in sources:
        buf = io.BytesIO()
        image.resize((224, 224), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@dataclass
class Served:
    """A running server: how to build one request for a JPEG and read the top-1 of its reply."""

    url: str
    request: Callable[[bytes], bytes]
    top1: Callable[[bytes], int]
    process: ServiceProcess | None = None


# ----------------------------------------------------------------------------- servers


def _service_top1(body: bytes) -> int:
    return int(json.loads(body)["results"][0]["predictions"][0]["class_id"])


@contextlib.contextmanager
def serve_service(model_dir: Path, work: Path) -> Iterator[Served]:
    env = {"SERESNET_MAX_BATCH_SIZE": str(MAX_BATCH)}
    with running_service(model_dir, env=env, log_dir=work) as svc:
        url = svc.url

        def request(jpeg: bytes) -> bytes:
            return loadgen.http_request(
                url, "/classify?top_k=1", jpeg, {"Content-Type": "image/jpeg"}
            )

        yield Served(url, request, _service_top1, svc)


@contextlib.contextmanager
def _peer_process(
    cmd: list[str], env: dict[str, str], work: Path, port: int, ready: str, timeout_s: float
) -> Iterator[ServiceProcess]:
    """A peer's server process on ``port``, once ``ready`` answers 200."""
    with start_service(None, env=env, log_dir=work, command=cmd) as proc:
        proc.url = f"http://127.0.0.1:{port}"
        wait_until(proc, ready, time.monotonic() + timeout_s)
        yield proc


def _why(e: Exception) -> str:
    """The last error line of a failed start: the reason, without a traceback of local paths."""
    lines = [ln.strip() for ln in str(e).splitlines() if re.match(r"\s*\w+(Error|Exception)\b", ln)]
    return f"{type(e).__name__}: {lines[-1] if lines else str(e)[-300:]}"


def _peer_env(model_dir: Path, graph: str) -> dict[str, str]:
    env = {"PEER_MODEL_DIR": str(model_dir), "PEER_REPO": str(REPO), "PYTHONPATH": str(REPO)}
    env["PEER_MODEL_FILE"] = "model.se.onnx" if graph == "fused" else "model.onnx"
    if graph == "fused":
        import ops

        env["PEER_OPS_LIBRARY"] = str(ops.library_path())
    return env


@contextlib.contextmanager
def serve_kserve(venv: Path, model_dir: Path, graph: str, work: Path) -> Iterator[Served]:
    port = free_port()
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        "bench.peers_serve.kserve_server",
        "--http_port",
        str(port),
        "--grpc_port",
        str(free_port()),
        "--workers",
        "2",
        "--model_name",
        "peer",
    ]
    with _peer_process(
        cmd, _peer_env(model_dir, graph), work, port, "/v2/health/ready", 180
    ) as proc:
        url = proc.url

        def request(jpeg: bytes) -> bytes:
            body = json.dumps({"instances": [{"b64": base64.b64encode(jpeg).decode()}]}).encode()
            return loadgen.http_request(
                url, "/v1/models/peer:predict", body, {"Content-Type": "application/json"}
            )

        yield Served(url, request, lambda body: int(json.loads(body)["predictions"][0]), proc)


@contextlib.contextmanager
def serve_torchserve(venv: Path, model_dir: Path, graph: str, work: Path) -> Iterator[Served]:
    store = work / "torchserve-store"
    store.mkdir(exist_ok=True)
    subprocess.run(
        [
            str(venv / "bin" / "torch-model-archiver"),
            "--model-name",
            "peer",
            "--version",
            "1.0",
            "--handler",
            str(REPO / "bench" / "peers_serve" / "torchserve_handler.py"),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
    )
    port, management, metrics = free_port(), free_port(), free_port()
    models = {
        "peer": {
            "1.0": {
                "defaultVersion": True,
                "marName": "peer.mar",
                "minWorkers": 2,
                "maxWorkers": 2,
                "batchSize": MAX_BATCH,
                "maxBatchDelay": DELAY_MS,
                "responseTimeout": 120,
            }
        }
    }
    config = work / "torchserve.properties"
    config.write_text(
        f"inference_address=http://127.0.0.1:{port}\n"
        f"management_address=http://127.0.0.1:{management}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\n"
        "disable_system_metrics=true\n"
        "install_py_dep_per_model=false\n"
        "load_models=peer.mar\n"
        f"models={json.dumps(models)}\n"
    )
    cmd = [
        str(venv / "bin" / "torchserve"),
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--model-store",
        str(store),
        "--ts-config",
        str(config),
    ]
    env = {**_peer_env(model_dir, graph), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(work / "torchserve-logs")
    with contextlib.ExitStack() as stack:
        # torchserve runs the JVM as a child that outlives a signalled launcher: stop it the
        # documented way (its pid file) whatever happens.
        stack.callback(
            subprocess.run,
            [str(venv / "bin" / "torchserve"), "--stop"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = stack.enter_context(start_service(None, env=env, log_dir=work, command=cmd))
        proc.url = f"http://127.0.0.1:{port}"
        wait_until(proc, "/ping", time.monotonic() + 180)
        # /ping is up before the workers: wait for the model itself.
        deadline = time.monotonic() + 180
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{management}/models/peer", timeout=5).json()
                if (
                    all(w.get("status") == "READY" for w in info[0]["workers"])
                    and info[0]["workers"]
                ):
                    break
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            if time.monotonic() > deadline or proc.proc.poll() is not None:
                log = [ln for ln in proc.log_text().splitlines() if "ACCESS_LOG" not in ln]
                raise RuntimeError("torchserve workers not ready:\n" + "\n".join(log[-40:]))
            time.sleep(0.5)
        url = proc.url

        def request(jpeg: bytes) -> bytes:
            return loadgen.http_request(
                url, "/predictions/peer", jpeg, {"Content-Type": "image/jpeg"}
            )

        yield Served(url, request, lambda body: int(json.loads(body)), proc)


@contextlib.contextmanager
def serve_mlserver(venv: Path, model_dir: Path, graph: str, work: Path) -> Iterator[Served]:
    port = free_port()
    folder = work / "mlserver"
    (folder / "peer").mkdir(parents=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,  # its parallel workers fail to start beside uvloop (1.7.1)
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model = {
        "name": "peer",
        "implementation": "bench.peers_serve.mlserver_runtime.Peer",
        "max_batch_size": MAX_BATCH,
        "max_batch_time": DELAY_MS / 1000,
    }
    (folder / "peer" / "model-settings.json").write_text(json.dumps(model))
    cmd = [str(venv / "bin" / "mlserver"), "start", str(folder)]
    with _peer_process(
        cmd, _peer_env(model_dir, graph), work, port, "/v2/models/peer/ready", 180
    ) as proc:
        url = proc.url

        def request(jpeg: bytes) -> bytes:
            tensor = {
                "name": "image",
                "shape": [1, 1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(jpeg).decode()],
            }
            body = json.dumps({"inputs": [tensor]}).encode()
            return loadgen.http_request(
                url, "/v2/models/peer/infer", body, {"Content-Type": "application/json"}
            )

        yield Served(url, request, _v2_json_top1, proc)


@contextlib.contextmanager
def serve_triton(venv: Path, model_dir: Path, graph: str, work: Path) -> Iterator[Served]:
    port = free_port()
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        "bench.peers_serve.triton_server",
        "--http-port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--max-batch",
        str(MAX_BATCH),
        "--delay-ms",
        str(DELAY_MS),
    ]
    with _peer_process(
        cmd, _peer_env(model_dir, graph), work, port, "/v2/models/peer/ready", 240
    ) as proc:
        url = proc.url

        def request(jpeg: bytes) -> bytes:
            # The binary data extension: the JSON header, then the BYTES element (a 4-byte
            # little-endian length and the JPEG).
            header = {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(jpeg) + 4},
                    }
                ],
                "outputs": [{"name": "top1", "parameters": {"binary_data": False}}],
            }
            head = json.dumps(header).encode()
            body = head + len(jpeg).to_bytes(4, "little") + jpeg
            return loadgen.http_request(
                url,
                "/v2/models/peer/infer",
                body,
                {
                    "Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(len(head)),
                },
            )

        yield Served(url, request, _v2_json_top1, proc)


def _v2_json_top1(body: bytes) -> int:
    return int(json.loads(body)["outputs"][0]["data"][0])


PEERS: dict[str, Callable[[Path, Path, str, Path], contextlib.AbstractContextManager[Served]]] = {
    "kserve": serve_kserve,
    "torchserve": serve_torchserve,
    "mlserver": serve_mlserver,
    "triton": serve_triton,
}


# ----------------------------------------------------------------------------- measuring


def _cpu_seconds(proc: ServiceProcess | None) -> float | None:
    """CPU seconds of the server's process tree (utime + stime of it and its descendants)."""
    if proc is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [proc.proc.pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


async def _agree(served: Served, images: list[bytes]) -> list[int]:
    """The server's top-1 for each image, one request at a time."""
    reader_top1: list[int] = []

    def check(status: int, body: bytes) -> None:
        if status != 200:
            raise loadgen.HttpError(f"HTTP {status}: {body[:200]!r}")
        reader_top1.append(served.top1(body))

    users = loadgen.raw_http_users(served.url, [served.request(j) for j in images], 1, check=check)
    for n in range(len(images)):
        await users[0](n)
    return reader_top1


def measure(served: Served, images: list[bytes], c: int, warmup: float, seconds: float) -> dict:
    raw = [served.request(j) for j in images]
    cpu0 = _cpu_seconds(served.process)
    r = loadgen.run(loadgen.raw_http_users(served.url, raw, c), warmup, seconds)
    cpu1 = _cpu_seconds(served.process)
    out = r.as_dict()
    if cpu0 is not None and cpu1 is not None and r.requests:
        # CPU over warm-up and window, per request of the window scaled to that span.
        out["server_cpu_ms_per_request"] = round(
            (cpu1 - cpu0) * 1000 / (r.requests * (warmup + seconds) / seconds), 3
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--peers", default="service,kserve,torchserve,mlserver,triton")
    p.add_argument("--peers-dir", type=Path, default=None)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs (and agreement set)")
    p.add_argument("--quick", action="store_true", help="1 round of 3 s, 64 images")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "peers.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.images = 1, 3.0, 1.0, 64
    levels = [int(c) for c in args.concurrency.split(",")]
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    venvs = peers_dir(args.peers_dir)
    images = jpegs(args.images)
    result: dict = {
        "benchmark": "peers",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "concurrency": levels,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "images": len(images),
            "max_batch": MAX_BATCH,
            "delay_ms": DELAY_MS,
        },
        "skipped": {},
        "agreement": {},
        "rounds": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        servers: dict[str, Served] = {}
        svc = stack.enter_context(serve_service(args.model_dir, work))
        servers["service"] = svc
        name = json.loads((args.model_dir / "model.json").read_text())["name"]
        engine = httpx.get(f"{svc.url}/v2/models/{name}", timeout=30).json()["engine"]
        graph = str(engine.get("graph", "unfused"))
        result["graph"] = graph
        print(f"service serves the {graph} graph; peers get the same file", flush=True)
        for peer in names:
            if peer == "service":
                continue
            venv = venvs / peer
            if peer not in PEERS:
                raise SystemExit(f"unknown peer {peer!r} ({', '.join(PEERS)})")
            if not (venv / "bin" / "python").exists():
                why = f"no virtual environment at {venv}: make it with {SETUP} {peer}"
                result["skipped"][peer] = why
                print(f"skipping {peer}: {why}", flush=True)
                continue
            start = PEERS[peer]
            pwork = work / peer
            pwork.mkdir()
            try:
                servers[peer] = stack.enter_context(start(venv, args.model_dir, graph, pwork))
            except Exception as e:
                result["skipped"][peer] = f"did not start: {_why(e)}"
                print(f"skipping {peer}: did not start ({type(e).__name__})", flush=True)
        reference = asyncio.run(_agree(svc, images))
        for peer in list(servers):
            if peer == "service":
                continue
            try:
                theirs = asyncio.run(_agree(servers[peer], images))
            except Exception as e:
                theirs = []
                print(f"{peer}: agreement check failed: {e}", flush=True)
            same = sum(a == b for a, b in zip(reference, theirs, strict=False))
            result["agreement"][peer] = {"images": len(images), "same_top1": same}
            print(f"{peer}: top-1 agrees with the service on {same}/{len(images)}", flush=True)
            if same != len(images):
                result["skipped"][peer] = f"top-1 disagrees on {len(images) - same} images"
                del servers[peer]
        order = list(servers)
        for r in range(args.rounds):
            turn = order[r % len(order) :] + order[: r % len(order)]
            for c in levels:
                for peer in turn:
                    m = measure(servers[peer], images, c, args.warmup, args.duration)
                    m.update(server=peer, round=r)
                    result["rounds"].append(m)
                    lat = m["latency_ms"]
                    print(
                        f"round {r + 1} c={c:<3} {peer:<11} {m['requests_per_s']:8.1f} req/s  "
                        f"p50 {lat.get('p50', 0):7.2f}  p99 {lat.get('p99', 0):7.2f} ms  "
                        f"cpu {m.get('server_cpu_ms_per_request', '-')} ms/req  "
                        f"errors {m['errors']}",
                        flush=True,
                    )
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["table"] = table(result["rounds"], order, levels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(markdown(result["table"], levels))
    return 0


def table(rounds: list[dict], order: list[str], levels: list[int]) -> list[dict]:
    """Per server and concurrency: medians over rounds of req/s, p50, p99, CPU per request;
    and req/s over the best other server's."""
    rows = []
    for peer in order:
        for c in levels:
            mine = [m for m in rounds if m["server"] == peer and m["concurrency"] == c]

            def med(key: str, runs: list[dict] = mine) -> float | None:
                values = [
                    m["latency_ms"][key] if key in ("p50", "p99") else m.get(key) for m in runs
                ]
                values = [v for v in values if v is not None]
                return round(statistics.median(values), 3) if values else None

            rows.append(
                {
                    "server": peer,
                    "concurrency": c,
                    "rounds": len(mine),
                    "requests_per_s": med("requests_per_s"),
                    "p50_ms": med("p50"),
                    "p99_ms": med("p99"),
                    "cpu_ms_per_request": med("server_cpu_ms_per_request"),
                    "errors": sum(m["errors"] for m in mine),
                }
            )
    for row in rows:
        others = [
            o["requests_per_s"]
            for o in rows
            if o["concurrency"] == row["concurrency"] and o["server"] != row["server"]
        ]
        best = max((o for o in others if o), default=None)
        if best and row["requests_per_s"]:
            row["vs_best_other"] = round(row["requests_per_s"] / best, 2)
    return rows


def markdown(rows: list[dict], levels: list[int]) -> str:
    head = "| server | " + " | ".join(f"c={c} req/s · p50 · p99 ms · CPU ms/req" for c in levels)
    lines = [head + " |", "|---" * (len(levels) + 1) + "|"]
    for peer in dict.fromkeys(r["server"] for r in rows):
        cells = []
        for c in levels:
            (r,) = [x for x in rows if x["server"] == peer and x["concurrency"] == c]
            cells.append(
                f"{r['requests_per_s']} · {r['p50_ms']} · {r['p99_ms']} · {r['cpu_ms_per_request']}"
            )
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if shutil.which("java") is None:
        print("note: no java on PATH; torchserve will be skipped if asked for", file=sys.stderr)
    sys.exit(main())
