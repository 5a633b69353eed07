"""The two settings a replica behind a balancer needs, against a real ``python -m service``:
SERESNET_MODEL_NAME (the name KServe puts in every /v2/models/NAME URL) and
SERESNET_SHUTDOWN_DELAY_S (on SIGTERM: not ready at once, still serving, then the drain)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from imagesamples import encode
from PIL import Image
from serverutil import EMBEDDED_MODEL, REPO_ROOT, running_service

from modelcard.schema import read_card
from service.settings import SettingsError, load_settings

CARD = read_card(EMBEDDED_MODEL)
SERVED = "fashion-isvc"
DELAY_S = 6.0


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "L"), "PNG")


def classify(url: str, seed: int) -> httpx.Response:
    files = [("images", (f"{seed}.png", png(seed), "image/png"))]
    return httpx.post(f"{url}/classify", files=files, timeout=60)


def test_model_name_and_shutdown_delay() -> None:
    assert CARD.name != SERVED
    env = {
        "SERESNET_MODEL_NAME": SERVED,
        "SERESNET_SHUTDOWN_DELAY_S": str(DELAY_S),
        "SERESNET_WORKERS": "1",
        "SERESNET_MAX_BATCH_SIZE": "4",
    }
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        url = svc.url
        # Every route sees the configured name, and only it.
        meta = httpx.get(f"{url}/v2/models/{SERVED}", timeout=10)
        assert meta.status_code == 200 and meta.json()["name"] == SERVED
        assert httpx.get(f"{url}/v2/models/{SERVED}/ready", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v2/models/{CARD.name}", timeout=10).status_code == 404
        first = classify(url, 1)
        assert first.status_code == 200 and first.json()["model"] == SERVED
        spec = CARD.input
        shape = [1, spec.channels, spec.height, spec.width]
        infer = httpx.post(
            f"{url}/v2/models/{SERVED}/infer",
            json={
                "inputs": [
                    {
                        "name": spec.tensor,
                        "datatype": "UINT8",
                        "shape": shape,
                        "data": [0] * int(np.prod(shape)),
                    }
                ]
            },
            timeout=60,
        )
        assert infer.status_code == 200, infer.text
        assert infer.json()["model_name"] == SERVED

        # SIGTERM: readiness is false at once, the service keeps serving through the delay.
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        deadline = t0 + DELAY_S / 2
        while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "readiness stayed true after SIGTERM"
            time.sleep(0.05)
        ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
        assert ready.status_code == 503
        assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        during = classify(url, 3)
        assert during.status_code == 200, during.text
        assert time.monotonic() - t0 < DELAY_S, "too slow to observe the delay on this box"
        assert svc.proc.poll() is None
        code = svc.proc.wait(timeout=DELAY_S + 60)
        elapsed = time.monotonic() - t0
        svc._stopped = True
        assert code == 0, svc.log_text()
        assert elapsed >= DELAY_S, f"exited {elapsed:.1f}s after SIGTERM, before the delay"
        events = [r.get("event") for r in svc.log_records()]
        assert any(str(e).startswith("leaving") for e in events), events


def test_second_sigterm_cuts_the_delay_short() -> None:
    env = {"SERESNET_SHUTDOWN_DELAY_S": "600", "SERESNET_WORKERS": "1"}
    with running_service(EMBEDDED_MODEL, env=env) as svc:
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert svc.proc.poll() is None
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=60) == 0
        svc._stopped = True


@pytest.mark.parametrize(
    ("value", "message"),
    [("a/b", "URL path segment"), ("-x", "URL path segment"), ("x" * 129, "URL path segment")],
)
def test_model_name_must_be_a_url_segment(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match="SERESNET_MODEL_NAME=.*" + message):
        load_settings({"model_name": value})


def test_bad_values_stop_start_up_with_one_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "service", "--shutdown-delay-s", "-1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: --shutdown-delay-s=-1:"), run.stderr
