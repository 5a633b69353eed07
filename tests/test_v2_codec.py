"""The V2 codec against tritonclient itself: request bodies built by tritonclient's own
classes are decoded by service.v2, and what service.v2 encodes is parsed by tritonclient."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.http as triton
from conftest import EMBEDDED_MODEL
from tritonclient.http import InferInput, InferRequestedOutput, InferResult

from modelcard.schema import ModelCard, read_card
from service.errors import error_content
from service.v2.errors import (
    BatchTooLarge,
    BinaryDataError,
    DatatypeMismatch,
    ImageRejected,
    InvalidRequest,
    PayloadTooLarge,
    SchemaError,
    ShapeMismatch,
    UnknownTensor,
    Unsupported,
    V2Error,
)
from service.v2.request import (
    InferRequest,
    decode_infer_request,
    decompress,
    parse_header_length,
)
from service.v2.response import IMAGE_ERRORS_OUTPUT, encode_infer_response
from service.v2.signature import Signature
from testkit.images import encode, photo

MAX_BATCH = 8


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return read_card(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def sig(card: ModelCard) -> Signature:
    return Signature.from_card(card)


def pixels(n: int, sig: Signature, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *sig.image_shape), dtype=np.uint8)


def logits_for(n: int, sig: Signature, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 4, (n, sig.num_classes)).astype(np.float32)


def uint8_input(sig: Signature, x: np.ndarray, binary: bool) -> InferInput:
    tensor = InferInput(sig.input_name, list(x.shape), "UINT8")
    return tensor.set_data_from_numpy(x, binary_data=binary)


def files_input(sig: Signature, blobs: list[bytes], shape: list[int] | None = None) -> InferInput:
    array = np.array(blobs, dtype=np.object_).reshape(shape or [len(blobs)])
    tensor = InferInput(sig.input_name, list(array.shape), "BYTES")
    return tensor.set_data_from_numpy(array, binary_data=True)


def build(
    inputs: list[InferInput], outputs: list[InferRequestedOutput] | None = None, **kwargs: object
) -> tuple[bytes, int | None]:
    """The exact body and header length tritonclient would send."""
    return triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kwargs)


def decode(
    sig: Signature, body: bytes, header_length: int | None, max_batch: int = MAX_BATCH
) -> InferRequest:
    return decode_infer_request(body, header_length, sig, max_batch)


def roundtrip(
    request: InferRequest,
    logits: np.ndarray,
    sig: Signature,
    errors: dict[int, ImageRejected] | None = None,
) -> InferResult:
    encoded = encode_infer_response(request, logits, sig, errors)
    assert encoded.content_type == (
        "application/json" if encoded.header_length is None else "application/octet-stream"
    )
    return InferResult.from_response_body(encoded.body, header_length=encoded.header_length)


def text(item: bytes | str) -> str:
    """tritonclient reads BYTES as bytes from binary data and as str from JSON."""
    return item.decode() if isinstance(item, bytes) else item


def parse_classes(row: np.ndarray) -> list[tuple[float, int, str]]:
    parsed = []
    for item in row:
        score, index, label = text(item).split(":", 2)
        parsed.append((float(score), int(index), label))
    return parsed


# -- UINT8 tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_tensor_decodes_to_the_same_pixels(sig: Signature, binary: bool) -> None:
    x = pixels(3, sig)
    body, header_length = build([uint8_input(sig, x, binary)], request_id="req-7")
    assert (header_length is not None) == binary

    request = decode(sig, body, header_length)

    assert request.files is None and request.batch_size == 3 and request.id == "req-7"
    assert request.pixels.dtype == np.uint8
    np.testing.assert_array_equal(request.pixels, x)


def test_nested_json_data_is_accepted_like_flat(sig: Signature) -> None:
    x = pixels(2, sig)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": sig.input_name,
                    "shape": list(x.shape),
                    "datatype": "UINT8",
                    "data": x.tolist(),
                }
            ]
        }
    ).encode()
    np.testing.assert_array_equal(decode(sig, body, None).pixels, x)


def test_null_parameters_read_as_none(sig: Signature) -> None:
    body = json.dumps(
        {
            "id": None,
            "parameters": None,
            "outputs": None,
            "inputs": [
                {
                    "name": sig.input_name,
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": None,
                    "data": ["x"],
                }
            ],
        }
    ).encode()
    request = decode(sig, body, None)
    assert request.files == (b"x",) and request.id is None


def test_without_outputs_every_output_follows_binary_data_output(sig: Signature) -> None:
    x = pixels(1, sig)
    # tritonclient asks for binary outputs (request-level binary_data_output) when none named
    request = decode(sig, *build([uint8_input(sig, x, True)]))
    assert [(o.name, o.binary, o.classification) for o in request.outputs] == [
        (sig.output_name, True, 0)
    ]
    plain = json.dumps(
        {
            "inputs": [
                {
                    "name": sig.input_name,
                    "shape": list(x.shape),
                    "datatype": "UINT8",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    assert decode(sig, plain.encode(), None).outputs[0].binary is False


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary", "json"])
def test_logits_round_trip_through_tritonclient(sig: Signature, binary_out: bool) -> None:
    x = pixels(4, sig)
    body, hl = build(
        [uint8_input(sig, x, True)],
        [InferRequestedOutput(sig.output_name, binary_data=binary_out)],
        request_id="abc",
    )
    request = decode(sig, body, hl)
    logits = logits_for(4, sig)

    result = roundtrip(request, logits, sig)

    got = result.as_numpy(sig.output_name)
    assert got.dtype == np.float32 and got.shape == (4, sig.num_classes)
    np.testing.assert_array_equal(got, logits)  # exact: JSON floats round-trip float32 too
    response = result.get_response()
    assert response["model_name"] == sig.model_name
    assert response["model_version"] == sig.model_version
    assert response["id"] == "abc"


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary", "json"])
def test_classification_extension_gives_triton_strings(sig: Signature, binary_out: bool) -> None:
    x = pixels(3, sig)
    body, hl = build(
        [uint8_input(sig, x, True)],
        [InferRequestedOutput(sig.output_name, binary_data=binary_out, class_count=3)],
    )
    request = decode(sig, body, hl)
    assert request.outputs[0].classification == 3
    logits = logits_for(3, sig)

    got = roundtrip(request, logits, sig).as_numpy(sig.output_name)

    assert got.shape == (3, 3)
    for row in range(3):
        parsed = parse_classes(got[row])
        expected = np.argsort(-logits[row], kind="stable")[:3]
        assert [index for _, index, _ in parsed] == expected.tolist()
        assert [label for _, _, label in parsed] == [sig.labels[i] for i in expected]
        assert [score for score, _, _ in parsed] == pytest.approx(
            logits[row, expected].tolist(), abs=1e-6
        )


def test_classification_breaks_ties_by_index_and_clamps_k(sig: Signature) -> None:
    x = pixels(1, sig)
    body, hl = build(
        [uint8_input(sig, x, True)], [InferRequestedOutput(sig.output_name, class_count=50)]
    )
    logits = np.zeros((1, sig.num_classes), np.float32)
    logits[0, 7] = 2.5
    logits[0, 2] = logits[0, 4] = 1.0

    got = roundtrip(decode(sig, body, hl), logits, sig).as_numpy(sig.output_name)

    assert got.shape == (1, sig.num_classes)  # k above the class count: every class
    assert [i for _, i, _ in parse_classes(got[0])][:4] == [7, 2, 4, 0]
    assert got[0, 0].decode() == f"2.500000:7:{sig.labels[7]}"


# -- BYTES of encoded images --------------------------------------------------------------


@pytest.mark.parametrize("shape", [[3], [3, 1]], ids=["N", "Nx1"])
def test_bytes_input_carries_the_files_unchanged(sig: Signature, shape: list[int]) -> None:
    blobs = [
        encode(photo(40, 30, seed=1), "PNG"),
        encode(photo(64, 64, seed=2), "JPEG"),
        b"\x00\xff not an image \x00",
    ]
    request = decode(sig, *build([files_input(sig, blobs, shape)]))
    assert request.pixels is None
    assert request.files == tuple(blobs)
    assert request.batch_size == 3


def test_bytes_in_json_are_utf8_strings(sig: Signature) -> None:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": sig.input_name,
                    "shape": [2, 1],
                    "datatype": "BYTES",
                    "data": [["é"], ["b"]],
                }
            ]
        }
    ).encode()
    assert decode(sig, body, None).files == ("é".encode(), b"b")


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary", "json"])
def test_a_failed_image_among_good_ones(sig: Signature, binary_out: bool) -> None:
    blobs = [encode(photo(28, 28, seed=s), "PNG") for s in range(3)]
    outputs = [InferRequestedOutput(sig.output_name, binary_data=binary_out)]
    request = decode(sig, *build([files_input(sig, blobs)], outputs))
    logits = logits_for(3, sig)
    errors = {1: ImageRejected("not an image: cannot identify image file", status=415)}

    result = roundtrip(request, logits, sig, errors)

    got = result.as_numpy(sig.output_name)
    np.testing.assert_array_equal(got[[0, 2]], logits[[0, 2]])
    assert np.isnan(got[1]).all()
    messages = result.as_numpy(IMAGE_ERRORS_OUTPUT)
    assert messages.shape == (3,)
    assert [text(m) for m in messages] == ["", "not an image: cannot identify image file", ""]


def test_a_failed_image_has_empty_classification_strings(sig: Signature) -> None:
    blobs = [b"a", b"b"]
    outputs = [InferRequestedOutput(sig.output_name, class_count=2)]
    request = decode(sig, *build([files_input(sig, blobs)], outputs))
    result = roundtrip(request, logits_for(2, sig), sig, {0: ImageRejected("corrupt")})
    got = result.as_numpy(sig.output_name)
    assert got[0].tolist() == [b"", b""]
    assert all(s.count(b":") >= 2 for s in got[1])


def test_when_every_image_fails_the_request_fails(sig: Signature) -> None:
    request = decode(sig, *build([files_input(sig, [b"x", b"y"])]))
    errors = {
        0: ImageRejected("too many pixels", status=413),
        1: ImageRejected("too many pixels", status=413),
    }
    with pytest.raises(ImageRejected) as caught:
        encode_infer_response(request, logits_for(2, sig), sig, errors)
    assert caught.value.status == 413
    assert "image 0: too many pixels" in caught.value.message
    assert "1 more" in caught.value.message


def test_logits_of_the_wrong_shape_are_a_server_error(sig: Signature) -> None:
    request = decode(sig, *build([uint8_input(sig, pixels(2, sig), True)]))
    with pytest.raises(V2Error) as caught:
        encode_infer_response(request, logits_for(3, sig), sig)
    assert caught.value.status == 500


# -- malformed requests -------------------------------------------------------------------


def test_wrong_shape(sig: Signature) -> None:
    x = np.zeros((2, 3, sig.height, sig.width), np.uint8)
    with pytest.raises(ShapeMismatch, match=r"\[N, 1, 28, 28\]") as caught:
        decode(sig, *build([uint8_input(sig, x, True)]))
    assert caught.value.status == 400


def test_wrong_datatype(sig: Signature) -> None:
    x = np.zeros((1, *sig.image_shape), np.float32)
    tensor = InferInput(sig.input_name, list(x.shape), "FP32").set_data_from_numpy(x)
    with pytest.raises(DatatypeMismatch, match=r"FP32.*UINT8"):
        decode(sig, *build([tensor]))


def test_not_a_datatype_at_all(sig: Signature) -> None:
    body = json.dumps(
        {"inputs": [{"name": sig.input_name, "shape": [1], "datatype": "PIXELS", "data": [1]}]}
    ).encode()
    with pytest.raises(DatatypeMismatch, match="not a datatype"):
        decode(sig, body, None)


def test_unknown_input_name(sig: Signature) -> None:
    x = pixels(1, sig)
    tensor = InferInput("input_1", list(x.shape), "UINT8").set_data_from_numpy(x)
    with pytest.raises(UnknownTensor, match=r"'input_1'.*'image'"):
        decode(sig, *build([tensor]))


def test_two_inputs(sig: Signature) -> None:
    x = pixels(1, sig)
    with pytest.raises(InvalidRequest, match="2 times"):
        decode(sig, *build([uint8_input(sig, x, True), uint8_input(sig, x, True)]))


def test_unknown_output_name(sig: Signature) -> None:
    with pytest.raises(UnknownTensor, match="'probabilities'"):
        decode(
            sig,
            *build(
                [uint8_input(sig, pixels(1, sig), True)], [InferRequestedOutput("probabilities")]
            ),
        )


def test_output_requested_twice(sig: Signature) -> None:
    with pytest.raises(InvalidRequest, match="more than once"):
        decode(
            sig,
            *build(
                [uint8_input(sig, pixels(1, sig), True)],
                [
                    InferRequestedOutput(sig.output_name),
                    InferRequestedOutput(sig.output_name, class_count=2),
                ],
            ),
        )


def test_batch_over_the_maximum(sig: Signature) -> None:
    with pytest.raises(BatchTooLarge, match=r"batch size 3 .* maximum of 2"):
        decode(sig, *build([uint8_input(sig, pixels(3, sig), True)]), max_batch=2)
    with pytest.raises(BatchTooLarge):
        decode(sig, *build([files_input(sig, [b"a", b"b", b"c"])]), max_batch=2)


def test_empty_batch(sig: Signature) -> None:
    x = np.zeros((0, *sig.image_shape), np.uint8)
    with pytest.raises(ShapeMismatch, match="no image"):
        decode(sig, *build([uint8_input(sig, x, True)]))


def test_binary_data_shorter_than_declared(sig: Signature) -> None:
    body, hl = build([uint8_input(sig, pixels(2, sig), True)])
    with pytest.raises(BinaryDataError, match=r"only .* bytes follow"):
        decode(sig, body[:-1], hl)


def test_binary_data_longer_than_declared(sig: Signature) -> None:
    body, hl = build([uint8_input(sig, pixels(2, sig), True)])
    with pytest.raises(BinaryDataError, match="not claimed"):
        decode(sig, body + b"\x00\x00", hl)


def test_binary_data_size_disagrees_with_the_shape(sig: Signature) -> None:
    tensor = uint8_input(sig, pixels(2, sig), True)
    tensor.set_shape([3, *sig.image_shape])  # the client lies about its shape
    with pytest.raises(BinaryDataError, match=r"needs 2352 bytes.* gives 1568"):
        decode(sig, *build([tensor]))


def test_header_length_beyond_the_body(sig: Signature) -> None:
    body, _ = build([uint8_input(sig, pixels(1, sig), True)])
    with pytest.raises(BinaryDataError, match="only"):
        decode(sig, body, len(body) + 1)


def test_binary_data_without_the_header(sig: Signature) -> None:
    body, hl = build([uint8_input(sig, pixels(1, sig), True)])
    with pytest.raises((BinaryDataError, SchemaError)):
        decode(sig, body, None)
    with pytest.raises(BinaryDataError, match="no Inference-Header-Content-Length"):
        decode(sig, body[:hl], None)


@pytest.mark.parametrize("value", ["12x", "-1"])
def test_header_length_that_is_not_a_length(value: str) -> None:
    with pytest.raises(BinaryDataError):
        parse_header_length(value)


def test_header_length_is_parsed() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length("120") == 120


def test_truncated_bytes_element(sig: Signature) -> None:
    body, hl = build([files_input(sig, [b"abcdef"])])
    # Keep the declared size consistent with the body, but cut the element short.
    header = json.loads(body[:hl])
    header["inputs"][0]["parameters"]["binary_data_size"] = 7
    new_header = json.dumps(header).encode()
    with pytest.raises(BinaryDataError, match="declares 6 bytes but only 3 remain"):
        decode(sig, new_header + body[hl : hl + 7], len(new_header))


def test_bytes_count_disagrees_with_the_shape(sig: Signature) -> None:
    tensor = files_input(sig, [b"a", b"b"])
    tensor.set_shape([3])
    with pytest.raises(ShapeMismatch, match="needs 3 element"):
        decode(sig, *build([tensor]))


def test_bytes_of_the_wrong_rank(sig: Signature) -> None:
    with pytest.raises(ShapeMismatch, match=r"\[N\] or \[N, 1\]"):
        decode(sig, *build([files_input(sig, [b"a", b"b"], [1, 2])]))


@pytest.mark.parametrize(
    "body, match",
    [
        (b"{not json", "not valid JSON"),
        (b'{"inputs": "image"}', "inputs"),
        (b'{"inputs": []}', "inputs"),
        (b'{"outputs": []}', "inputs"),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8", "data": [1],'
            b' "colour": "red"}]}',
            "colour",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": ["1"], "datatype": "UINT8", "data": [1]}]}',
            "shape",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8"}]}',
            "neither data nor",
        ),
        (
            b'{"id": 5, "inputs": [{"name": "image", "shape": [1], "datatype": "UINT8",'
            b' "data": [1]}]}',
            "id",
        ),
    ],
)
def test_json_that_does_not_follow_the_schema(sig: Signature, body: bytes, match: str) -> None:
    with pytest.raises(SchemaError, match=match) as caught:
        decode(sig, body, None)
    assert caught.value.status == 400


def test_json_pixels_out_of_range_or_not_integers(sig: Signature) -> None:
    count = int(np.prod(sig.image_shape))
    for data, match in (
        ([256] * count, r"\[0, 255\]"),
        ([0.5] * count, "integers"),
        (["1"] * count, "integers"),
    ):
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": sig.input_name,
                        "datatype": "UINT8",
                        "shape": [1, *sig.image_shape],
                        "data": data,
                    }
                ]
            }
        )
        with pytest.raises(DatatypeMismatch, match=match):
            decode(sig, body.encode(), None)


def test_json_pixel_count_disagrees_with_the_shape(sig: Signature) -> None:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": sig.input_name,
                    "datatype": "UINT8",
                    "shape": [1, *sig.image_shape],
                    "data": [1, 2, 3],
                }
            ]
        }
    )
    with pytest.raises(ShapeMismatch, match="needs 784 values, data has 3"):
        decode(sig, body.encode(), None)


def test_shared_memory_is_refused(sig: Signature) -> None:
    tensor = InferInput(sig.input_name, [1, *sig.image_shape], "UINT8")
    tensor.set_shared_memory("region0", 784)
    with pytest.raises(Unsupported, match="shared-memory"):
        decode(sig, *build([tensor]))


def test_sequence_requests_are_refused(sig: Signature) -> None:
    with pytest.raises(Unsupported, match="sequence"):
        decode(
            sig,
            *build([uint8_input(sig, pixels(1, sig), True)], sequence_id=4, sequence_start=True),
        )


def test_timeout_parameter_is_kept(sig: Signature) -> None:
    request = decode(sig, *build([uint8_input(sig, pixels(1, sig), True)], timeout=250_000))
    assert request.timeout_us == 250_000


def test_bad_output_parameters(sig: Signature) -> None:
    for params in ({"classification": -1}, {"classification": "3"}, {"binary_data": 1}):
        body = json.dumps(
            {
                "inputs": [
                    {"name": sig.input_name, "datatype": "BYTES", "shape": [1], "data": ["x"]}
                ],
                "outputs": [{"name": sig.output_name, "parameters": params}],
            }
        )
        with pytest.raises(SchemaError, match=r"classification|binary_data"):
            decode(sig, body.encode(), None)


def test_a_three_channel_card(card: ModelCard) -> None:
    rgb = Signature.from_card(
        card.model_copy(
            update={
                "input": card.input.model_copy(
                    update={
                        "channels": 3,
                        "color": "RGB",
                        "height": 8,
                        "width": 6,
                        "mean": [0.5] * 3,
                        "std": [0.2] * 3,
                    }
                )
            }
        )
    )
    x = np.arange(2 * 3 * 8 * 6, dtype=np.int64).reshape(2, 3, 8, 6).astype(np.uint8)
    np.testing.assert_array_equal(decode(rgb, *build([uint8_input(rgb, x, True)])).pixels, x)
    with pytest.raises(ShapeMismatch, match=r"\[N, 3, 8, 6\]"):
        decode(rgb, *build([uint8_input(rgb, x.transpose(0, 2, 3, 1).copy(), True)]))


@pytest.mark.parametrize(
    "encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
def test_compressed_bodies(
    sig: Signature, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    x = pixels(2, sig)
    body, hl = build([uint8_input(sig, x, True)])
    plain = decompress(compress(body), encoding, limit=len(body))
    np.testing.assert_array_equal(decode(sig, plain, hl).pixels, x)
    with pytest.raises(PayloadTooLarge):
        decompress(compress(body), encoding, limit=len(body) - 1)
    with pytest.raises(SchemaError, match="ends early"):
        decompress(compress(body)[:-12], encoding, limit=len(body))
    assert decompress(body, None, limit=1) is body  # no encoding, nothing to inflate
    with pytest.raises(Unsupported, match="br"):
        decompress(body, "br", limit=len(body))


# -- errors --------------------------------------------------------------------------------


def test_error_body_is_the_protocols_string_form() -> None:
    error = BatchTooLarge("batch size 9 is more than the server's maximum of 8")
    assert error_content("/v2/models/m/infer", error.code, error.message) == {
        "error": "batch size 9 is more than the server's maximum of 8"
    }
    assert error_content("/classify", error.code, error.message) == {
        "error": {"code": "batch_too_large", "message": error.message}
    }
    assert error.status == 400
    assert V2Error("queue full", status=503, headers={"Retry-After": "1"}).headers == {
        "Retry-After": "1"
    }
