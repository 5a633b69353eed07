"""An engine that stops answering (SIGSTOP) while the worker stays up: requests get 504 at
their deadline from the worker itself, readiness turns false within the heartbeat timeout,
and both recover when the engine is continued."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from modelcard.schema import read_card
from testkit.images import noise_png
from testkit.server import EMBEDDED_MODEL, running_service

CARD = read_card(EMBEDDED_MODEL)


def engine_pid(url: str) -> int:
    return int(
        httpx.get(f"{url}/v2/models/{CARD.name}", timeout=30).json()["processes"]["engine_pid"]
    )


def test_a_stopped_engine_gives_504_at_the_deadline_and_readiness_false() -> None:
    env = {"SERESNET_WORKERS": "1", "SERESNET_REQUEST_TIMEOUT_S": "3"}
    with running_service(EMBEDDED_MODEL, env=env) as s:
        engine = engine_pid(s.url)
        files = [("images", ("ok.png", noise_png(0), "image/png"))]
        with httpx.Client(timeout=30) as client:
            assert client.post(f"{s.url}/classify", files=files).status_code == 200
            os.kill(engine, signal.SIGSTOP)
            try:
                answers: list[tuple[int, float]] = []

                def request() -> None:
                    t0 = time.monotonic()
                    with httpx.Client(timeout=30) as c:
                        r = c.post(f"{s.url}/classify", files=files)
                    answers.append((r.status_code, time.monotonic() - t0))

                t = threading.Thread(target=request)
                t.start()
                ready_false_after = None
                t0 = time.monotonic()
                while time.monotonic() - t0 < 8:
                    if client.get(f"{s.url}/v2/health/ready").status_code == 503:
                        ready_false_after = time.monotonic() - t0
                        break
                    time.sleep(0.1)
                t.join()
                assert ready_false_after is not None and ready_false_after < 5
                ((status, seconds),) = answers
                assert status in (503, 504), answers
                assert seconds < 3 + 1.5, answers
                assert client.get(f"{s.url}/v2/health/live").status_code == 200
            finally:
                os.kill(engine, signal.SIGCONT)
            t0 = time.monotonic()
            while client.get(f"{s.url}/v2/health/ready").status_code != 200:
                assert time.monotonic() - t0 < 10, "readiness did not come back"
                time.sleep(0.1)
            assert client.post(f"{s.url}/classify", files=files).status_code == 200
