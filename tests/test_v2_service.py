"""The Open Inference Protocol (KServe V2) end to end: NVIDIA's own ``tritonclient[http]``
against a real ``python -m service`` serving the embedded model.

Every call a Triton user makes — health, server/model metadata (versioned), readiness, model
configuration, ``infer()`` in JSON and binary form with the model's UINT8 tensor or encoded
images (BYTES), the classification extension, statistics, the repository index — and the
errors, whose messages must reach the user as the protocol's string. Logits are checked
against a direct ONNX Runtime run of the graph the service runs. A second service (two
ingress workers, an API key, a long warm-up) checks 503 + Retry-After, the key, and that
everything works across workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from modelcard.preprocessing import load_array
from modelcard.schema import UNFUSED_FILE, read_card
from testkit.fashion import FashionTest
from testkit.images import TEXT, encode, photo, png, truncated_jpeg
from testkit.server import (
    EMBEDDED_MODEL,
    ServiceProcess,
    running_service,
    start_service,
    wait_until,
)
from testkit.sessions import served_graph_session

pytestmark = pytest.mark.e2e

CARD = read_card(EMBEDDED_MODEL)
NAME, VERSION = CARD.name, CARD.version
INPUT, OUTPUT = CARD.input.tensor, CARD.output.logits
MAX_IMAGES = 16
MAX_BODY = 2 * 2**20
# The engine may batch a request's images with others' (another batch size, other kernels'
# summation order), so equality is within float rounding of a direct run of the served graph;
# model.onnx must agree with model.se.onnx within 1e-5 (the export's own bound).
SERVED_ATOL = 1e-5
UNFUSED_ATOL = 1e-5


@pytest.fixture(scope="module")
def svc() -> Iterator[ServiceProcess]:
    env = {
        "SERESNET_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "SERESNET_MAX_BODY_BYTES": str(MAX_BODY),
        "SERESNET_WORKERS": "1",
    }
    with running_service(EMBEDDED_MODEL, env=env) as service:
        yield service


@pytest.fixture(scope="module")
def client(svc: ServiceProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(svc.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def served_session(svc: ServiceProcess) -> ort.InferenceSession:
    """The graph the service runs (fused with the op library, or not), run directly."""
    engine = httpx.get(f"{svc.url}/v2/models/{NAME}", timeout=30).json()["engine"]
    return served_graph_session(engine, EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def unfused_session() -> ort.InferenceSession:
    return ort.InferenceSession(
        str(EMBEDDED_MODEL / UNFUSED_FILE), providers=["CPUExecutionProvider"]
    )


def direct(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT], {INPUT: pixels})[0]


def pixels_of(images: np.ndarray) -> np.ndarray:
    """Fashion-MNIST 28x28 images as the model's UINT8 [N, 1, 28, 28]."""
    return np.ascontiguousarray(images[:, None, :, :], dtype=np.uint8)


def uint8_input(pixels: np.ndarray, binary: bool) -> triton.InferInput:
    inp = triton.InferInput(INPUT, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    return inp


def bytes_input(files: list[bytes]) -> triton.InferInput:
    # Always binary: JSON carries BYTES only as UTF-8 strings, which image files never are
    # (tritonclient refuses to try). The JSON/binary choice is then the outputs'.
    data = np.array(files, dtype=np.object_)
    inp = triton.InferInput(INPUT, [len(files)], "BYTES")
    inp.set_data_from_numpy(data, binary_data=True)
    return inp


def fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


# ----------------------------------------------------------------------------- server, model


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "seresnet-serve"
    assert set(meta["extensions"]) == {
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "statistics",
    }


def test_model_ready_with_and_without_version(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, VERSION)
    assert not client.is_model_ready(NAME, "7")
    assert not client.is_model_ready("resnet50")


def test_model_metadata_with_and_without_version(client: triton.InferenceServerClient) -> None:
    for meta in (client.get_model_metadata(NAME), client.get_model_metadata(NAME, VERSION)):
        assert meta["name"] == NAME and meta["versions"] == [VERSION]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [
            {"name": INPUT, "datatype": "UINT8", "shape": [-1, 1, 28, 28]},
            {"name": "image_files", "datatype": "BYTES", "shape": [-1]},
        ]
        assert meta["outputs"] == [
            {"name": OUTPUT, "datatype": "FP32", "shape": [-1, CARD.num_classes]}
        ]
        assert "engine" in meta and "card" in meta  # the service's extra fields stay
    e = fails(client.get_model_metadata, NAME, "7")
    assert e.status() == "404" and "'7'" in e.message() and "{" not in e.message()
    e = fails(client.get_model_metadata, "resnet50")
    assert e.status() == "404" and "resnet50" in e.message()


def test_model_config(client: triton.InferenceServerClient) -> None:
    for config in (client.get_model_config(NAME), client.get_model_config(NAME, VERSION)):
        assert config["name"] == NAME and config["max_batch_size"] == MAX_IMAGES
        assert config["input"][0]["name"] == INPUT
        assert config["input"][0]["data_type"] == "TYPE_UINT8"
        assert config["input"][0]["dims"] == [1, 28, 28]  # no batch axis: max_batch_size > 0
        assert config["output"][0]["dims"] == [CARD.num_classes]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] >= 0
        assert config["instance_group"][0]["kind"] in ("KIND_CPU", "KIND_GPU")
    assert fails(client.get_model_config, NAME, "2").status() == "404"


def test_repository_index(client: triton.InferenceServerClient) -> None:
    assert client.get_model_repository_index() == [
        {"name": NAME, "version": VERSION, "state": "READY", "reason": ""}
    ]


# ----------------------------------------------------------------------------- infer


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_uint8_tensor_equals_direct_onnxruntime(
    client: triton.InferenceServerClient,
    fashion: FashionTest,
    binary: bool,
    served_session: ort.InferenceSession,
    unfused_session: ort.InferenceSession,
) -> None:
    pixels = pixels_of(fashion.images[:MAX_IMAGES])
    out = triton.InferRequestedOutput(OUTPUT, binary_data=binary)
    result = client.infer(NAME, [uint8_input(pixels, binary)], outputs=[out], request_id="req-7")
    logits = result.as_numpy(OUTPUT)
    assert logits.dtype == np.float32 and logits.shape == (MAX_IMAGES, CARD.num_classes)
    np.testing.assert_allclose(logits, direct(served_session, pixels), rtol=0, atol=SERVED_ATOL)
    np.testing.assert_allclose(logits, direct(unfused_session, pixels), rtol=0, atol=UNFUSED_ATOL)
    response = result.get_response()
    assert response["model_name"] == NAME and response["model_version"] == VERSION
    assert response["id"] == "req-7"


def test_infer_compressed_request(
    client: triton.InferenceServerClient, fashion: FashionTest, served_session: ort.InferenceSession
) -> None:
    pixels = pixels_of(fashion.images[:4])
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            NAME, [uint8_input(pixels, True)], request_compression_algorithm=algorithm
        )
        np.testing.assert_allclose(
            result.as_numpy(OUTPUT), direct(served_session, pixels), rtol=0, atol=SERVED_ATOL
        )


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_encoded_images_decoded_as_classify_does(
    client: triton.InferenceServerClient,
    fashion: FashionTest,
    binary: bool,
    served_session: ort.InferenceSession,
) -> None:
    files = [png(image) for image in fashion.images[:6]]
    files.append(encode(photo(300, 200, seed=3), "JPEG", quality=90))  # resized and greyed
    result = client.infer(
        NAME,
        [bytes_input(files)],
        model_version=VERSION,
        outputs=[triton.InferRequestedOutput(OUTPUT, binary_data=binary)],
    )
    expected = direct(served_session, np.stack([load_array(f, CARD.input) for f in files]))
    np.testing.assert_allclose(result.as_numpy(OUTPUT), expected, rtol=0, atol=SERVED_ATOL)
    assert result.as_numpy("image_errors") is None  # every image classified: no error output


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_extension(
    client: triton.InferenceServerClient,
    fashion: FashionTest,
    binary: bool,
    served_session: ort.InferenceSession,
) -> None:
    pixels = pixels_of(fashion.images[:4])
    out = triton.InferRequestedOutput(OUTPUT, binary_data=binary, class_count=3)
    strings = client.infer(NAME, [uint8_input(pixels, binary)], outputs=[out]).as_numpy(OUTPUT)
    assert strings.shape == (4, 3)
    logits = direct(served_session, pixels)
    for row, expected in zip(strings, logits, strict=True):
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]
        ids = [int(index) for _, index, _ in parsed]
        assert ids == list(np.argsort(-expected, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [CARD.labels[i] for i in ids]
        np.testing.assert_allclose(
            [float(score) for score, _, _ in parsed], expected[ids], atol=1e-5
        )


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_corrupt_image_among_good_ones(
    client: triton.InferenceServerClient,
    fashion: FashionTest,
    binary: bool,
    served_session: ort.InferenceSession,
) -> None:
    files = [png(fashion.images[0]), truncated_jpeg(), png(fashion.images[1]), TEXT]
    result = client.infer(
        NAME,
        [bytes_input(files)],
        outputs=[triton.InferRequestedOutput(OUTPUT, binary_data=binary)],
    )
    logits = result.as_numpy(OUTPUT)
    errors = [e.decode() if isinstance(e, bytes) else e for e in result.as_numpy("image_errors")]
    assert errors[0] == "" and errors[2] == ""
    assert errors[1] and errors[3] and "not a supported image" in errors[3]
    assert np.isnan(logits[[1, 3]]).all()
    good = np.stack([load_array(files[i], CARD.input) for i in (0, 2)])
    np.testing.assert_allclose(
        logits[[0, 2]], direct(served_session, good), rtol=0, atol=SERVED_ATOL
    )


def test_only_image_corrupt_fails_the_request(client: triton.InferenceServerClient) -> None:
    e = fails(client.infer, NAME, [bytes_input([TEXT])])
    assert e.status() == "415" and "not a supported image" in e.message()


# ----------------------------------------------------------------------------- errors


def test_wrong_shape(client: triton.InferenceServerClient) -> None:
    for shape in ([2, 1, 32, 32], [2, 28, 28], [2, 3, 28, 28]):
        e = fails(client.infer, NAME, [uint8_input(np.zeros(shape, np.uint8), True)])
        assert e.status() == "400" and "[N, 1, 28, 28]" in e.message(), shape


def test_wrong_datatype(client: triton.InferenceServerClient) -> None:
    inp = triton.InferInput(INPUT, [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    e = fails(client.infer, NAME, [inp])
    assert e.status() == "400" and "FP32" in e.message() and "UINT8" in e.message()


def test_unknown_input_model_and_version(client: triton.InferenceServerClient) -> None:
    pixels = np.zeros((1, 1, 28, 28), np.uint8)
    wrong = triton.InferInput("input0", [1, 1, 28, 28], "UINT8")
    wrong.set_data_from_numpy(pixels)
    e = fails(client.infer, NAME, [wrong])
    assert e.status() == "400" and "input0" in e.message()
    e = fails(client.infer, "resnet50", [uint8_input(pixels, True)])
    assert e.status() == "404" and "resnet50" in e.message()
    e = fails(client.infer, NAME, [uint8_input(pixels, True)], model_version="2")
    assert e.status() == "404" and "'2'" in e.message()


def test_batch_over_the_limit(client: triton.InferenceServerClient) -> None:
    pixels = np.zeros((MAX_IMAGES + 1, 1, 28, 28), np.uint8)
    e = fails(client.infer, NAME, [uint8_input(pixels, True)])
    assert e.status() == "400" and f"maximum of {MAX_IMAGES}" in e.message()
    files = [png(np.zeros((28, 28), np.uint8))] * (MAX_IMAGES + 1)
    assert fails(client.infer, NAME, [bytes_input(files)]).status() == "400"


def test_body_over_the_limit(client: triton.InferenceServerClient) -> None:
    big = np.random.default_rng(0).bytes(MAX_BODY)  # with the JSON header: over the limit
    e = fails(client.infer, NAME, [bytes_input([big])])
    assert e.status() == "413" and "SERESNET_MAX_BODY_BYTES" in e.message()


def test_deadline(client: triton.InferenceServerClient) -> None:
    # Triton's per-request timeout (microseconds) shortens the server's deadline.
    e = fails(
        client.infer, NAME, [uint8_input(np.zeros((1, 1, 28, 28), np.uint8), True)], timeout=1
    )
    assert e.status() == "504" and "deadline" in e.message()


def test_error_bodies_are_the_protocols_string(svc: ServiceProcess) -> None:
    with httpx.Client(base_url=svc.url, timeout=30) as http:
        for r in (
            http.get("/v2/models/nope"),
            http.get(f"/v2/models/{NAME}/versions/9/ready"),
            http.post(f"/v2/models/{NAME}/infer", content=b"{not json"),
            http.get("/v2/no/such/route"),
        ):
            assert r.status_code in (400, 404)
            body = r.json()
            assert set(body) == {"error"} and isinstance(body["error"], str), body
        # /classify keeps its own richer shape.
        r = http.post("/classify", content=TEXT, headers={"Content-Type": "image/png"})
        assert set(r.json()["error"]) == {"code", "message"}


# ----------------------------------------------------------------------------- statistics


def test_statistics_count_requests_and_images(
    client: triton.InferenceServerClient, fashion: FashionTest
) -> None:
    def stat() -> dict:
        stats = client.get_inference_statistics(NAME)["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [(NAME, VERSION)]
        return stats[0]

    before = stat()
    t0_ms = time.time() * 1000
    for n in (1, 3, 5):
        client.infer(NAME, [uint8_input(pixels_of(fashion.images[:n]), True)])
    fails(client.infer, NAME, [uint8_input(np.zeros((1, 1, 9, 9), np.uint8), True)])
    after = stat()
    assert after["inference_count"] - before["inference_count"] == 9
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    ok, bad = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert ok["count"] - before["inference_stats"]["success"]["count"] == 3
    assert ok["ns"] > before["inference_stats"]["success"]["ns"]
    assert bad["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert after["inference_stats"]["compute_infer"]["ns"] > 0
    assert after["inference_stats"]["queue"]["count"] >= 9
    assert after["last_inference"] >= t0_ms - 1000
    # Per exact batch size: the runs add up to the executions, the sizes to the images.
    sizes = {b["batch_size"]: b["compute_infer"] for b in after["batch_stats"]}
    assert sum(b["count"] for b in sizes.values()) == after["execution_count"]
    assert sum(k * b["count"] for k, b in sizes.items()) == after["inference_count"]
    assert all(b["ns"] > 0 for b in sizes.values())
    assert client.get_inference_statistics(NAME, VERSION)["model_stats"][0]["name"] == NAME
    everything = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in everything] == [NAME]
    assert fails(client.get_inference_statistics, NAME, "3").status() == "404"


# ----------------------------------------------------------------------------- two workers


@dataclass
class Guarded:
    svc: ServiceProcess
    early: httpx.Response
    key: str


@pytest.fixture(scope="module")
def guarded() -> Iterator[Guarded]:
    """Two ingress workers, an API key, and a warm-up long enough to be caught in."""
    key = "v2-s3cret"
    env = {"SERESNET_WORKERS": "2", "SERESNET_API_KEY": key, "SERESNET_WARMUP_ROUNDS": "300"}
    with start_service(EMBEDDED_MODEL, env=env) as svc:
        wait_until(svc, "/v2/health/live", time.monotonic() + 120)
        body = (
            b'{"inputs":[{"name":"image","shape":[1,1,28,28],"datatype":"UINT8",'
            b'"data":[' + b",".join([b"0"] * 784) + b"]}]}"
        )
        early = httpx.post(
            f"{svc.url}/v2/models/{NAME}/infer",
            content=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        wait_until(svc, "/v2/health/ready", time.monotonic() + 300)
        yield Guarded(svc, early, key)


def test_not_ready_is_503_with_retry_after(guarded: Guarded) -> None:
    assert guarded.early.status_code == 503
    assert int(guarded.early.headers["retry-after"]) >= 1
    assert "warming up" in guarded.early.json()["error"]


def test_two_workers_with_an_api_key(
    guarded: Guarded, fashion: FashionTest, served_session: ort.InferenceSession
) -> None:
    url = guarded.svc.url.removeprefix("http://")
    anonymous = triton.InferenceServerClient(url)
    e = fails(anonymous.get_model_metadata, NAME)
    assert e.status() == "401" and "Authorization: Bearer" in e.message()
    assert anonymous.is_server_ready()  # health stays open
    headers = {"Authorization": f"Bearer {guarded.key}"}
    client = triton.InferenceServerClient(url, concurrency=4)
    pixels = pixels_of(fashion.images[:8])
    expected = direct(served_session, pixels)
    # Several connections, so both workers serve some of them.
    pending = [
        client.async_infer(NAME, [uint8_input(pixels, True)], headers=headers) for _ in range(12)
    ]
    for p in pending:
        np.testing.assert_allclose(
            p.get_result().as_numpy(OUTPUT), expected, rtol=0, atol=SERVED_ATOL
        )
    stats = client.get_inference_statistics(NAME, headers=headers)["model_stats"][0]
    assert stats["inference_count"] >= 12 * 8  # summed over both workers and the engine
    assert stats["inference_stats"]["success"]["count"] >= 12
    client.close()
    anonymous.close()
