"""The service's one error family and the one table of its error codes.

Every error a caller can see is a :class:`ServiceError`: an HTTP ``status``, a stable
machine-readable ``code`` and a ``message``. :data:`CODES` lists every code with its status and
the short words a person reads before the message (the page shows them); every other list of
codes, statuses or words (the engine's failures, the HTTP handlers, the OpenAPI page, the
page's script) is derived from it, and a test checks that the code names used in ``service/``
are all in it. Whether a body is ``{"error": {"code", "message"}}`` or the Open Inference
Protocol's ``{"error": "<message>"}`` depends only on the path (:func:`error_content`).
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Code:
    status: int
    words: str  # what a person reads first: the message that follows says the details


CODES: Mapping[str, Code] = {
    # The request as a whole.
    "bad_request": Code(400, "Not a valid HTTP request"),
    "invalid_request": Code(400, "Not a valid request"),
    "invalid_multipart": Code(400, "Not a valid multipart body"),
    "no_image": Code(400, "No image in the request"),
    "unauthorized": Code(401, "API key needed"),
    "not_found": Code(404, "No such page"),
    "model_not_found": Code(404, "No such model"),
    "method_not_allowed": Code(405, "Method not allowed"),
    "request_timeout": Code(408, "The request arrived too slowly"),
    "body_too_large": Code(413, "Too large to send"),
    "too_many_images": Code(413, "Too many images in one request"),
    "uri_too_long": Code(414, "The address is too long"),
    "unsupported_media_type": Code(415, "Not an image format the service reads"),
    "invalid_parameter": Code(422, "Invalid parameter"),
    "too_many_attempts": Code(429, "Too many wrong API keys"),
    "headers_too_large": Code(431, "Headers too large"),
    # One image.
    "empty_image": Code(400, "Empty file"),
    "corrupt_image": Code(400, "Not a readable image"),
    "image_too_large": Code(413, "Image too large"),
    "unsupported_format": Code(415, "Not an image format the service reads"),
    # The Open Inference Protocol's request checks (service.v2.errors).
    "schema_error": Code(400, "Not a valid inference request"),
    "unknown_tensor": Code(400, "No such tensor"),
    "datatype_mismatch": Code(400, "Wrong tensor datatype"),
    "shape_mismatch": Code(400, "Wrong tensor shape"),
    "binary_data_error": Code(400, "Binary tensor data does not add up"),
    "batch_too_large": Code(400, "Too many images in one request"),
    "unsupported": Code(400, "Not supported by this server"),
    "image_rejected": Code(400, "An image could not be classified"),
    "payload_too_large": Code(413, "Too large to send"),
    # The service's state.
    "busy": Code(503, "The service is busy"),
    "queue_full": Code(503, "The service is busy"),
    "too_many_connections": Code(503, "The service is busy"),
    "not_ready": Code(503, "The service is not ready"),
    "engine_unavailable": Code(503, "The service is restarting"),
    "shutting_down": Code(503, "The service is shutting down"),
    "deadline_exceeded": Code(504, "The service took too long"),
    "inference_failed": Code(500, "The model failed to run"),
    "internal_error": Code(500, "Internal error"),
}

# The gRPC status of each code (names of grpc.StatusCode), from its HTTP status, so that a
# code added to CODES has one too; the exceptions are named. A request the client may retry
# later is RESOURCE_EXHAUSTED (the service is busy: with retry information) or UNAVAILABLE
# (not ready, restarting, shutting down); a request too large in its count of images, or one
# image too large, is INVALID_ARGUMENT (resending it cannot help), a message too large
# RESOURCE_EXHAUSTED (as gRPC's own message-size limit answers).
_GRPC_BY_STATUS: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    431: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_GRPC_EXCEPTIONS: Mapping[str, str] = {
    "too_many_images": "INVALID_ARGUMENT",
    "image_too_large": "INVALID_ARGUMENT",
    "busy": "RESOURCE_EXHAUSTED",
    "queue_full": "RESOURCE_EXHAUSTED",
    "too_many_connections": "RESOURCE_EXHAUSTED",
}
GRPC_STATUS: Mapping[str, str] = {
    code: _GRPC_EXCEPTIONS.get(code) or _GRPC_BY_STATUS.get(entry.status, "UNKNOWN")
    for code, entry in CODES.items()
}


def grpc_status_of(code: str) -> str:
    """The gRPC status name of ``code`` (INTERNAL for a code the table does not know)."""
    return GRPC_STATUS.get(code, "INTERNAL")


# Codes whose message may hold a cause the caller must not see (it goes to the log instead).
HIDDEN_CAUSE = frozenset({"inference_failed", "internal_error"})


def status_of(code: str) -> int:
    """The HTTP status of ``code`` (500 for a code the table does not know: a bug)."""
    entry = CODES.get(code)
    return entry.status if entry is not None else 500


def code_of_status(status: int) -> str:
    """The code of an error only known by its status (Starlette's own 404, 405...)."""
    for code, entry in CODES.items():
        if entry.status == status:
            return code
    return f"http_{status}"


def reason(status: int) -> bytes:
    """The reason phrase of a raw HTTP status line."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


class ServiceError(Exception):
    """``status`` is the HTTP status, ``code`` a name in :data:`CODES`, ``headers`` extra
    response headers (e.g. Retry-After)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, code: str, message: str, headers: dict[str, str] | None = None) -> ServiceError:
        """The error ``code`` with its status from :data:`CODES`."""
        return cls(status_of(code), code, message, headers)


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_content(path: str, code: str, message: str) -> dict[str, Any]:
    """The error body for a request to ``path``: the Open Inference Protocol's
    ``{"error": "<message>"}`` under ``/v2`` (tritonclient shows that string as its
    exception's message), ``{"error": {"code", "message"}}`` everywhere else."""
    if is_v2_path(path):
        return {"error": message}
    return {"error": {"code": code, "message": message}}
