"""Talking to the service: readiness, multi-image ``POST /classify`` requests, retries.

One :class:`Scorer` wraps one ``httpx.AsyncClient`` (a keep-alive connection pool as wide as
the concurrency). A request is retried, with exponential backoff and jitter, on connection
errors, timeouts, 429, 502, 503 and 504; a ``Retry-After`` header sets the wait instead. A
request that still fails becomes one error row per image (scope ``request``, retried by the next
--resume run). A 400, 413 or 415 on a multi-image request (too many images, one too large) is
split in halves until each image has its own answer, so one bad image costs only its own row.
Per-image errors inside a 200 answer, and those statuses for a single image, are the service's
verdict on that image: recorded (scope ``image``), never retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import mimetypes
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from client.discovery import os_error_code
from client.output import Row

#: Statuses worth another try: the service is busy, restarting, or a proxy lost it.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Statuses that can be about the images themselves (too large, undecodable, empty).
IMAGE_VERDICT_STATUSES = frozenset({400, 413, 415})
#: Files larger than this are not read (memory stays bounded); no service accepts them anyway.
MAX_FILE_BYTES = 64 * 1024 * 1024
API_KEY_HEADER = "Authorization"


class ServiceError(Exception):
    """The job cannot go on: the service is unreachable, refuses the key, or fails every
    request. The message says what happened and what to do."""


@dataclass(frozen=True)
class Settings:
    url: str
    top_k: int = 5
    batch_size: int = 16
    concurrency: int = 4
    retries: int = 5
    timeout: float = 60.0
    api_key: str | None = None
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    ready_wait_s: float = 300.0


class Image(NamedTuple):
    path: str
    true_label: str | None
    data: bytes


class FileProblem(Exception):
    def __init__(self, code: str, message: str, scope: str = "file") -> None:
        super().__init__(message)
        self.code, self.message, self.scope = code, message, scope


def error_row(path: str, true_label: str | None, code: str, message: str, scope: str) -> Row:
    row: Row = {"path": path}
    if true_label is not None:
        row["true_label"] = true_label
    row["error"] = {"code": code, "message": message, "scope": scope}
    return row


def read_image_file(path: str) -> bytes:
    """The file's bytes; :class:`FileProblem` when it is not a readable regular file.

    Opened non-blocking and checked with fstat before reading, so a FIFO or device named like
    an image is reported instead of hanging the run.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(os_error_code(exc), f"cannot open: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem("not_a_file", "not a regular file (a folder, FIFO, socket or device)")
        if st.st_size > MAX_FILE_BYTES:
            raise FileProblem(
                "file_too_large", f"{st.st_size} bytes, more than {MAX_FILE_BYTES}", "image"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise FileProblem(os_error_code(exc), f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if not data:
        raise FileProblem("empty_file", "the file is empty", "image")
    if len(data) > MAX_FILE_BYTES:
        raise FileProblem("file_too_large", f"more than {MAX_FILE_BYTES} bytes", "image")
    return data


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, settings: Settings, retry_after: float | None) -> float:
    """Wait before retry number ``attempt`` (0-based). Jitter spreads the retries of parallel
    requests so they do not hit a recovering service all at once."""
    if retry_after is not None:
        wait = min(retry_after, settings.retry_after_max)
        return wait + random.uniform(0, 0.1 * wait + 0.05)
    ceiling = min(settings.backoff_max, settings.backoff_base * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


def _content_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """``(code, message)`` from an error body (docs/design.md §5), or from the status alone."""
    try:
        body = response.json()
        err = body["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = " ".join(response.text.split())[:200]
        return f"http_{response.status_code}", text or response.reason_phrase


class _Failure(NamedTuple):
    code: str
    message: str
    retry_after: float | None
    retryable: bool


def _reason(exc: BaseException) -> str:
    """The most telling cause of a transport error: async connects wrap the OS error (e.g.
    "Connection refused") in a generic "All connection attempts failed"."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return str(exc) or type(exc).__name__


def _transport_failure(exc: httpx.TransportError) -> _Failure:
    if isinstance(exc, httpx.TimeoutException):
        return _Failure("timeout", f"no answer in time ({type(exc).__name__})", None, True)
    return _Failure("connection_error", _reason(exc), None, True)


class Scorer:
    """Scores batches of images against one service; safe to use from many tasks at once."""

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient,
        notify: Callable[[str], None] = lambda _msg: None,
        on_model: Callable[[str, str, int], None] = lambda _n, _v, _c: None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.notify = notify
        self.on_model = on_model
        #: Requests that failed in a row (after retries); any success resets it.
        self.failure_streak = 0
        self.last_failure = ""
        self._last_notice: dict[str, float] = {}
        #: Most images per request; lowered when the service says "too_many_images".
        self.request_limit = settings.batch_size
        #: The model's name, from the first answer.
        self.model: str | None = None

    @staticmethod
    def make_client(settings: Settings) -> httpx.AsyncClient:
        headers = {"Accept": "application/json"}
        if settings.api_key:
            headers[API_KEY_HEADER] = f"Bearer {settings.api_key}"
        limits = httpx.Limits(
            max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
        )
        return httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(settings.timeout, connect=min(10.0, settings.timeout)),
            follow_redirects=False,
        )

    def _notice(self, kind: str, message: str) -> None:
        # Many requests retry together when the service is busy; one line of each kind every
        # few seconds tells the user enough.
        now = time.monotonic()
        if now - self._last_notice.get(kind, -math.inf) >= 5.0:
            self._last_notice[kind] = now
            self.notify(message)

    async def wait_ready(self) -> None:
        """Wait until ``/v2/health/ready`` answers 200.

        An unreachable service gets ``retries`` tries, so a job against a wrong URL fails in
        seconds instead of writing an error row per image; a service that answers but is
        still warming up (503) is waited for up to ``ready_wait_s``. Raises
        :class:`ServiceError` when either runs out.
        """
        url = self.settings.url
        deadline = time.monotonic() + self.settings.ready_wait_s
        attempt = 0
        while True:
            try:
                response = await self.client.get("/v2/health/ready")
            except httpx.TransportError as exc:
                failure = _transport_failure(exc)
                attempt += 1
                if attempt > self.settings.retries:
                    raise ServiceError(
                        f"cannot reach the service at {url}: {failure.message}. Is it "
                        "running (python -m service), and is --url right?"
                    ) from None
                delay = backoff_delay(attempt - 1, self.settings, None)
            else:
                if response.status_code == 200 or response.status_code in (401, 403, 404):
                    return  # 404: a gateway without health routes; /classify will tell
                code, message = _error_of(response)
                if response.status_code not in RETRY_STATUSES:
                    raise ServiceError(
                        f"the service at {url} answered /v2/health/ready with "
                        f"{response.status_code} ({code}: {message})"
                    )
                if time.monotonic() >= deadline:
                    raise ServiceError(f"the service at {url} is not ready: {code}: {message}")
                failure = _Failure(code, message, None, True)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = backoff_delay(0, self.settings, retry_after if retry_after else 1.0)
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            self._notice("ready", f"waiting for the service at {url}: {failure.message}")
            await asyncio.sleep(delay)

    async def class_labels(self, model: str | None = None) -> list[str]:
        """The served model's class labels, from its metadata (``GET /v2/models/{name}``;
        without ``model``, the first name ``GET /v2/models`` lists); [] when the service does
        not say (an older service, a gateway that passes only /classify)."""
        try:
            if model is None:
                listing = await self.client.get("/v2/models")
                models = listing.json()["models"] if listing.status_code == 200 else None
                if not models:
                    return []
                model = models[0] if isinstance(models[0], str) else models[0]["name"]
            response = await self.client.get(f"/v2/models/{quote(str(model), safe='')}")
            if response.status_code != 200:
                return []
            labels = response.json()["card"]["labels"]
        except (httpx.HTTPError, ValueError, LookupError, TypeError):
            return []
        return [str(label) for label in labels] if isinstance(labels, list) else []

    async def score(self, images: list[Image]) -> list[Row]:
        """One row per image, in order. Raises only :class:`ServiceError`."""
        if not images:
            return []
        if len(images) > self.request_limit:
            chunks: list[Row] = []
            for start in range(0, len(images), self.request_limit):
                chunks += await self.score(images[start : start + self.request_limit])
            return chunks
        failure: _Failure | None = None
        for attempt in range(self.settings.retries + 1):
            try:
                response = await self._post(images)
            except httpx.TransportError as exc:
                failure = _transport_failure(exc)
            else:
                status = response.status_code
                if status == 200:
                    rows = self._rows(images, response)
                    if rows is not None:
                        self.failure_streak = 0
                        return rows
                    failure = _Failure(
                        "bad_response", "the answer is not a result list", None, False
                    )
                elif status in IMAGE_VERDICT_STATUSES:
                    return await self._isolate(images, response)
                elif status in (401, 403):
                    _, message = _error_of(response)
                    raise ServiceError(
                        f"the service at {self.settings.url} refused the request ({status}: "
                        f"{message}); give the right key with --api-key or SERESNET_API_KEY"
                    )
                elif status in (404, 405):
                    raise ServiceError(
                        f"{self.settings.url}/classify answered {status}: is --url the "
                        "service's base URL (without /classify)?"
                    )
                else:
                    code, message = _error_of(response)
                    failure = _Failure(
                        code,
                        f"{status}: {message}",
                        parse_retry_after(response.headers.get("Retry-After")),
                        status in RETRY_STATUSES,
                    )
            if not failure.retryable or attempt == self.settings.retries:
                break
            delay = backoff_delay(attempt, self.settings, failure.retry_after)
            self._notice(
                "retry", f"retrying: {failure.code}: {failure.message} (waiting {delay:.1f} s)"
            )
            await asyncio.sleep(delay)
        assert failure is not None
        self.failure_streak += 1
        self.last_failure = f"{failure.code}: {failure.message}"
        return [
            error_row(im.path, im.true_label, failure.code, failure.message, "request")
            for im in images
        ]

    async def _post(self, images: list[Image]) -> httpx.Response:
        files = [
            ("images", (os.path.basename(im.path), im.data, _content_type(im.path)))
            for im in images
        ]
        return await self.client.post(
            "/classify", params={"top_k": self.settings.top_k}, files=files
        )

    async def _isolate(self, images: list[Image], response: httpx.Response) -> list[Row]:
        """A 400/413/415 for a whole request: split it until each image gets its own answer.
        For one image it is the service's verdict on that image (a single bad image is
        answered that way, not with a 200 and an error entry)."""
        code, message = _error_of(response)
        if len(images) > 1:
            half = len(images) // 2
            if code == "too_many_images" and half < self.request_limit:
                # A service limit (SERESNET_MAX_IMAGES_PER_REQUEST), not a bad image: remember
                # it, so later batches are not refused and split every time.
                self.request_limit = half
                self.notify(
                    f"the service refused {len(images)} images per request; sending at most {half}"
                )
            return await self.score(images[:half]) + await self.score(images[half:])
        self.failure_streak = 0
        return [error_row(images[0].path, images[0].true_label, code, message, "image")]

    def _rows(self, images: list[Image], response: httpx.Response) -> list[Row] | None:
        try:
            body: Any = response.json()
            results = body["results"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(results, list) or len(results) != len(images):
            return None
        self.model = str(body.get("model", "")) or self.model
        self.on_model(str(body.get("model", "")), str(body.get("model_version", "")), len(images))
        rows = []
        for im, result in zip(images, results, strict=True):
            row: Row = {"path": im.path}
            if im.true_label is not None:
                row["true_label"] = im.true_label
            if not isinstance(result, dict):
                return None
            if "error" in result:
                err = result["error"] or {}
                row["error"] = {
                    "code": str(err.get("code", "unknown")),
                    "message": str(err.get("message", "")),
                    "scope": "image",
                }
            else:
                try:
                    row["predictions"] = [
                        {
                            "label": str(p["label"]),
                            "class_id": int(p["class_id"]),
                            "score": float(p["score"]),
                        }
                        for p in result["predictions"][: self.settings.top_k]
                    ]
                except (KeyError, TypeError, ValueError):
                    return None
            rows.append(row)
        return rows
