"""The batch scoring client end to end: the real client (a subprocess) against a real
``python -m service`` with the embedded model on 127.0.0.1, sometimes through a small real HTTP
proxy that delays requests or answers 503 for a while."""

from __future__ import annotations

import csv
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort
import pytest

from modelcard import load_array
from modelcard.schema import UNFUSED_FILE, read_card
from testkit.fashion import LABELS, FashionTest, class_folder, fashion_test
from testkit.images import png
from testkit.server import EMBEDDED_MODEL, REPO_ROOT, ServiceProcess, running_service

pytestmark = pytest.mark.e2e

N_IMAGES = 200  # CPU is shared: enough for every class, small enough to score in seconds
MAX_IMAGES_PER_REQUEST = 8  # below the client's --batch-size in some tests: it must split


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    env = {"SERESNET_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES_PER_REQUEST)}
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        yield svc


@dataclass
class LabelledFolder:
    root: Path
    files: list[Path]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, fashion: FashionTest) -> LabelledFolder:
    """The first N_IMAGES Fashion-MNIST test images as PNGs in class folders."""
    root = tmp_path_factory.mktemp("fashion")
    return LabelledFolder(root, sorted(fashion.save_pngs(root, range(N_IMAGES), by_class=True)))


def client_command(path: Path, url: str, out: Path, options: str = "", *extra: str) -> list[str]:
    """``python -m client score PATH --url URL --out OUT`` plus ``options`` (plain flags,
    split on spaces) and ``extra`` arguments (paths, passed as they are)."""
    return [
        sys.executable,
        "-m",
        "client",
        "score",
        str(path),
        "--url",
        url,
        "--out",
        str(out),
        *options.split(),
        *extra,
    ]


def run_client(
    path: Path, url: str, out: Path, options: str = "", *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_command(path, url, out, options, *extra),
        cwd=REPO_ROOT,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERESNET_")}
    return env | {"PYTHONPATH": str(REPO_ROOT)}


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON Lines result file; for a CSV one, each line's cells by column."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- a real proxy


class Proxy:
    """A tiny HTTP/1.1 proxy in front of the service: answers ``503`` + ``Retry-After`` to the
    first ``fail_first`` classify requests (or all, with ``fail_first=-1``) and to the first
    ``unready_first`` readiness probes, delays each classify request by ``delay_s``, and
    forwards everything else unchanged."""

    def __init__(
        self, upstream: str, fail_first: int = 0, delay_s: float = 0.0, unready_first: int = 0
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.fail_first = fail_first
        self.unready_first = unready_first
        self.delay_s = delay_s
        self.refused = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with proxy._lock:
                    unready = self.path == "/v2/health/ready" and proxy.unready_first > 0
                    proxy.unready_first -= unready
                if unready:
                    self._refuse(b'{"error": {"code": "not_ready", "message": "warming up"}}')
                else:
                    proxy._forward(self, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with proxy._lock:
                    refuse = proxy.fail_first < 0 or proxy.refused < proxy.fail_first
                    proxy.refused += refuse
                if refuse:
                    self._refuse(b'{"error": {"code": "queue_full", "message": "busy (proxy)"}}')
                    return
                time.sleep(proxy.delay_s)
                proxy._forward(self, body)

            def _refuse(self, payload: bytes) -> None:
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {
                k: v
                for k, v in handler.headers.items()
                if k.lower() in ("content-type", "content-length", "authorization")
            }
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        with self._lock:
            self.forwarded += handler.command == "POST"
        handler.send_response(response.status)
        for name in ("Content-Type", "Retry-After"):
            if response.getheader(name):
                handler.send_header(name, response.getheader(name))
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the tests


def _reference(files: list[Path]) -> np.ndarray:
    """Class ids ranked by the unfused model in ONNX Runtime, preprocessed as the service
    does (the shared modelcard code), for each file: [n, classes]."""
    card = read_card(EMBEDDED_MODEL)
    session = ort.InferenceSession(
        str(EMBEDDED_MODEL / UNFUSED_FILE), providers=["CPUExecutionProvider"]
    )
    batch = np.stack([load_array(f.read_bytes(), card.input) for f in files])
    (logits,) = session.run([card.output.logits], {card.input.tensor: batch})
    return np.argsort(-logits, axis=1, kind="stable")


def test_reported_accuracy_equals_a_direct_onnx_runtime_run(
    service: ServiceProcess, labelled: LabelledFolder, tmp_path: Path
) -> None:
    out, summary_path = tmp_path / "r.jsonl", tmp_path / "summary.json"
    result = run_client(
        labelled.root,
        service.url,
        out,
        f"--labels-from-dirs --batch-size {2 * MAX_IMAGES_PER_REQUEST} --concurrency 2",
        "--summary-json",
        str(summary_path),
    )
    assert result.returncode == 0, result.stderr
    # Twice the service's per-request limit: refused once, then sent in halves.
    assert f"sending at most {MAX_IMAGES_PER_REQUEST}" in result.stderr
    summary = json.loads(summary_path.read_text())
    rows = {Path(r["path"]): r for r in read_rows(out)}
    assert sorted(rows) == labelled.files  # every image once, nothing else

    ranked = _reference(labelled.files)
    card = read_card(EMBEDDED_MODEL)
    class_of = {class_folder(label): i for i, label in enumerate(LABELS)}
    truth = [class_of[f.parent.name] for f in labelled.files]
    top1 = int(sum(ranked[i, 0] == t for i, t in enumerate(truth)))
    top5 = int(sum(t in ranked[i, :5] for i, t in enumerate(truth)))
    acc = summary["accuracy"]
    assert (acc["images"], acc["top1_correct"], acc["top5_correct"]) == (N_IMAGES, top1, top5)
    assert acc["top1"] == pytest.approx(top1 / N_IMAGES)
    for i, f in enumerate(labelled.files):
        predicted = [p["class_id"] for p in rows[f]["predictions"]]
        assert predicted[0] == ranked[i, 0], f
        assert rows[f]["predictions"][0]["label"] == card.labels[ranked[i, 0]]
        # The class the folder stands for (Ankle_boot/ is "Ankle boot"), not the folder name.
        assert rows[f]["true_label"] == card.labels[truth[i]]
    assert summary["complete"] and summary["job"]["errors"] == 0
    assert summary["models"][0]["name"] == card.name
    assert len(summary["per_class"]) == 10
    assert {"Ankle boot", "T-shirt/top"} <= set(summary["per_class"])
    assert f"top-1 {top1 / N_IMAGES:.2%}" in result.stdout


@pytest.mark.parametrize(
    ("sig", "fmt"),
    [(signal.SIGINT, "jsonl"), (signal.SIGKILL, "csv")],
    ids=["SIGINT-jsonl", "SIGKILL-csv"],
)
def test_resume_after_a_kill_mid_run(
    service: ServiceProcess,
    labelled: LabelledFolder,
    tmp_path: Path,
    sig: signal.Signals,
    fmt: str,
) -> None:
    out = tmp_path / f"r.{fmt}"  # the format follows the extension
    log = tmp_path / "client.log"
    options = "--labels-from-dirs --batch-size 4"
    # A slow proxy keeps the first run going long enough to be stopped in the middle.
    with Proxy(service.url, delay_s=0.1) as proxy, open(log, "w") as log_file:
        proc = subprocess.Popen(
            client_command(labelled.root, proxy.url, out, options + " --concurrency 1"),
            cwd=REPO_ROOT,
            env=client_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not out.exists() or len(out.read_bytes().splitlines()) < 12:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        assert proc.poll() is None  # stopped mid-run, not after it finished
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    before = out.read_bytes()
    if sig == signal.SIGINT:
        assert code == 130, log.read_text()
        assert "interrupted" in log.read_text()
        assert before.endswith(b"\n")  # flushed: whole rows only
    else:
        assert code == -signal.SIGKILL
    done_before = len(before.splitlines()) - (fmt == "csv")  # the CSV header
    assert 11 <= done_before < N_IMAGES

    summary_path = tmp_path / "summary.json"
    result = run_client(
        labelled.root,
        service.url,
        out,
        options + " --resume --concurrency 2",
        "--summary-json",
        str(summary_path),
    )
    assert result.returncode == 0, result.stderr
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == len(set(paths)) == N_IMAGES  # no duplicates
    assert sorted(Path(p) for p in paths) == labelled.files  # nothing missing
    summary = json.loads(summary_path.read_text())
    assert summary["job"]["images"] == N_IMAGES and summary["complete"]
    assert summary["run"]["skipped_already_done"] >= done_before - 1  # a cut last line is redone

    again = run_client(labelled.root, service.url, out, options + " --resume")
    assert again.returncode == 0 and "Scored 0 images" in again.stdout
    assert len(read_rows(out)) == N_IMAGES


def test_corrupt_files_non_images_and_unreadable_files(
    service: ServiceProcess, tmp_path: Path
) -> None:
    images = fashion_test().images
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.png").write_bytes(png(images[i]))
    (folder / "truncated.png").write_bytes(png(images[3])[:60])
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    (folder / "notes.txt").write_text("not an image name: never sent\n")
    (folder / "empty.png").write_bytes(b"")
    # Tests run as root, where chmod 000 blocks nothing: a dangling symlink and a FIFO cannot
    # be read by anyone (and the FIFO must not hang the client).
    os.symlink("missing.png", folder / "dangling.png")
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "r.jsonl"
    result = run_client(folder, service.url, out, "--batch-size 8")
    assert result.returncode == 1, result.stderr
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    sent = {"good0.png", "good1.png", "good2.png", "truncated.png", "text.jpg", "empty.png"}
    assert set(rows) == sent | {"dangling.png", "pipe.png"}  # and never notes.txt
    for name in ("good0.png", "good1.png", "good2.png"):
        assert len(rows[name]["predictions"]) == 5
    for name in ("truncated.png", "text.jpg"):
        assert rows[name]["error"]["scope"] == "image", rows[name]  # the service's verdict
    assert rows["empty.png"]["error"]["code"] == "empty_file"
    assert rows["dangling.png"]["error"]["code"] == "not_found"
    assert rows["pipe.png"]["error"]["code"] == "not_a_file"
    assert "5 errors" in result.stdout

    # Alone in its request, a bad image is answered with a 4xx, not a 200 with an error entry;
    # it must still be a verdict on the image, not a failed request.
    single = tmp_path / "single.jsonl"
    alone = run_client(folder / "text.jpg", service.url, single)
    assert alone.returncode == 1
    (row,) = read_rows(single)
    assert row["error"]["scope"] == "image"
    assert row["error"]["code"] == rows["text.jpg"]["error"]["code"]

    # --resume retries what the client could not read, keeps verdicts, duplicates nothing.
    (folder / "dangling.png").unlink()
    (folder / "dangling.png").write_bytes(png(images[4]))
    again = run_client(folder, service.url, out, "--resume")
    assert again.returncode == 1
    rows_after = read_rows(out)
    assert len(rows_after) == len(rows)
    fixed = next(r for r in rows_after if r["path"].endswith("dangling.png"))
    assert len(fixed["predictions"]) == 5


def _one_class(labelled: LabelledFolder) -> tuple[Path, int]:
    folder = labelled.files[0].parent
    return folder, sum(1 for _ in folder.iterdir())


def _all_scored(out: Path, n: int) -> bool:
    rows = read_rows(out)
    return len(rows) == n and all("predictions" in r for r in rows)


def test_a_service_that_is_warming_up_or_answers_503_for_a_while_is_waited_for(
    service: ServiceProcess, labelled: LabelledFolder, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    folder, n = _one_class(labelled)
    with Proxy(service.url, fail_first=4, unready_first=2) as proxy:
        result = run_client(folder, proxy.url, out, "--batch-size 4 --concurrency 2 --retries 5")
    assert result.returncode == 0, result.stderr
    assert proxy.unready_first == 0 and "warming up" in result.stderr  # waited to be ready
    assert proxy.refused == 4 and proxy.forwarded >= n // 4
    assert "retrying: queue_full" in result.stderr
    assert _all_scored(out, n)


def test_a_service_that_keeps_failing_stops_the_run_and_resume_finishes_it(
    service: ServiceProcess, labelled: LabelledFolder, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    folder, n = _one_class(labelled)
    with Proxy(service.url, fail_first=-1) as proxy:
        result = run_client(folder, proxy.url, out, "--batch-size 2 --concurrency 1 --retries 1")
    assert result.returncode == 3, result.stderr
    assert "requests in a row failed" in result.stderr and "--resume" in result.stderr
    failed = read_rows(out)
    assert failed and all(r["error"]["scope"] == "request" for r in failed)
    assert proxy.forwarded == 0

    result = run_client(folder, service.url, out, "--resume")
    assert result.returncode == 0, result.stderr
    assert _all_scored(out, n)


def test_api_key_from_the_option_or_the_environment(tmp_path: Path) -> None:
    images = fashion_test().images
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png(images[i]))
    with running_service(EMBEDDED_MODEL, env={"SERESNET_API_KEY": "s3cret"}) as svc:
        refused = run_client(folder, svc.url, tmp_path / "a.jsonl")
        assert refused.returncode == 3
        assert "refused" in refused.stderr and "--api-key" in refused.stderr

        by_option = run_client(folder, svc.url, tmp_path / "b.jsonl", "--api-key s3cret")
        assert by_option.returncode == 0, by_option.stderr
        assert len(read_rows(tmp_path / "b.jsonl")) == 3

        env = client_env() | {"SERESNET_API_KEY": "s3cret"}
        by_env = subprocess.run(
            client_command(folder, svc.url, tmp_path / "c.jsonl"),
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert by_env.returncode == 0, by_env.stderr
        assert len(read_rows(tmp_path / "c.jsonl")) == 3
