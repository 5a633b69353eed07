"""The Open Inference Protocol over gRPC beside HTTP: req/s, latency and the service's CPU per
request, at the same concurrency, with the same images, through the same service.

bench.loadgen's closed loop drives one service (started here, both protocols on, or any
running one with ``--url``/``--grpc`` and ``--service-pid``) over four paths, one image per
request unless told otherwise, each user with a connection (channel) of its own:

- ``http_uint8`` / ``grpc_uint8``: the model's UINT8 tensor, preprocessed here once
  (tritonclient.http.aio with binary tensor data / tritonclient.grpc.aio, raw contents);
- ``http_bytes`` / ``grpc_bytes``: the encoded JPEGs as BYTES (the server decodes).

Service CPU per request is the user + system CPU of the service's whole process tree
(supervisor, workers, engine) during the counting window, over the requests counted in it.
Paths run in a rotating order, ``--repeats`` times per level; the JSON keeps every round and
the medians.

    python -m bench.grpc_load                              # starts the embedded model
    python -m bench.grpc_load --concurrency 1,16,64 --repeats 3 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script, not with -m
    sys.path.insert(0, str(REPO))

import tritonclient.grpc.aio as grpc_aio  # noqa: E402
import tritonclient.http.aio as http_aio  # noqa: E402
from tritonclient import grpc as grpc_client  # noqa: E402
from tritonclient import http as http_client  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.frontend import tree_cpu_seconds  # noqa: E402
from bench.machine import cpu_name, gpu_name  # noqa: E402
from modelcard.preprocessing import load_array  # noqa: E402
from modelcard.schema import ModelCard, read_card  # noqa: E402
from testkit.images import encode, photo  # noqa: E402
from testkit.server import EMBEDDED_MODEL, free_port, running_service  # noqa: E402

PATHS = ("http_uint8", "grpc_uint8", "http_bytes", "grpc_bytes")
DEFAULT_OUT = REPO / "bench" / "results" / "grpc_load.json"
FILES_INPUT = "image_files"


def photos(count: int, width: int, height: int) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields with edges), so decoding costs what it would."""
    return [encode(photo(width, height, seed=i), "JPEG", quality=90) for i in range(count)]


class Paths:
    """Per-user senders of each path; every user cycles through the same images."""

    def __init__(
        self, http: str, grpc: str, card: ModelCard, files: list[bytes], per_request: int
    ) -> None:
        self.http, self.grpc = http, grpc
        self.card = card
        self.model = card.name
        self.files = files
        self.per_request = per_request
        self.pixels = np.stack([load_array(f, card.input) for f in files])
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def _batch(self, n: int) -> list[int]:
        start = (n * self.per_request) % len(self.files)
        return [(start + i) % len(self.files) for i in range(self.per_request)]

    def _tensor(self, module, n: int):  # type: ignore[no-untyped-def]
        batch = self.pixels[self._batch(n)]
        tensor = module.InferInput(self.card.input.tensor, list(batch.shape), "UINT8")
        if module is http_client:
            tensor.set_data_from_numpy(batch, binary_data=True)
        else:
            tensor.set_data_from_numpy(batch)
        return tensor

    def _files(self, module, n: int):  # type: ignore[no-untyped-def]
        blobs = np.array([self.files[i] for i in self._batch(n)], dtype=np.object_)
        tensor = module.InferInput(FILES_INPUT, [len(blobs)], "BYTES")
        if module is http_client:
            tensor.set_data_from_numpy(blobs, binary_data=True)
        else:
            tensor.set_data_from_numpy(blobs)
        return tensor

    def _sender(self, protocol: str, make) -> loadgen.Send:  # type: ignore[no-untyped-def]
        logits = self.card.output.logits
        if protocol == "http":
            client = http_aio.InferenceServerClient(self.http.removeprefix("http://"), conn_limit=1)
            outputs = [http_client.InferRequestedOutput(logits, binary_data=True)]
            module = http_client
        else:
            client = grpc_aio.InferenceServerClient(self.grpc)
            outputs = [grpc_client.InferRequestedOutput(logits)]
            module = grpc_client
        self._closers.append(client.close)

        async def send(n: int) -> int:
            result = await client.infer(self.model, [make(module, n)], outputs=outputs)
            return int(result.as_numpy(logits).shape[0])

        return send

    def sender(self, path: str) -> loadgen.Send:
        protocol, kind = path.split("_")
        return self._sender(protocol, self._tensor if kind == "uint8" else self._files)

    async def close(self) -> None:
        for close in self._closers:
            await close()
        self._closers.clear()


async def measured_round(
    paths: Paths, path: str, concurrency: int, warmup_s: float, duration_s: float, pid: int
) -> dict:
    """One closed-loop round, with the service tree's CPU over exactly the counting window."""
    senders = [paths.sender(path) for _ in range(concurrency)]
    cpu: list[float] = []

    async def watch() -> None:
        await asyncio.sleep(warmup_s)
        cpu.append(tree_cpu_seconds(pid))
        await asyncio.sleep(duration_s)
        cpu.append(tree_cpu_seconds(pid))

    try:
        result, _ = await asyncio.gather(
            loadgen.closed_loop(senders, warmup_s, duration_s, path), watch()
        )
    finally:
        await paths.close()
    row = result.as_dict()
    spent = cpu[1] - cpu[0]
    row["service_cpu_s"] = round(spent, 3)
    row["service_cpu_ms_per_request"] = (
        round(spent * 1000 / result.requests, 3) if result.requests else None
    )
    return row


def _median(rows: list[dict], key: Callable[[dict], float | None]) -> float | None:
    values = [v for v in map(key, rows) if v is not None]
    return round(statistics.median(values), 3) if values else None


async def sweep(args: argparse.Namespace, http: str, grpc: str, pid: int) -> list[dict]:
    card = read_card(args.model_dir)
    paths = Paths(http, grpc, card, photos(args.num_images, 640, 480), args.images_per_request)
    levels = []
    for concurrency in args.concurrency:
        rounds: dict[str, list[dict]] = {p: [] for p in args.paths}
        for repeat in range(args.repeats):
            order = args.paths[repeat % len(args.paths) :] + args.paths[: repeat % len(args.paths)]
            for path in order:
                row = await measured_round(
                    paths, path, concurrency, args.warmup, args.duration, pid
                )
                rounds[path].append(row)
                print(
                    f"c={concurrency:<3} {path:<11} {repeat + 1}/{args.repeats}: "
                    f"{row['requests_per_s']:8.1f} req/s  p99 "
                    f"{row['latency_ms'].get('p99', 0):7.1f} ms  service CPU "
                    f"{row['service_cpu_ms_per_request'] or 0:6.2f} ms/req  "
                    f"errors {row['errors']}"
                    + (f" ({row['first_error']})" if row["errors"] else ""),
                    flush=True,
                )
        medians = {
            path: {
                "requests_per_s": _median(rs, lambda r: r["requests_per_s"]),
                "p50_ms": _median(rs, lambda r: r["latency_ms"].get("p50")),
                "p99_ms": _median(rs, lambda r: r["latency_ms"].get("p99")),
                "service_cpu_ms_per_request": _median(
                    rs, lambda r: r["service_cpu_ms_per_request"]
                ),
                "errors": sum(r["errors"] for r in rs),
            }
            for path, rs in rounds.items()
        }
        levels.append({"concurrency": concurrency, "median": medians, "rounds": rounds})
    return levels


@contextlib.contextmanager
def service(args: argparse.Namespace) -> Iterator[tuple[str, str, int]]:
    if args.url:
        if not (args.grpc and args.service_pid):
            raise SystemExit("--url needs --grpc HOST:PORT and --service-pid PID too")
        yield args.url, args.grpc, args.service_pid
        return
    env = {"SERESNET_GRPC_PORT": str(free_port()), "SERESNET_WORKERS": str(args.workers)}
    with running_service(args.model_dir, env=env) as svc:
        (listening,) = [r for r in svc.log_records() if r.get("event") == "listening"]
        yield svc.url, str(listening["grpc"]), svc.proc.pid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.grpc_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="a running service's HTTP URL (default: start one here)")
    p.add_argument("--grpc", help="its gRPC HOST:PORT (with --url)")
    p.add_argument("--service-pid", type=int, help="its supervisor's pid (with --url)")
    p.add_argument("--model-dir", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--workers", type=int, default=1, help="SERESNET_WORKERS of the started one")
    p.add_argument("--concurrency", type=loadgen.positive_ints, default=[1, 16, 64])
    p.add_argument("--paths", type=loadgen.names_among(PATHS), default=list(PATHS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per round")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--num-images", type=int, default=32, help="distinct images to cycle")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--repeats >= 1, --duration > 0, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with service(args) as (http, grpc, pid):
        levels = asyncio.run(sweep(args, http, grpc, pid))
    report = {
        "benchmark": "bench.grpc_load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_name(), "gpu": gpu_name(), "python": platform.python_version()},
        "settings": {
            "paths": args.paths,
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "images_per_request": args.images_per_request,
            "workers": None if args.url else args.workers,
            "images": f"{args.num_images} generated 640x480 JPEGs",
            "clients": "tritonclient.http.aio (binary data) / tritonclient.grpc.aio, one "
            "connection per user, on the same machine",
        },
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
