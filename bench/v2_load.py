"""Load benchmark of the Open Inference Protocol route, beside ``/classify``.

bench.loadgen's closed loop (one client per simulated user, each sending its next request as
soon as the last one is answered) drives a running service over three paths at the same
concurrency, with the same images:

- ``v2_uint8``: ``/v2/models/{name}/infer`` with the model's own UINT8 tensor, preprocessed
  here as the card says (tritonclient's asyncio HTTP client, binary tensor data on) — the kind
  of input Triton's published perf_analyzer figures use;
- ``v2_bytes``: the same route with a BYTES tensor of the encoded files (the server decodes);
- ``classify``: ``POST /classify`` with the same files as multipart (httpx).

For every concurrency the three paths run in turn, in a rotating order, ``--repeats`` times;
the JSON keeps every round and reports the medians (images/s, p50/p90/p99 latency, errors) and
the ratios to ``classify``. The service must already be running:

    python -m service &                      # or any server with the V2 routes
    python -m bench.v2_load --url http://127.0.0.1:8000 --concurrency 1,8,32,96
    python -m bench.v2_load --images DIR     # real files instead of generated photos
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script, not with -m
    sys.path.insert(0, str(REPO))

import tritonclient.http.aio as triton_aio  # noqa: E402
from tritonclient.http import InferInput, InferRequestedOutput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.machine import cpu_name, gpu_name  # noqa: E402
from modelcard.preprocessing import load_array  # noqa: E402
from modelcard.schema import ModelCard, read_card  # noqa: E402
from testkit.server import EMBEDDED_MODEL  # noqa: E402

PATHS = ("v2_uint8", "v2_bytes", "classify")
DEFAULT_MODEL = EMBEDDED_MODEL
DEFAULT_OUT = REPO / "bench" / "results" / "v2_load.json"

File = tuple[str, bytes, str]  # name, bytes, content type
Send = loadgen.Send


def generated_photos(count: int, width: int, height: int) -> list[File]:
    """Photo-like JPEGs (smooth colour fields with edges), so decoding costs what it would."""
    files = []
    for i in range(count):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        r = 127 + 120 * np.sin(x / width * 6.0 + rng.uniform(0, 3))
        g = 127 + 120 * np.cos(y / height * 5.0 + rng.uniform(0, 3))
        b = np.where((x // 37 + y // 29) % 2 == 0, 40.0, 210.0)
        image = Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        files.append((f"photo{i:03d}.jpg", buf.getvalue(), "image/jpeg"))
    return files


def folder_files(folder: Path, count: int) -> list[File]:
    types = {
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
        ".webp": "image/webp",
        ".bmp": "image/bmp",
        ".gif": "image/gif",
    }
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in types)[:count]
    if not paths:
        raise SystemExit(f"no image files under {folder}")
    return [(p.name, p.read_bytes(), types[p.suffix.lower()]) for p in paths]


@dataclass
class Round:
    path: str
    concurrency: int
    seconds: float
    requests: int
    images: int
    errors: int
    images_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    first_error: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def closed_loop(
    path: str, senders: Sequence[Send], warmup_s: float, duration_s: float
) -> Round:
    """bench.loadgen's closed loop: each sender is one simulated user; a request counts when
    it finishes inside the window."""
    r = await loadgen.closed_loop(senders, warmup_s, duration_s, path)
    ms = [v * 1000 for v in r.samples]
    return Round(
        path,
        r.concurrency,
        duration_s,
        r.requests,
        r.images,
        r.errors,
        r.images_per_s,
        percentile(ms, 50),
        percentile(ms, 90),
        percentile(ms, 99),
        r.first_error,
    )


class Paths:
    """Per-user senders for each path; every user cycles through the same images."""

    def __init__(
        self,
        url: str,
        model: str,
        card: ModelCard,
        files: list[File],
        per_request: int,
        api_key: str | None,
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.host = parts.netloc
        self.ssl = parts.scheme == "https"
        self.model = model
        self.card = card
        self.files = files
        self.per_request = per_request
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The client-side preprocessing of the UINT8 path is done once, outside the timing.
        self.pixels = np.stack([load_array(data, card.input) for _, data, _ in files])
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def _batch(self, n: int) -> list[int]:
        start = (n * self.per_request) % len(self.files)
        return [(start + i) % len(self.files) for i in range(self.per_request)]

    def _triton(self) -> triton_aio.InferenceServerClient:
        client = triton_aio.InferenceServerClient(self.host, ssl=self.ssl, conn_limit=1)
        self._closers.append(client.close)
        return client

    def v2_uint8(self) -> Send:
        client = self._triton()
        outputs = [InferRequestedOutput(self.card.output.logits, binary_data=True)]

        async def send(n: int) -> int:
            batch = self.pixels[self._batch(n)]
            tensor = InferInput(
                self.card.input.tensor,
                list(batch.shape),
                "UINT8" if batch.dtype == np.uint8 else "FP32",
            )
            tensor.set_data_from_numpy(batch, binary_data=True)
            # A copy: tritonclient writes Inference-Header-Content-Length (an int) into
            # the dict it is given, which would then break the next httpx client.
            result = await client.infer(
                self.model, [tensor], outputs=outputs, headers=dict(self.headers)
            )
            return int(result.as_numpy(self.card.output.logits).shape[0])

        return send

    def v2_bytes(self) -> Send:
        client = self._triton()
        outputs = [InferRequestedOutput(self.card.output.logits, binary_data=True)]

        async def send(n: int) -> int:
            blobs = np.array([self.files[i][1] for i in self._batch(n)], dtype=np.object_)
            tensor = InferInput(self.card.input.tensor, [len(blobs)], "BYTES")
            tensor.set_data_from_numpy(blobs, binary_data=True)
            # A copy: tritonclient writes Inference-Header-Content-Length (an int) into
            # the dict it is given, which would then break the next httpx client.
            result = await client.infer(
                self.model, [tensor], outputs=outputs, headers=dict(self.headers)
            )
            return int(result.as_numpy(self.card.output.logits).shape[0])

        return send

    def classify(self) -> Send:
        client = httpx.AsyncClient(
            base_url=self.url,
            timeout=120,
            headers=dict(self.headers),
            limits=httpx.Limits(max_connections=1),
        )
        self._closers.append(client.aclose)

        async def send(n: int) -> int:
            parts = [("images", self.files[i]) for i in self._batch(n)]
            response = await client.post("/classify", params={"top_k": 5}, files=parts)
            response.raise_for_status()
            return sum("predictions" in r for r in response.json()["results"])

        return send

    async def close(self) -> None:
        for close in self._closers:
            await close()
        self._closers.clear()


async def check_server(paths: Paths) -> dict:
    """Fail early, with the reason, when the server cannot run the benchmark."""
    try:
        async with triton_aio.InferenceServerClient(paths.host, ssl=paths.ssl) as client:
            if not await client.is_server_ready(headers=paths.headers):
                raise SystemExit(f"{paths.url} is not ready")
            metadata = await client.get_model_metadata(paths.model, headers=paths.headers)
            server = await client.get_server_metadata(headers=paths.headers)
    except (OSError, InferenceServerException) as e:
        raise SystemExit(f"cannot benchmark {paths.url}: {e}") from None
    spec = paths.card.input
    expected = [-1, spec.channels, spec.height, spec.width]
    (inp,) = [i for i in metadata["inputs"] if i["name"] == spec.tensor] or [None]
    if inp is None or [int(d) for d in inp["shape"]] != expected:
        raise SystemExit(
            f"the served model's input {inp} does not match the card's "
            f"{spec.tensor} {expected}: pass --model-dir of the served model"
        )
    return {"server": server, "model": metadata}


def median_of(rounds: list[Round]) -> dict:
    def med(field: str) -> float | None:
        values = [getattr(r, field) for r in rounds if getattr(r, field) is not None]
        return statistics.median(values) if values else None

    return {
        "images_per_s": med("images_per_s"),
        "p50_ms": med("p50_ms"),
        "p90_ms": med("p90_ms"),
        "p99_ms": med("p99_ms"),
        "errors": sum(r.errors for r in rounds),
        "repeats": len(rounds),
    }


async def run(args: argparse.Namespace) -> dict:
    card = read_card(args.model_dir)
    files = (
        folder_files(args.images, args.num_images)
        if args.images
        else generated_photos(args.num_images, args.photo_width, args.photo_height)
    )
    paths = Paths(
        args.url, args.model or card.name, card, files, args.images_per_request, args.api_key
    )
    server = await check_server(paths)
    levels = []
    for concurrency in args.concurrency:
        rounds: dict[str, list[Round]] = {p: [] for p in args.paths}
        for repeat in range(args.repeats):
            # Rotate the order so that no path always runs first (or after the same one).
            order = args.paths[repeat % len(args.paths) :] + args.paths[: repeat % len(args.paths)]
            for name in order:
                senders = [getattr(paths, name)() for _ in range(concurrency)]
                try:
                    result = await closed_loop(name, senders, args.warmup, args.duration)
                finally:
                    await paths.close()
                rounds[name].append(result)
                print(
                    f"c={concurrency:<4} {name:<9} repeat {repeat + 1}/{args.repeats}: "
                    f"{result.images_per_s:9.1f} img/s  p50 {result.p50_ms or 0:8.1f} ms  "
                    f"p99 {result.p99_ms or 0:8.1f} ms  errors {result.errors}"
                    + (f" (first: {result.first_error})" if result.first_error else ""),
                    flush=True,
                )
        medians = {name: median_of(rs) for name, rs in rounds.items()}
        base = medians.get("classify", {}).get("images_per_s")
        ratios = {
            name: m["images_per_s"] / base
            for name, m in medians.items()
            if base and m["images_per_s"] is not None and name != "classify"
        }
        levels.append(
            {
                "concurrency": concurrency,
                "median": medians,
                "throughput_vs_classify": ratios,
                "rounds": {n: [asdict(r) for r in rs] for n, rs in rounds.items()},
            }
        )
    return {
        "benchmark": "bench.v2_load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "url": args.url,
        "machine": {"cpu": cpu_name(), "gpu": gpu_name(), "python": platform.python_version()},
        "server": server["server"],
        "model": {
            "name": paths.model,
            "inputs": server["model"]["inputs"],
            "outputs": server["model"]["outputs"],
        },
        "settings": {
            "paths": args.paths,
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "images_per_request": args.images_per_request,
            "images": str(args.images)
            if args.images
            else f"{len(files)} generated {args.photo_width}x{args.photo_height} JPEGs",
            "client": "tritonclient.http.aio (binary data) / httpx",
        },
        "levels": levels,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.v2_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    p.add_argument("--model", help="model name on the server (default: the card's name)")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL,
        help="folder of the served model's card, for client-side preprocessing",
    )
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument(
        "--concurrency",
        type=loadgen.positive_ints,
        default=[1, 8, 32],
        help="comma-separated levels (default 1,8,32)",
    )
    p.add_argument(
        "--paths",
        type=loadgen.names_among(PATHS),
        default=list(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)}",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds per path and level")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per round")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--images", type=Path, help="folder of image files (default: generated)")
    p.add_argument("--num-images", type=int, default=64, help="distinct images to cycle")
    p.add_argument("--photo-width", type=int, default=640)
    p.add_argument("--photo-height", type=int, default=480)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.duration <= 0 or args.warmup < 0 or args.images_per_request < 1:
        p.error("--repeats and --images-per-request must be >= 1, --duration > 0, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
