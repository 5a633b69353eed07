"""The key hostile-traffic cases against two trees side by side: this one and a git ref (the
tree before the limits), each run as a real one-worker service with a bystander classifying a
small image on the same worker. Per case and tree: the answer, the attack's time, the
bystander's worst latency and the peak RSS of the largest service process. Writes JSON under
bench/results/.

    .venv/bin/python -m bench.hostile --baseline-ref 3c545d4 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

import testkit.hostile_files as bombs
from modelcard.schema import read_card
from testkit.attack import attack
from testkit.server import EMBEDDED_MODEL, REPO_ROOT, ServiceProcess, running_service

CARD = read_card(EMBEDDED_MODEL)
ENV = {
    "SERESNET_WORKERS": "1",
    "SERESNET_MAX_BODY_BYTES": str(32 * 2**20),
    "SERESNET_PREPROCESS_THREADS": "2",
    "SERESNET_REQUEST_TIMEOUT_S": "10",
}
Send = Callable[[httpx.Client], httpx.Response]


@contextlib.contextmanager
def tree(ref: str | None) -> Iterator[Path]:
    """This checkout (None) or ``ref`` extracted to a temporary folder (no git state touched)."""
    if ref is None:
        yield REPO_ROOT
        return
    with tempfile.TemporaryDirectory(prefix="hostile-base-") as folder:
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", ref], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        yield Path(folder)


def service(root: Path) -> contextlib.AbstractContextManager[ServiceProcess]:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0"]
    command += ["--model-dir", str(root / "models" / EMBEDDED_MODEL.name)]
    shell = f"cd {shlex.quote(str(root))} && exec {shlex.join(command)}"
    return running_service(None, env=ENV, command=["sh", "-c", shell])


def post(url: str, body: bytes, headers: dict[str, str]) -> Send:
    return lambda client: client.post(url, content=body, headers=headers)


def raw_exchange(svc: ServiceProcess, request: bytes) -> httpx.Response:
    """Send ``request`` as bytes; the first answer's status line and body as a Response."""
    parts = urlsplit(svc.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":", 1)[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        None,
                    )
                    if length is not None and len(rest) >= length:
                        break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return httpx.Response(status, content=data.partition(b"\r\n\r\n")[2])


def cases(svc: ServiceProcess, input_name: str, shape: list[int]) -> dict[str, tuple[Send, int]]:
    """name -> (send, copies at once)."""
    infer = f"{svc.url}/v2/models/{CARD.name}/infer"
    head = json.dumps(
        {"inputs": [{"name": input_name, "shape": [1], "datatype": "UINT8", "data": 0}]}
    )
    lists = head.replace('"data": 0', '"data": [' + ",".join(["[0]"] * 8_000_000) + "]").encode()
    raw = {"Content-Type": "application/octet-stream"}
    host = urlsplit(svc.url).netloc.encode()
    one = [1, *shape[1:]]  # a valid one-image tensor: only the timeout is out of range
    pixels = [0] * (one[1] * one[2] * one[3])
    timeout_body = json.dumps(
        {"inputs": [{"name": input_name, "shape": one, "datatype": "UINT8", "data": pixels}]}
    )
    timeout_body = timeout_body[:-1] + ', "parameters": {"timeout": 1' + "0" * 400 + "}}"
    return {
        "v2-8M-one-element-lists (31 MiB)": (post(infer, lists, {}), 1),
        "v2-8M-lists-gzip (x4)": (
            post(infer, gzip.compress(lists, 9), {"Content-Encoding": "gzip"}),
            4,
        ),
        "jpeg-progressive-1000-scans": (
            post(f"{svc.url}/classify", bombs.progressive_jpeg_scans(6000, 1000), raw),
            1,
        ),
        "bmp-rle8-eol (x4)": (post(f"{svc.url}/classify", bombs.bmp_rle8_eol(), raw), 4),
        "png16-gray-6324": (post(f"{svc.url}/classify", bombs.png16_gray(6324), raw), 1),
        "header-100KiB-one-write": (
            lambda _c: raw_exchange(
                svc,
                b"GET /v2/health/live HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n"
                % (host, b"a" * 100 * 1024),
            ),
            1,
        ),
        "url-40KB": (
            lambda _c: raw_exchange(
                svc, b"GET /%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (b"a" * 40_000, host)
            ),
            1,
        ),
        "v2-timeout-10^400": (
            post(infer, timeout_body.encode(), {"Content-Type": "application/json"}),
            1,
        ),
        "head-health-ready": (lambda c: c.head(f"{svc.url}/v2/health/ready"), 1),
    }


def tolerant(send: Send) -> Send:
    """``send``, with a transport failure (a reset, a close without an answer) as status 0."""

    def wrapped(client: httpx.Client) -> httpx.Response:
        try:
            return send(client)
        except httpx.HTTPError:
            return httpx.Response(0)

    return wrapped


def run_tree(
    ref: str | None, repeats: int, only: list[str] | None
) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    with tree(ref) as root, service(root) as svc:
        meta = httpx.get(f"{svc.url}/v2/models/{CARD.name}", timeout=30).json()
        tensor = meta["inputs"][0]
        for name, (send, copies) in cases(svc, str(tensor["name"]), tensor["shape"]).items():
            if only and not any(word in name for word in only):
                continue
            for _ in range(repeats):
                got = attack(svc, tolerant(send), copies=copies, settle_s=1.0, strict=False)
                out.setdefault(name, []).append(
                    {
                        "answers": sorted(r.status_code for r in got.answers),
                        "seconds": round(got.seconds, 2),
                        "bystander_max_s": round(got.bystander_max_s, 2),
                        "peak_rss_mb": round(got.worst_rss_mb),
                    }
                )
                time.sleep(1.0)
    return out


def summary(runs: list[dict[str, object]]) -> dict[str, object]:
    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)  # type: ignore[arg-type]

    return {
        "answers": runs[-1]["answers"],
        "seconds": med("seconds"),
        "bystander_max_s": med("bystander_max_s"),
        "peak_rss_mb": med("peak_rss_mb"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-ref", default="3c545d4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run the cases whose name holds a word")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args()
    results = {
        "before": run_tree(args.baseline_ref, args.repeats, args.only),
        "after": run_tree(None, args.repeats, args.only),
    }
    table = {
        name: {side: summary(results[side][name]) for side in ("before", "after")}
        for name in results["after"]
    }
    record = {"baseline_ref": args.baseline_ref, "repeats": args.repeats, "env": ENV}
    record |= {"medians": table, "runs": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hostile-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    for name, sides in table.items():
        print(f"{name:36} before {sides['before']}\n{'':36} after  {sides['after']}")
    print(path)


if __name__ == "__main__":
    main()
