"""Logits -> ``/infer`` response bodies, JSON or with the binary tensor data extension.

An output asked for with ``parameters.classification = k`` comes back, under its own name, as
BYTES ``[N, k]`` of ``"score:index:label"`` (Triton's classification extension: the k largest
output values, so here logits, not probabilities). A binary response is a JSON header of
``Inference-Header-Content-Length`` bytes, then the data of each binary output in the order
the header lists them.

Encoded-image (BYTES) requests may fail image by image, as ``/classify`` allows: the failed
rows of the logits are NaN (``null`` in JSON), their classification strings are empty, and an
extra BYTES ``[N]`` output ``image_errors`` holds each image's error message ("" when it was
classified). Only when no image could be classified does the request fail as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.ranking import top_k
from service.v2.errors import ImageRejected, V2Error
from service.v2.request import HEADER_LENGTH, InferRequest, RequestedOutput
from service.v2.signature import Signature
from service.v2.tensors import BYTES, serialize_bytes

IMAGE_ERRORS_OUTPUT = "image_errors"
_LOGITS_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None  # None: the body is all JSON

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"

    @property
    def headers(self) -> dict[str, str]:
        if self.header_length is None:
            return {}
        return {HEADER_LENGTH: str(self.header_length)}


def classification_strings(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> np.ndarray:
    """``[N, min(k, classes)]`` bytes ``"score:index:label"``, largest score first; ties go to
    the lower index. Scores are printed as C's ``%f``, as Triton does."""
    order, scores = top_k(logits, k)
    out = np.empty(order.shape, dtype=object)
    for row, (indices, values) in enumerate(zip(order.tolist(), scores.tolist(), strict=True)):
        for col, (idx, value) in enumerate(zip(indices, values, strict=True)):
            out[row, col] = f"{value:f}:{idx}:{labels[idx]}".encode()
    return out


@dataclass(frozen=True, eq=False)
class OutputTensor:
    """One output of a response, before any wire format: FP32 ``values`` (failed images'
    rows NaN) or BYTES ``items`` (row-major); ``binary`` says how HTTP sends it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    binary: bool
    values: np.ndarray | None = None
    items: list[bytes] | None = None

    def raw(self) -> bytes:
        """The binary tensor data form (also gRPC's raw_output_contents)."""
        if self.items is not None:
            return serialize_bytes(self.items)
        assert self.values is not None
        return self.values.tobytes()


def infer_outputs(
    request: InferRequest,
    logits: np.ndarray,
    signature: Signature,
    image_errors: Mapping[int, ImageRejected] | None = None,
) -> list[OutputTensor]:
    """The outputs answering ``request`` given the model's ``logits`` ``[N, classes]`` (rows
    of failed images are ignored) and the images that failed, by batch index; raises the
    request's error when every image failed."""
    n = request.batch_size
    logits = np.asarray(logits)
    if logits.shape != (n, signature.num_classes):
        raise V2Error(
            f"the model returned logits of shape {list(logits.shape)} for "
            f"{n} image(s) and {signature.num_classes} classes",
            status=500,
        )
    logits = logits.astype(_LOGITS_DTYPE, copy=False)
    errors = dict(image_errors or {})
    if any(not 0 <= i < n for i in errors):
        raise V2Error(f"image errors for indices outside the batch of {n}", status=500)
    if errors and len(errors) == n:
        raise _all_failed(errors)
    failed = sorted(errors)
    outputs = [_output(out, logits, failed, signature) for out in request.outputs]
    if errors:
        messages = [errors[i].message.encode() if i in errors else b"" for i in range(n)]
        binary = all(out.binary for out in request.outputs)
        outputs.append(OutputTensor(IMAGE_ERRORS_OUTPUT, BYTES, (n,), binary, items=messages))
    return outputs


def encode_infer_response(
    request: InferRequest,
    logits: np.ndarray,
    signature: Signature,
    image_errors: Mapping[int, ImageRejected] | None = None,
) -> EncodedResponse:
    """The HTTP response to ``request`` (see :func:`infer_outputs`)."""
    tensors = [_http_tensor(t) for t in infer_outputs(request, logits, signature, image_errors)]
    header: dict[str, Any] = {
        "model_name": signature.model_name,
        "model_version": signature.model_version,
    }
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = [meta for meta, _ in tensors]
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    blobs = [data for _, data in tensors if data is not None]
    if not blobs:
        return EncodedResponse(header_bytes, None)
    return EncodedResponse(header_bytes + b"".join(blobs), len(header_bytes))


def _all_failed(errors: dict[int, ImageRejected]) -> ImageRejected:
    first = errors[min(errors)]
    more = f" (and {len(errors) - 1} more image(s) failed)" if len(errors) > 1 else ""
    statuses = {e.status for e in errors.values()}
    status = first.status if len(statuses) == 1 else 400
    return ImageRejected(f"image {min(errors)}: {first.message}{more}", status=status)


def _output(
    out: RequestedOutput, logits: np.ndarray, failed: list[int], signature: Signature
) -> OutputTensor:
    if out.classification:
        strings = classification_strings(logits, out.classification, signature.labels)
        strings[failed, :] = b""
        return OutputTensor(out.name, BYTES, strings.shape, out.binary, items=list(strings.ravel()))
    if failed:
        logits = logits.copy()
        logits[failed, :] = np.nan
    return OutputTensor(out.name, "FP32", logits.shape, out.binary, values=logits)


def _http_tensor(tensor: OutputTensor) -> tuple[dict[str, Any], bytes | None]:
    meta: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
    }
    if tensor.binary:
        data = tensor.raw()
        meta["parameters"] = {"binary_data_size": len(data)}
        return meta, data
    if tensor.items is not None:
        meta["data"] = [item.decode("utf-8", errors="replace") for item in tensor.items]
        return meta, None
    # JSON has no NaN: a failed image's row is null, which numpy reads back as NaN.
    assert tensor.values is not None
    meta["data"] = [None if v != v else v for v in tensor.values.ravel().tolist()]
    return meta, None
