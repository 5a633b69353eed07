"""Typed errors of the V2 routes and the body the protocol gives them.

The protocol's error body is ``{"error": "<string>"}`` (tritonclient shows that string as the
exception's message), unlike ``/classify``'s richer ``{"error": {"code", "message"}}``: each
class carries the HTTP status so one handler can answer every V2 route.
"""

from __future__ import annotations


class V2Error(Exception):
    """An error answered as ``status`` with ``{"error": message}``; ``headers`` are extra
    response headers (Retry-After on 503)."""

    status = 500

    def __init__(
        self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class InvalidRequest(V2Error):
    """The request cannot be run as sent (Triton answers these 400 too)."""

    status = 400


class SchemaError(InvalidRequest):
    """The body is not JSON or does not follow the protocol's request schema."""


class UnknownTensor(InvalidRequest):
    """An input or output name the model does not have."""


class DatatypeMismatch(InvalidRequest):
    """A tensor's datatype is not one the model accepts there."""


class ShapeMismatch(InvalidRequest):
    """A tensor's shape does not fit the model, or its data does not fill its shape."""


class BinaryDataError(InvalidRequest):
    """The binary tensor data extension's sizes do not add up."""


class BatchTooLarge(InvalidRequest):
    """More images in one request than the server's maximum batch."""


class Unsupported(InvalidRequest):
    """A protocol feature this server does not implement (shared memory, sequences)."""


class PayloadTooLarge(V2Error):
    """The body, once decompressed, is over the server's limit."""

    status = 413


class ModelNotFound(V2Error):
    """No such model, or no such version of it."""

    status = 404


class ImageRejected(V2Error):
    """An encoded image that cannot be classified: status 400 (corrupt or empty), 413 (too
    many pixels) or 415 (not an image), as for ``/classify``."""

    status = 400


def error_body(error: V2Error | str) -> dict[str, str]:
    """The protocol's error object for ``error``."""
    return {"error": error.message if isinstance(error, V2Error) else error}
