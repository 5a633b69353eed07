"""``POST /v2/models/{name}[/versions/{v}]/infer`` bodies -> :class:`InferRequest`.

A body is JSON, or with the binary tensor data extension a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw data of every input that
declares ``parameters.binary_data_size``, in input order. The model has one input, which
takes either its own tensor (``[N, C, H, W]`` of the card's dtype, preprocessed by the
client) or BYTES ``[N]`` / ``[N, 1]`` of encoded image files; and one output, the logits,
optionally turned into Triton's classification strings.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from service.v2.errors import (
    BatchTooLarge,
    BinaryDataError,
    DatatypeMismatch,
    InvalidRequest,
    PayloadTooLarge,
    SchemaError,
    ShapeMismatch,
    UnknownTensor,
    Unsupported,
)
from service.v2.signature import Signature
from service.v2.tensors import BYTES, KNOWN_DATATYPES, deserialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"

# bool before int: JSON true must stay a bool, not become 1.
Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
# Triton's timeout is a uint64 of microseconds.
_MAX_TIMEOUT_US = 2**64 - 1
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        # Some clients (KServe's among them) write "parameters": null for none.
        return {} if value is None else value


class InputTensor(_Schema):
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: dict[str, Parameter] = {}
    data: Any = None


class OutputTensor(_Schema):
    name: StrictStr
    parameters: dict[str, Parameter] = {}


class RequestBody(_Schema):
    id: StrictStr | None = None
    parameters: dict[str, Parameter] = {}
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[OutputTensor] | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output to return: raw logits, or with ``classification`` > 0 the top
    ``classification`` classes as BYTES ``"score:index:label"``; ``binary`` puts its data
    after the JSON header instead of in it."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True, eq=False)
class InferRequest:
    """A validated request: exactly one of ``pixels`` (the model's own tensor, read-only
    when it came as binary data) and ``files`` (encoded images, one per batch element)."""

    id: str | None
    pixels: np.ndarray | None
    files: tuple[bytes, ...] | None
    outputs: tuple[RequestedOutput, ...]
    timeout_us: int | None = None

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.files is None):
            raise ValueError("an InferRequest carries pixels or files, not both or neither")

    @property
    def batch_size(self) -> int:
        if self.files is not None:
            return len(self.files)
        assert self.pixels is not None  # __post_init__: exactly one of the two
        return int(self.pixels.shape[0])


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number (None when absent)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise BinaryDataError(f"{HEADER_LENGTH} {value!r} is not a number") from None
    if length < 0:
        raise BinaryDataError(f"{HEADER_LENGTH} {length} is negative")
    return length


def decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as sent before tritonclient's ``request_compression_algorithm`` (gzip or
    deflate) compressed it; never inflates past ``limit`` bytes, so a small compressed body
    cannot make a huge one."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise Unsupported(f"Content-Encoding {content_encoding!r}: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise SchemaError(f"the body is not valid {encoding} data: {e}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the decompressed body is over {limit} bytes")
    if not inflater.eof:
        raise SchemaError(f"the {encoding} data ends early")
    return data


def decode_body(
    body: bytes,
    content_encoding: str | None,
    header_length: int | None,
    signature: Signature,
    max_batch_size: int,
    max_body_bytes: int,
) -> InferRequest:
    """:func:`decompress` then :func:`decode_infer_request`: the whole parse of a body, for
    a decode thread (it never runs on the event loop)."""
    return decode_infer_request(
        decompress(body, content_encoding, max_body_bytes), header_length, signature, max_batch_size
    )


def decode_infer_request(
    body: bytes, header_length: int | None, signature: Signature, max_batch_size: int
) -> InferRequest:
    """Validate ``body`` against the model; every way it can be wrong raises an
    :class:`~service.v2.errors.InvalidRequest` subclass that says what to fix."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    elif header_length > len(body):
        raise BinaryDataError(
            f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes"
        )
    else:
        # A view, not a copy: the tensor data can be megabytes.
        header, binary = body[:header_length], memoryview(body)[header_length:]
    check_structure(header, signature, max_batch_size)
    parsed = _parse(header)
    blobs = _split_binary(parsed.inputs, binary, header_length is not None)
    return build_infer_request(parsed, blobs, signature, max_batch_size)


def build_infer_request(
    parsed: RequestBody,
    blobs: Sequence[memoryview | None],
    signature: Signature,
    max_batch_size: int,
) -> InferRequest:
    """Validate a parsed request against the model, whatever carried it: ``blobs`` has each
    input's binary data (None where ``data`` holds it). HTTP's JSON and binary bodies and
    gRPC's messages end here alike."""
    timeout_us = _request_parameters(parsed.parameters)
    tensor, blob = _the_input(parsed.inputs, blobs, signature)

    if tensor.datatype == BYTES:
        files = _files(tensor, blob, max_batch_size)
        pixels = None
    elif tensor.name == signature.input_name and tensor.datatype == signature.input_datatype:
        pixels = _pixels(tensor, blob, signature, max_batch_size)
        files = None
    elif tensor.name != signature.input_name:
        raise DatatypeMismatch(
            f"input {tensor.name!r} has datatype {tensor.datatype}; it takes BYTES [N] of "
            f"encoded image files"
        )
    else:
        raise DatatypeMismatch(
            f"input {tensor.name!r} has datatype {tensor.datatype}; the model takes "
            f"{signature.input_datatype} [N, {', '.join(map(str, signature.image_shape))}] "
            f"or BYTES [N] of encoded image files"
        )
    outputs = _outputs(
        # a boolean by now: _request_parameters refused anything else
        parsed.outputs,
        parsed.parameters.get("binary_data_output") is True,
        signature,
    )
    return InferRequest(
        id=parsed.id, pixels=pixels, files=files, outputs=outputs, timeout_us=timeout_us
    )


# JSON structure a header holds beside its tensor data: fields, parameters, outputs.
_STRUCTURE_SLACK = 4096


def check_structure(header: bytes, signature: Signature, max_batch_size: int) -> None:
    """Refuse a header whose JSON holds more values or arrays than the largest valid request
    (a full batch, nested to the tensor's shape) before any of it is parsed: the parser would
    otherwise build one Python object per value, 8 M lists taking seconds and gigabytes.
    Counted with ``bytes.count`` (C speed, milliseconds for the largest body); a comma or
    bracket inside a string only ever counts against the sender."""
    channels, height, width = signature.image_shape
    values = max_batch_size * channels * height * width
    arrays = 1 + max_batch_size * (1 + channels + channels * height)
    if header.count(b",") > values + _STRUCTURE_SLACK:
        raise SchemaError(
            f"the request header holds more than {values + _STRUCTURE_SLACK} values; a batch "
            f"of at most {max_batch_size} images of {channels}x{height}x{width} needs fewer"
        )
    if header.count(b"[") > arrays + _STRUCTURE_SLACK:
        raise SchemaError(
            f"the request header holds more than {arrays + _STRUCTURE_SLACK} arrays; a batch "
            f"of at most {max_batch_size} images nested to [N, {channels}, {height}, {width}] "
            "needs fewer"
        )
    if header.count(b"{") > _STRUCTURE_SLACK:
        raise SchemaError(f"the request header holds more than {_STRUCTURE_SLACK} objects")


def _parse(header: bytes) -> RequestBody:
    try:
        return RequestBody.model_validate_json(header)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        if first["type"] == "json_invalid":
            raise SchemaError(f"the request header is not valid JSON: {first['msg']}") from None
        raise SchemaError(
            f"request does not follow the inference request schema: {where}: {first['msg']}"
        ) from None


def _request_parameters(params: dict[str, Any]) -> int | None:
    """Check the parameters this server acts on; the rest (custom ones, priority) pass."""
    if params.get("sequence_id") not in (None, 0, ""):
        raise Unsupported("sequence_id: the model is stateless and has no sequence batcher")
    flag = params.get("binary_data_output", False)
    if not isinstance(flag, bool):
        raise SchemaError(f"parameters.binary_data_output must be a boolean, not {flag!r}")
    timeout = params.get("timeout")
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int)
        or not 0 <= timeout <= _MAX_TIMEOUT_US
    ):
        shown = repr(timeout) if len(repr(timeout)) <= 40 else f"{repr(timeout)[:20]}..."
        raise SchemaError(
            f"parameters.timeout must be an integer number of microseconds in "
            f"[0, {_MAX_TIMEOUT_US}], not {shown}"
        )
    return timeout


def _split_binary(
    inputs: list[InputTensor], binary: memoryview, has_header_length: bool
) -> list[memoryview | None]:
    """Each input's slice of the binary part (None for inputs carried in the JSON)."""
    view = binary
    blobs: list[memoryview | None] = []
    offset = 0
    for tensor in inputs:
        _no_shared_memory(tensor)
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise SchemaError(
                    f"input {tensor.name!r} has neither data nor parameters.binary_data_size"
                )
            blobs.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SchemaError(
                f"input {tensor.name!r}: parameters.binary_data_size must be a "
                f"non-negative integer, not {size!r}"
            )
        if tensor.data is not None:
            raise SchemaError(f"input {tensor.name!r} has both data and binary_data_size")
        if not has_header_length:
            raise BinaryDataError(
                f"input {tensor.name!r} declares binary_data_size but the "
                f"request has no {HEADER_LENGTH} header"
            )
        if offset + size > len(view):
            raise BinaryDataError(
                f"input {tensor.name!r} declares {size} bytes of binary data but only "
                f"{len(view) - offset} bytes follow the JSON header there"
            )
        blobs.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise BinaryDataError(
            f"{len(view) - offset} bytes after the JSON header are not claimed by any input's "
            f"binary_data_size (the inputs declare {offset} of {len(view)})"
        )
    return blobs


def _no_shared_memory(tensor: InputTensor) -> None:
    shared = [key for key in _SHARED_MEMORY if key in tensor.parameters]
    if shared:
        raise Unsupported(
            f"input {tensor.name!r}: the shared-memory extension is not "
            f"supported ({shared[0]}); send the data in the request"
        )


def _the_input(
    inputs: list[InputTensor], blobs: Sequence[memoryview | None], signature: Signature
) -> tuple[InputTensor, memoryview | None]:
    for tensor in inputs:
        _no_shared_memory(tensor)
        if not signature.takes_input(tensor.name):
            raise UnknownTensor(
                f"unknown input {tensor.name!r}: the model takes {signature.input_name!r} "
                f"(its tensor, or encoded image files) or {signature.files_input!r} "
                f"(encoded image files)"
            )
    if len(inputs) > 1:
        names = sorted({t.name for t in inputs})
        if len(names) == 1:
            raise InvalidRequest(f"input {names[0]!r} is given {len(inputs)} times")
        raise InvalidRequest(
            f"{len(inputs)} inputs given ({', '.join(map(repr, names))}); send one: "
            f"{signature.input_name!r} or {signature.files_input!r}"
        )
    tensor = inputs[0]
    if tensor.datatype not in KNOWN_DATATYPES:
        raise DatatypeMismatch(
            f"input {tensor.name!r}: {tensor.datatype!r} is not a datatype of the protocol"
        )
    if any(dim < 0 for dim in tensor.shape):
        raise ShapeMismatch(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    return tensor, blobs[0]


def _check_batch(tensor: InputTensor, batch: int, max_batch_size: int) -> None:
    if batch == 0:
        raise ShapeMismatch(f"input {tensor.name!r}: shape {tensor.shape} holds no image")
    if batch > max_batch_size:
        raise BatchTooLarge(
            f"input {tensor.name!r}: batch size {batch} is more than the "
            f"server's maximum of {max_batch_size}"
        )


def _pixels(
    tensor: InputTensor, blob: memoryview | None, signature: Signature, max_batch_size: int
) -> np.ndarray:
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1:] != signature.image_shape:
        raise ShapeMismatch(
            f"input {tensor.name!r} has shape {list(shape)}; the model takes "
            f"[N, {', '.join(map(str, signature.image_shape))}] (N images, "
            f"{signature.channels} channel(s), {signature.height}x{signature.width})"
        )
    _check_batch(tensor, shape[0], max_batch_size)
    dtype = signature.input_dtype
    count = math.prod(shape)
    if blob is not None:
        if len(blob) != count * dtype.itemsize:
            raise BinaryDataError(
                f"input {tensor.name!r}: shape {list(shape)} of {tensor.datatype} needs "
                f"{count * dtype.itemsize} bytes, binary_data_size gives {len(blob)}"
            )
        return np.frombuffer(blob, dtype=dtype).reshape(shape)
    return _from_json(tensor, shape, count, dtype)


def _from_json(
    tensor: InputTensor, shape: tuple[int, ...], count: int, dtype: np.dtype
) -> np.ndarray:
    # The protocol allows the data flat or nested to the tensor's shape; both are row-major.
    try:
        values = np.asarray(tensor.data)
    except ValueError:
        raise ShapeMismatch(f"input {tensor.name!r}: data is a ragged nested list") from None
    if values.size != count:
        raise ShapeMismatch(
            f"input {tensor.name!r}: shape {list(shape)} needs {count} "
            f"values, data has {values.size}"
        )
    allowed = "iu" if dtype.kind == "u" else "iuf"
    if values.dtype.kind not in allowed:
        raise DatatypeMismatch(
            f"input {tensor.name!r}: data must be "
            f"{'integers' if dtype.kind == 'u' else 'numbers'} for "
            f"{tensor.datatype}"
        )
    if dtype.kind == "u":
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise DatatypeMismatch(
                f"input {tensor.name!r}: {tensor.datatype} values must lie "
                f"in [{info.min}, {info.max}]"
            )
    return values.astype(dtype).reshape(shape)


def _files(tensor: InputTensor, blob: memoryview | None, max_batch_size: int) -> tuple[bytes, ...]:
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ShapeMismatch(
            f"input {tensor.name!r}: BYTES of encoded images has shape [N] or [N, 1], not {shape}"
        )
    _check_batch(tensor, shape[0], max_batch_size)
    items = (
        deserialize_bytes(blob, tensor.name, max_items=shape[0])
        if blob is not None
        else _strings_from_json(tensor)
    )
    if len(items) != shape[0]:
        raise ShapeMismatch(
            f"input {tensor.name!r}: shape {shape} needs {shape[0]} "
            f"element(s), the data has {len(items)}"
        )
    return tuple(items)


def _strings_from_json(tensor: InputTensor) -> list[bytes]:
    # JSON can carry BYTES only as UTF-8 strings, which real image files never are; they come
    # through here (and fail to decode as images) only from clients that forgot binary data.
    # gRPC's typed contents carry them as bytes.
    data = tensor.data
    if not isinstance(data, list):
        raise SchemaError(f"input {tensor.name!r}: data must be a list")
    nested = [isinstance(v, list) for v in data]
    if any(nested) and not all(nested):
        raise ShapeMismatch(f"input {tensor.name!r}: data mixes lists and strings")
    flat = [v for row in data for v in row] if any(nested) else data
    if all(isinstance(v, bytes) for v in flat):  # gRPC's typed bytes_contents
        return flat
    if not all(isinstance(v, str) for v in flat):
        raise DatatypeMismatch(
            f"input {tensor.name!r}: BYTES data in JSON must be strings; "
            f"send image files as binary data"
        )
    return [v.encode() for v in flat]


def _outputs(
    requested: list[OutputTensor] | None, binary_default: bool, signature: Signature
) -> tuple[RequestedOutput, ...]:
    if not requested:  # none named: every output, as the protocol says
        return (RequestedOutput(signature.output_name, binary=binary_default),)
    seen: set[str] = set()
    outputs = []
    for out in requested:
        if out.name != signature.output_name:
            raise UnknownTensor(
                f"unknown output {out.name!r}: the model's only output is {signature.output_name!r}"
            )
        if out.name in seen:
            raise InvalidRequest(f"output {out.name!r} is requested more than once")
        seen.add(out.name)
        params = out.parameters
        shared = [key for key in _SHARED_MEMORY if key in params]
        if shared:
            raise Unsupported(
                f"output {out.name!r}: the shared-memory extension is not supported ({shared[0]})"
            )
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise SchemaError(
                f"output {out.name!r}: parameters.binary_data must be a boolean, not {binary!r}"
            )
        k = params.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise SchemaError(
                f"output {out.name!r}: parameters.classification must be a "
                f"non-negative integer, not {k!r}"
            )
        outputs.append(RequestedOutput(out.name, binary=binary, classification=k))
    return tuple(outputs)
