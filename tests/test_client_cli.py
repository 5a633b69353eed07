"""The client's command line where no service is needed: help, bad input, a service that is down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.__main__ import build_parser, urls_of

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_client(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=client_env(),
    )


def client_env() -> dict[str, str]:
    """This environment minus any SERESNET_* setting that could change the client's mind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERESNET_")}
    return env | {"PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it) but not
    listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs" / "Coat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return tmp_path / "imgs"


def test_help_teaches_with_examples_and_exit_codes() -> None:
    result = run_client("score", "--help")
    assert result.returncode == 0
    for text in ("examples:", "--resume", "--labels-from-dirs", "exit codes:", "@LIST"):
        assert text in result.stdout


def test_missing_inputs_are_named_and_nothing_is_written(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    result = run_client(
        "score", str(tmp_path / "nope"), "--url", "http://127.0.0.1:9", "--out", str(out)
    )
    assert result.returncode == 2
    assert "nope" in result.stderr and "no such file" in result.stderr
    assert not out.exists()


def test_existing_results_are_never_overwritten_by_accident(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text('{"path": "x.png", "predictions": []}\n')
    result = run_client("score", str(images), "--url", "http://127.0.0.1:9", "--out", str(out))
    assert result.returncode == 2
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    assert out.read_text() == '{"path": "x.png", "predictions": []}\n'


def test_resume_needs_an_output_file(images: Path) -> None:
    result = run_client(
        "score", str(images), "--url", "http://127.0.0.1:9", "--out", "-", "--resume"
    )
    assert result.returncode == 2 and "--resume needs an --out file" in result.stderr


def test_a_service_that_is_down_fails_fast_with_a_clear_message(
    images: Path, tmp_path: Path, closed_port: int
) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    out = tmp_path / "r.jsonl"
    result = run_client("score", str(images), "--url", url, "--out", str(out), "--retries", "1")
    assert result.returncode == 3
    assert f"cannot reach the service at {url}: Connection refused" in result.stderr
    assert "python -m service" in result.stderr
    assert not out.exists()  # no error row per image for a wrong URL, and no empty file


def test_a_service_that_is_down_leaves_earlier_results_as_they_were(
    images: Path, tmp_path: Path, closed_port: int
) -> None:
    out = tmp_path / "r.csv"
    out.write_text("path,true_label,status\nold.png,,ok\n")
    result = run_client(
        "score",
        str(images),
        "--url",
        f"http://127.0.0.1:{closed_port}",
        "--out",
        str(out),
        "--retries",
        "0",
        "--overwrite",
    )
    assert result.returncode == 3
    assert out.read_text() == "path,true_label,status\nold.png,,ok\n"


def test_the_url_defaults_to_the_local_service() -> None:
    args = build_parser().parse_args(["score", "photos"])
    assert urls_of(args) == ["http://127.0.0.1:8000"]  # where `make serve` listens


def test_the_url_can_come_from_the_environment(images: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    result = subprocess.run(
        [sys.executable, "-m", "client", "score", str(images), "--out", "-", "--retries", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=client_env() | {"SERESNET_URL": url},
    )
    assert result.returncode == 3
    assert f"cannot reach the service at {url}" in result.stderr


@pytest.mark.parametrize("where", ["option", "environment"])
def test_a_non_ascii_api_key_is_refused_in_one_line(
    images: Path, tmp_path: Path, closed_port: int, where: str
) -> None:
    key = "clé-secrète"
    out = tmp_path / "r.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "client",
        "score",
        str(images),
        "--out",
        str(out),
        "--url",
        f"http://127.0.0.1:{closed_port}",
    ]
    env = client_env()
    if where == "option":
        cmd += ["--api-key", key]
    else:
        env["SERESNET_API_KEY"] = key
    result = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: the API key (--api-key or SERESNET_API_KEY) has characters an HTTP header "
        "cannot carry: use printable ASCII only"
    ]
    assert not out.exists()


def test_the_client_knows_only_http() -> None:
    """No service, exporter, op library, model card code or inference runtime gets imported:
    the client must run where only httpx and tqdm are installed."""
    probe = (
        "import sys, client.__main__\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(roots & {'service', 'export', 'ops', 'modelcard', 'onnxruntime', 'torch',"
        " 'numpy', 'PIL'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
