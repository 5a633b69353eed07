"""The scoring client split over processes (--shard I/N) and spread over replicas (several
--url), end to end: the real client (a subprocess) against real ``python -m service``
processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from imagesamples import encode
from PIL import Image
from serverutil import EMBEDDED_MODEL, REPO_ROOT, ServiceProcess, running_service

N_IMAGES = 90
ENV = {"SERESNET_WORKERS": "1", "SERESNET_MAX_BATCH_SIZE": "8"}


def client(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERESNET_")}
    return subprocess.run(
        [sys.executable, "-m", "client", "score", *args],
        cwd=REPO_ROOT,
        env=env | {"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(7)
    files = []
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        path = root / f"{i:03d}.png"
        path.write_bytes(encode(Image.fromarray(pixels, "L"), "PNG"))
        files.append(path)
    return files


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    with (
        running_service(EMBEDDED_MODEL, env=ENV) as a,
        running_service(EMBEDDED_MODEL, env=ENV) as b,
    ):
        yield a, b


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_shards_split_the_job_and_resume_refuses_another_shard(
    images: list[Path], replicas: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    url = replicas[0].url
    folder = str(images[0].parent)
    parts = []
    for i in range(3):
        out = tmp_path / f"part-{i}.jsonl"
        run = client(folder, "--url", url, "--out", str(out), "--shard", f"{i}/3", "--quiet")
        assert run.returncode == 0, run.stderr
        got = rows(out)
        assert got and all(r["shard"] == f"{i}/3" and "predictions" in r for r in got)
        parts.append({r["path"] for r in got})
    every = {str(p) for p in images}
    assert set().union(*parts) == every
    assert sum(len(p) for p in parts) == len(every)  # disjoint
    assert all(len(p) < N_IMAGES for p in parts)

    # The same shard again with --resume: nothing new, nothing twice.
    out0 = tmp_path / "part-0.jsonl"
    again = client(folder, "--url", url, "--out", str(out0), "--shard", "0/3", "--resume")
    assert again.returncode == 0, again.stderr
    assert len(rows(out0)) == len(parts[0])

    before = out0.read_bytes()
    other = client(folder, "--url", url, "--out", str(out0), "--shard", "1/3", "--resume")
    assert other.returncode == 2
    assert "--shard 0/3" in other.stderr, other.stderr
    unsharded = client(folder, "--url", url, "--out", str(out0), "--resume")
    assert unsharded.returncode == 2 and "--shard 0/3" in unsharded.stderr
    assert out0.read_bytes() == before

    plain = tmp_path / "plain.csv"
    assert client(str(images[0]), "--url", url, "--out", str(plain)).returncode == 0
    refused = client(
        str(images[0]), "--url", url, "--out", str(plain), "--resume", "--shard", "0/2"
    )
    assert refused.returncode == 2 and "without --shard" in refused.stderr, refused.stderr


@pytest.mark.parametrize("bad", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_a_bad_shard_is_a_usage_error(bad: str, images: list[Path], tmp_path: Path) -> None:
    run = client(str(images[0]), f"--shard={bad}", "--out", str(tmp_path / "x.jsonl"))
    assert run.returncode == 2 and run.stderr.startswith("error: --shard"), run.stderr


def test_several_urls_spread_the_job_and_skip_a_dead_one(
    images: list[Path],
    replicas: tuple[ServiceProcess, ServiceProcess],
    closed_url: str,
    tmp_path: Path,
) -> None:
    a, b = replicas
    before = [svc.metric("seresnet_inference_count_total") for svc in replicas]
    out = tmp_path / "spread.jsonl"
    run = client(
        str(images[0].parent),
        *("--url", closed_url, "--url", a.url, "--url", b.url),
        *("--out", str(out), "--batch-size", "5", "--concurrency", "2", "--retries", "1"),
    )
    assert run.returncode == 0, run.stderr
    got = rows(out)
    assert sorted(r["path"] for r in got) == sorted(str(p) for p in images)
    assert all("predictions" in r for r in got)
    assert f"skipping {closed_url}" in run.stderr
    after = [svc.metric("seresnet_inference_count_total") for svc in replicas]
    served = [n - b0 for n, b0 in zip(after, before, strict=True)]
    assert sum(served) == N_IMAGES
    assert min(served) >= N_IMAGES / 4, served  # round-robin: both replicas took a share


def test_no_url_that_serves_is_a_service_error(
    images: list[Path], closed_url: str, tmp_path: Path
) -> None:
    run = client(
        str(images[0]),
        "--url",
        closed_url,
        "--url",
        closed_url + "/",
        "--retries",
        "0",
        "--out",
        str(tmp_path / "none.jsonl"),
    )
    assert run.returncode == 3, run.stderr


def test_a_sharded_csv_records_its_shard_in_a_column(
    images: list[Path], replicas: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    url, folder, out = replicas[0].url, str(images[0].parent), tmp_path / "part.csv"
    first = client(folder, "--url", url, "--out", str(out), "--shard", "1/2", "--quiet")
    assert first.returncode == 0, first.stderr
    header, *lines = out.read_text().splitlines()
    assert header.split(",")[-1] == "shard" and all(line.endswith(",1/2") for line in lines)
    again = client(folder, "--url", url, "--out", str(out), "--shard", "1/2", "--resume")
    assert again.returncode == 0 and out.read_text().count("\n") == len(lines) + 1
    other = client(folder, "--url", url, "--out", str(out), "--shard", "0/2", "--resume")
    assert other.returncode == 2 and "--shard 1/2" in other.stderr, other.stderr
