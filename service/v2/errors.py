"""Typed errors of the V2 codec, members of the service's one error family
(:class:`service.errors.ServiceError`).

The protocol's error body is ``{"error": "<string>"}`` (tritonclient shows that string as the
exception's message); the code each class carries (its name in snake case, in
:data:`service.errors.CODES` with its status) is for logs and metrics.
"""

from __future__ import annotations

from typing import ClassVar

from service.errors import ServiceError, status_of


class V2Error(ServiceError):
    """An error of the codec; ``status`` defaults to its code's, ``headers`` are extra
    response headers (Retry-After on 503)."""

    code_name: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        code = self.code_name
        super().__init__(status if status is not None else status_of(code), code, message, headers)


class InvalidRequest(V2Error):
    """The request cannot be run as sent (Triton answers these 400 too)."""

    code_name = "invalid_request"


class SchemaError(InvalidRequest):
    """The body is not JSON or does not follow the protocol's request schema."""

    code_name = "schema_error"


class UnknownTensor(InvalidRequest):
    """An input or output name the model does not have."""

    code_name = "unknown_tensor"


class DatatypeMismatch(InvalidRequest):
    """A tensor's datatype is not one the model accepts there."""

    code_name = "datatype_mismatch"


class ShapeMismatch(InvalidRequest):
    """A tensor's shape does not fit the model, or its data does not fill its shape."""

    code_name = "shape_mismatch"


class BinaryDataError(InvalidRequest):
    """The binary tensor data extension's sizes do not add up."""

    code_name = "binary_data_error"


class BatchTooLarge(InvalidRequest):
    """More images in one request than the server's maximum batch."""

    code_name = "batch_too_large"


class Unsupported(InvalidRequest):
    """A protocol feature this server does not implement (shared memory, sequences)."""

    code_name = "unsupported"


class PayloadTooLarge(V2Error):
    """The body, once decompressed, is over the server's limit."""

    code_name = "payload_too_large"


class ModelNotFound(V2Error):
    """No such model, or no such version of it."""

    code_name = "model_not_found"


class ImageRejected(V2Error):
    """An encoded image that cannot be classified: status 400 (corrupt or empty), 413 (too
    many pixels) or 415 (not an image), as for ``/classify``."""

    code_name = "image_rejected"
