"""Post real Fashion-MNIST test images to a running seresnet-serve and check the top-5 answer.

Used by ``scripts/container-e2e.sh`` against the container it started; standard library only,
so it runs with the host's plain ``python3`` (no virtual environment needed). The images are
the first ``--count`` images of the Fashion-MNIST test split, sent as PNG files in one
multipart request (plus one corrupt part, which must get an error entry of its own), and one
more as a raw ``image/png`` body. Exit 0 only when every check passed.

    python3 scripts/container/classify_check.py --url http://127.0.0.1:8000 \\
        --card models/fashion-seresnet/model.json --expect-provider cpu
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
TOP_K = 5


class CheckFailed(AssertionError):
    """One failed expectation, worded for the log."""


def read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    """Dimensions and raw bytes of an IDX file (the format Fashion-MNIST ships in)."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:  # unsigned bytes
        raise CheckFailed(f"{path}: not an IDX file of unsigned bytes")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def png_gray(width: int, height: int, pixels: bytes) -> bytes:
    """A minimal 8-bit grayscale PNG."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + pixels[y * width : (y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def load_samples(data_dir: Path, count: int) -> list[tuple[str, bytes, int]]:
    """(filename, PNG bytes, true class id) for the first ``count`` test images."""
    (n, h, w), pixels = read_idx(data_dir / "t10k-images-idx3-ubyte.gz")
    (n_labels,), labels = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz")
    if n != n_labels or count > n:
        raise CheckFailed(f"{data_dir}: {n} images, {n_labels} labels, {count} wanted")
    size = h * w
    return [
        (f"test-{i:05d}.png", png_gray(w, h, pixels[i * size : (i + 1) * size]), labels[i])
        for i in range(count)
    ]


def request(
    url: str, body: bytes | None = None, content_type: str | None = None, timeout: float = 60.0
) -> tuple[int, Any]:
    """(status, parsed JSON body) of a GET (no body) or POST."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def multipart(parts: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """Encode ``(filename, data, content type)`` parts, each named ``images``."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for filename, data, ctype in parts:
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def check_predictions(result: dict[str, Any], labels: list[str]) -> list[int]:
    """The predicted class ids, after checking the shape of one result entry."""
    preds = result.get("predictions")
    if not isinstance(preds, list) or len(preds) != min(TOP_K, len(labels)):
        raise CheckFailed(f"{result.get('filename')}: expected {TOP_K} predictions: {result}")
    scores = [p["score"] for p in preds]
    if scores != sorted(scores, reverse=True) or not all(0.0 <= s <= 1.0 for s in scores):
        raise CheckFailed(f"{result['filename']}: scores not descending probabilities: {scores}")
    if sum(scores) > 1.0 + 1e-4:
        raise CheckFailed(f"{result['filename']}: top-{TOP_K} scores sum to {sum(scores)} > 1")
    for p in preds:
        if not 0 <= p["class_id"] < len(labels) or labels[p["class_id"]] != p["label"]:
            raise CheckFailed(f"{result['filename']}: label/class_id disagree with the card: {p}")
    return [p["class_id"] for p in preds]


def run(url: str, card_path: Path, data_dir: Path, count: int, expect_provider: str | None) -> None:
    card = json.loads(card_path.read_text(encoding="utf-8"))
    labels: list[str] = card["labels"]
    samples = load_samples(data_dir, count)

    parts = [(name, png, "image/png") for name, png, _ in samples]
    parts.insert(count // 2, ("corrupt.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"))
    body, ctype = multipart(parts)
    status, reply = request(f"{url}/classify?top_k={TOP_K}", body, ctype)
    if status != 200:
        raise CheckFailed(f"POST /classify: HTTP {status}: {reply}")
    results = reply.get("results", [])
    if [r.get("filename") for r in results] != [p[0] for p in parts]:
        raise CheckFailed(f"results not in request order: {[r.get('filename') for r in results]}")
    corrupt = results.pop(count // 2)
    if "error" not in corrupt or "code" not in corrupt["error"]:
        raise CheckFailed(f"the corrupt image got no error entry: {corrupt}")

    top1 = top5 = 0
    for (name, _, truth), result in zip(samples, results, strict=True):
        ids = check_predictions(result, labels)
        top1 += ids[0] == truth
        top5 += truth in ids
        print(
            f"  {name}: truth {labels[truth]!r}, top-5 "
            + ", ".join(f"{p['label']} {p['score']:.3f}" for p in result["predictions"])
        )
    print(
        f"  top-1 {top1}/{count}, top-5 {top5}/{count}; corrupt part -> {corrupt['error']['code']}"
    )
    # The embedded model scores ~99.9% top-5 and ~90% top-1 on this split.
    if top5 < count - 1 or top1 < (7 * count) // 10:
        raise CheckFailed(f"answers too far from the truth: top-1 {top1}, top-5 {top5} of {count}")

    name, png, truth = samples[0]
    status, reply = request(f"{url}/classify", png, "image/png")
    if (
        status != 200
        or check_predictions(reply["results"][0], labels)[0]
        != check_predictions(results[0], labels)[0]
    ):
        raise CheckFailed(f"raw-body POST disagrees with the multipart one: {status} {reply}")

    status, meta = request(f"{url}/v2/models/{card['name']}")
    if status != 200:
        raise CheckFailed(f"GET /v2/models/{card['name']}: HTTP {status}: {meta}")
    engine = meta.get("engine", {})
    print(
        f"  /v2/models/{card['name']}: provider {engine.get('provider')} "
        f"({engine.get('provider_reason')}), graph {engine.get('graph_file')} at "
        f"{engine.get('opt_level')}, op library covers {engine.get('ops', {}).get('providers')}"
    )
    if expect_provider and engine.get("provider") != expect_provider:
        raise CheckFailed(f"expected provider {expect_provider!r}: {engine}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python3 scripts/container/classify_check.py --url "
        "http://127.0.0.1:8000 --card models/fashion-seresnet/model.json",
    )
    parser.add_argument("--url", required=True, help="service base URL (loopback only)")
    parser.add_argument("--card", type=Path, required=True, help="the served model's model.json")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DATA)),
        help="Fashion-MNIST folder (default: $FASHION_MNIST_DIR or %(default)s)",
    )
    parser.add_argument("--count", type=int, default=10, help="images to send (default 10)")
    parser.add_argument(
        "--expect-provider",
        choices=["cpu", "cuda"],
        help="fail unless the model metadata names this provider",
    )
    args = parser.parse_args(argv)
    try:
        run(args.url.rstrip("/"), args.card, args.data_dir, args.count, args.expect_provider)
    except (CheckFailed, OSError, KeyError, ValueError) as e:
        print(f"classify check FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("classify check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
