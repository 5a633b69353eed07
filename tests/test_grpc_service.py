"""The Open Inference Protocol over gRPC end to end: NVIDIA's own ``tritonclient.grpc`` (and
its generated stub, for what its client object cannot send) against a real ``python -m
service`` serving the embedded model on a gRPC port of its own.

Every call a Triton user makes — health, server/model metadata, readiness, model
configuration, the repository index, statistics, ``infer()`` with the model's UINT8 tensor in
``raw_input_contents`` or typed contents, encoded images as BYTES (raw and typed), the
classification extension, per-image errors — and the errors with their gRPC status codes
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED with retry information, DEADLINE_EXCEEDED,
UNAUTHENTICATED). Logits are checked against a direct ONNX Runtime run of the graph the
service runs. A second service (two workers sharing the port, an API key) checks the key and
that both workers serve; a third (a long batching delay, a small queue) checks the busy
answer, a gRPC deadline that withdraws the images, and the drain on SIGTERM.

Only tritonclient's generated modules are imported here, never the service's own
:mod:`service.grpc.server`; the service's messages live in a descriptor pool of their own
(:mod:`service.grpc.protocol`), which is imported once to read the rich error trailer.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from export.fashion_mnist import load as load_fashion_mnist
from modelcard.preprocessing import load_array
from modelcard.schema import UNFUSED_FILE, read_card
from service.grpc import protocol
from testkit.images import TEXT, encode, photo, png, truncated_jpeg
from testkit.server import EMBEDDED_MODEL, ServiceProcess, free_port, running_service
from testkit.sessions import served_graph_session

pytestmark = pytest.mark.e2e

CARD = read_card(EMBEDDED_MODEL)
NAME, VERSION = CARD.name, CARD.version
INPUT, OUTPUT, FILES = CARD.input.tensor, CARD.output.logits, "image_files"
MAX_IMAGES = 16
MAX_BODY = 2 * 2**20
SERVED_ATOL = 1e-5  # as tests/test_v2_service.py: batching may change the summation order
UNFUSED_ATOL = 1e-5


@dataclass
class Grpc:
    svc: ServiceProcess
    target: str

    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        channel = grpc.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", -1)]
        )
        return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _grpc_target(svc: ServiceProcess) -> str:
    for record in svc.log_records():
        if record.get("event") == "listening" and record.get("grpc"):
            return str(record["grpc"])
    raise AssertionError(f"no gRPC address in the log:\n{svc.log_text()}")


@contextlib.contextmanager
def grpc_service(env: dict[str, str]) -> Iterator[Grpc]:
    full = {"SERESNET_GRPC_PORT": str(free_port()), **env}
    with running_service(EMBEDDED_MODEL, env=full) as svc:
        yield Grpc(svc, _grpc_target(svc))


@pytest.fixture(scope="module")
def served() -> Iterator[Grpc]:
    env = {
        "SERESNET_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "SERESNET_MAX_BODY_BYTES": str(MAX_BODY),
        "SERESNET_WORKERS": "1",
    }
    with grpc_service(env) as g:
        yield g


@pytest.fixture(scope="module")
def client(served: Grpc) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(served.target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    images, _ = load_fashion_mnist("test")
    return images[:32]


@pytest.fixture(scope="module")
def served_session(served: Grpc) -> ort.InferenceSession:
    """The graph the service runs (fused with the op library, or not), run directly."""
    engine = httpx.get(f"{served.svc.url}/v2/models/{NAME}", timeout=30).json()["engine"]
    return served_graph_session(engine, EMBEDDED_MODEL)


def direct(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT], {INPUT: pixels})[0]


def pixels_of(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, None, :, :], dtype=np.uint8)


def uint8_input(pixels: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput(INPUT, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    return inp


def bytes_input(files: list[bytes], name: str = FILES) -> triton.InferInput:
    inp = triton.InferInput(name, [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    return inp


def fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def rpc_fails(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=60)
    return info.value


def trailers(e: grpc.RpcError) -> dict[str, str | bytes]:
    return dict(e.trailing_metadata() or ())


# ----------------------------------------------------------------------------- server, model


def test_health_metadata_config_and_index(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "seresnet-serve"
    assert set(meta["extensions"]) >= {"binary_tensor_data", "classification", "statistics"}
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, VERSION)
    assert not client.is_model_ready(NAME, "7") and not client.is_model_ready("resnet50")
    for model in (client.get_model_metadata(NAME), client.get_model_metadata(NAME, VERSION)):
        assert model.name == NAME and list(model.versions) == [VERSION]
        assert model.platform == "onnxruntime_onnx"
        # The tensor, and encoded image files: a client reading the metadata learns both.
        inputs = [(t.name, t.datatype, list(t.shape)) for t in model.inputs]
        assert inputs == [(INPUT, "UINT8", [-1, 1, 28, 28]), (FILES, "BYTES", [-1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            (OUTPUT, "FP32", [-1, CARD.num_classes])
        ]
    config = client.get_model_config(NAME).config
    assert config.name == NAME and config.max_batch_size == MAX_IMAGES
    assert config.backend == "onnxruntime"
    assert [i.name for i in config.input] == [INPUT, FILES]
    assert [list(o.dims) for o in config.output] == [[CARD.num_classes]]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": NAME, "version": VERSION, "state": "READY"}]
    e = fails(client.get_model_metadata, "resnet50")
    assert e.status() == "StatusCode.NOT_FOUND" and "resnet50" in e.message()


# ----------------------------------------------------------------------------- infer


def test_infer_uint8_raw_contents_equals_direct_onnxruntime(
    client: triton.InferenceServerClient, fashion: np.ndarray, served_session: ort.InferenceSession
) -> None:
    pixels = pixels_of(fashion[:MAX_IMAGES])
    result = client.infer(NAME, [uint8_input(pixels)], request_id="req-7")
    logits = result.as_numpy(OUTPUT)
    assert logits.dtype == np.float32 and logits.shape == (MAX_IMAGES, CARD.num_classes)
    np.testing.assert_allclose(logits, direct(served_session, pixels), rtol=0, atol=SERVED_ATOL)
    unfused = ort.InferenceSession(
        str(EMBEDDED_MODEL / UNFUSED_FILE), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(logits, direct(unfused, pixels), rtol=0, atol=UNFUSED_ATOL)
    response = result.get_response()
    assert response.model_name == NAME and response.model_version == VERSION
    assert response.id == "req-7"


def test_infer_typed_contents(
    served: Grpc, fashion: np.ndarray, served_session: ort.InferenceSession
) -> None:
    """What tritonclient's object never sends but the protocol allows (KServe's clients do):
    the tensor in ``uint_contents``, encoded files in ``bytes_contents``."""
    stub = served.stub()
    pixels = pixels_of(fashion[:3])
    request = service_pb2.ModelInferRequest(model_name=NAME)
    tensor = request.inputs.add(name=INPUT, datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    response = stub.ModelInfer(request, timeout=60)
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, -1)
    np.testing.assert_allclose(logits, direct(served_session, pixels), rtol=0, atol=SERVED_ATOL)

    files = [png(image) for image in fashion[:2]]
    request = service_pb2.ModelInferRequest(model_name=NAME, model_version=VERSION)
    tensor = request.inputs.add(name=FILES, datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend(files)
    response = stub.ModelInfer(request, timeout=60)
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, -1)
    expected = direct(served_session, np.stack([load_array(f, CARD.input) for f in files]))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=SERVED_ATOL)

    # More typed values than a full batch holds are refused before they become objects.
    request = service_pb2.ModelInferRequest(model_name=NAME)
    tensor = request.inputs.add(name=INPUT, datatype="UINT8", shape=[MAX_IMAGES, 1, 28, 28])
    tensor.contents.uint_contents.extend([0] * (MAX_IMAGES * 784 + 1))
    e = rpc_fails(stub.ModelInfer, request)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "values" in e.details()

    # raw_input_contents for some inputs only is no request.
    request = service_pb2.ModelInferRequest(model_name=NAME)
    request.inputs.add(name=FILES, datatype="BYTES", shape=[1])
    request.inputs.add(name=INPUT, datatype="UINT8", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(b"\0" * 784)
    e = rpc_fails(stub.ModelInfer, request)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in e.details()
    assert trailers(e)["seresnet-error-code"] == "binary_data_error"


@pytest.mark.parametrize("name", [FILES, INPUT])
def test_infer_encoded_images_decoded_as_classify_does(
    client: triton.InferenceServerClient,
    fashion: np.ndarray,
    served_session: ort.InferenceSession,
    name: str,
) -> None:
    files = [png(image) for image in fashion[:5]]
    files.append(encode(photo(300, 200, seed=3), "JPEG", quality=90))  # resized and greyed
    result = client.infer(NAME, [bytes_input(files, name)], model_version=VERSION)
    expected = direct(served_session, np.stack([load_array(f, CARD.input) for f in files]))
    np.testing.assert_allclose(result.as_numpy(OUTPUT), expected, rtol=0, atol=SERVED_ATOL)
    assert result.as_numpy("image_errors") is None


def test_classification_extension(
    client: triton.InferenceServerClient, fashion: np.ndarray, served_session: ort.InferenceSession
) -> None:
    pixels = pixels_of(fashion[:4])
    out = triton.InferRequestedOutput(OUTPUT, class_count=3)
    strings = client.infer(NAME, [uint8_input(pixels)], outputs=[out]).as_numpy(OUTPUT)
    assert strings.shape == (4, 3)
    logits = direct(served_session, pixels)
    for row, expected in zip(strings, logits, strict=True):
        parsed = [s.decode().split(":", 2) for s in row]
        ids = [int(index) for _, index, _ in parsed]
        assert ids == list(np.argsort(-expected, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [CARD.labels[i] for i in ids]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], expected[ids], atol=1e-5)


def test_corrupt_image_among_good_ones(
    client: triton.InferenceServerClient, fashion: np.ndarray, served_session: ort.InferenceSession
) -> None:
    files = [png(fashion[0]), truncated_jpeg(), png(fashion[1]), TEXT]
    result = client.infer(NAME, [bytes_input(files)])
    logits = result.as_numpy(OUTPUT)
    errors = [e.decode() for e in result.as_numpy("image_errors")]
    assert errors[0] == "" and errors[2] == ""
    assert errors[1] and "not a supported image" in errors[3]
    assert np.isnan(logits[[1, 3]]).all()
    good = np.stack([load_array(files[i], CARD.input) for i in (0, 2)])
    np.testing.assert_allclose(logits[[0, 2]], direct(served_session, good), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_invalid_requests_are_invalid_argument(served: Grpc) -> None:
    client = triton.InferenceServerClient(served.target)
    e = fails(client.infer, NAME, [bytes_input([TEXT])])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "not a supported image" in e.message()
    e = fails(client.infer, NAME, [uint8_input(np.zeros((2, 1, 32, 32), np.uint8))])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "[N, 1, 28, 28]" in e.message()
    fp32 = triton.InferInput(INPUT, [1, 1, 28, 28], "FP32")
    fp32.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    e = fails(client.infer, NAME, [fp32])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "UINT8" in e.message()
    wrong = triton.InferInput("input0", [1, 1, 28, 28], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.uint8))
    e = fails(client.infer, NAME, [wrong])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "input0" in e.message()
    too_many = np.zeros((MAX_IMAGES + 1, 1, 28, 28), np.uint8)
    e = fails(client.infer, NAME, [uint8_input(too_many)])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and f"maximum of {MAX_IMAGES}" in e.message()
    one = uint8_input(np.zeros((1, 1, 28, 28), np.uint8))
    e = fails(client.infer, "resnet50", [one])
    assert e.status() == "StatusCode.NOT_FOUND" and "resnet50" in e.message()
    e = fails(client.infer, NAME, [one], model_version="2")
    assert e.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_message_over_the_body_limit(served: Grpc) -> None:
    client = triton.InferenceServerClient(served.target)
    big = np.random.default_rng(0).bytes(MAX_BODY)
    e = fails(client.infer, NAME, [bytes_input([big])])
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED"
    client.close()


def test_tritons_timeout_parameter(client: triton.InferenceServerClient) -> None:
    # Triton's per-request timeout (microseconds) shortens the server's deadline.
    one = uint8_input(np.zeros((1, 1, 28, 28), np.uint8))
    e = fails(client.infer, NAME, [one], timeout=1)
    assert e.status() == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in e.message()


def test_statistics_and_logs(served: Grpc, client: triton.InferenceServerClient) -> None:
    before = client.get_inference_statistics(NAME, as_json=True)["model_stats"][0]
    client.infer(NAME, [uint8_input(np.zeros((3, 1, 28, 28), np.uint8))], request_id="stats")
    after = client.get_inference_statistics(NAME, VERSION, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 3
    success = after["inference_stats"]["success"]
    assert int(success["count"]) == int(before["inference_stats"]["success"].get("count", 0)) + 1
    e = fails(client.get_inference_statistics, NAME, "3")
    assert e.status() == "StatusCode.NOT_FOUND"
    # One access-log line per call, as over HTTP, and gRPC's own counter by method and status.
    lines = [
        r
        for r in served.svc.log_records()
        if r.get("event") == "request" and r.get("protocol") == "grpc"
    ]
    assert any(r["path"].endswith("/ModelInfer") and r.get("images") == 3 for r in lines)
    assert any(
        r["grpc_status"] == "NOT_FOUND" and r.get("code") == "model_not_found" for r in lines
    )
    text = served.svc.metrics_text()
    assert "seresnet_grpc_requests_total" in text and 'method="ModelInfer"' in text


# ----------------------------------------------------------------------------- two workers, a key


def test_two_workers_with_an_api_key(fashion: np.ndarray) -> None:
    key = "grpc-s3cret"
    with grpc_service({"SERESNET_WORKERS": "2", "SERESNET_API_KEY": key}) as g:
        anonymous = triton.InferenceServerClient(g.target)
        assert anonymous.is_server_live() and anonymous.is_server_ready()  # as HTTP's health
        e = fails(anonymous.get_model_metadata, NAME)
        assert e.status() == "StatusCode.UNAUTHENTICATED" and "Bearer" in e.message()
        one = uint8_input(pixels_of(fashion[:1]))
        assert fails(anonymous.infer, NAME, [one]).status() == "StatusCode.UNAUTHENTICATED"
        wrong = {"authorization": "Bearer nope"}
        e = fails(anonymous.get_model_config, NAME, headers=wrong)
        assert e.status() == "StatusCode.UNAUTHENTICATED"
        anonymous.close()
        headers = {"authorization": f"Bearer {key}"}
        # One connection per client: the kernel spreads them over both workers' listeners.
        clients = [triton.InferenceServerClient(g.target) for _ in range(16)]
        pixels = pixels_of(fashion[:4])
        first = None
        for c in clients:
            logits = c.infer(NAME, [uint8_input(pixels)], headers=headers).as_numpy(OUTPUT)
            first = logits if first is None else first
            np.testing.assert_allclose(logits, first, rtol=0, atol=SERVED_ATOL)
            c.close()
        pids = {
            r["pid"]
            for r in g.svc.log_records()
            if r.get("protocol") == "grpc" and r["path"].endswith("/ModelInfer")
        }
        assert len(pids) == 2, pids


# ------------------------------------------------------------ slow: busy, deadline, drain


@pytest.fixture(scope="module")
def slow() -> Iterator[Grpc]:
    """A batching delay of 3 s, applied even to a lone request, holds it in the engine's queue,
    which is small."""
    env = {
        "SERESNET_WORKERS": "1",
        "SERESNET_MAX_QUEUE_DELAY_MS": "3000",
        "SERESNET_BATCH_WAIT": "always",
        "SERESNET_MAX_BATCH_SIZE": "8",
        "SERESNET_MAX_QUEUE_SIZE": "8",
        "SERESNET_MAX_IMAGES_PER_REQUEST": "8",
    }
    with grpc_service(env) as g:
        yield g


def _in_background(client: triton.InferenceServerClient, n: int) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(client.infer(NAME, [uint8_input(np.zeros((n, 1, 28, 28), np.uint8))]))
        except InferenceServerException as e:
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _queued(g: Grpc, images: int) -> None:
    deadline = time.monotonic() + 30
    while g.svc.metric("seresnet_queue_depth") < images:
        assert time.monotonic() < deadline, "the images never reached the queue"
        time.sleep(0.02)


def test_busy_is_resource_exhausted_with_retry_info(slow: Grpc) -> None:
    client = triton.InferenceServerClient(slow.target)
    thread, out = _in_background(client, 6)  # waits in the queue for the batch to fill
    _queued(slow, 6)
    request = service_pb2.ModelInferRequest(model_name=NAME)
    request.inputs.add(name=INPUT, datatype="UINT8", shape=[4, 1, 28, 28])
    request.raw_input_contents.append(bytes(4 * 784))
    e = rpc_fails(slow.stub().ModelInfer, request)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    meta = trailers(e)
    assert meta["seresnet-error-code"] == "queue_full" and int(meta["retry-after"]) >= 1
    status = protocol.message("google.rpc.Status").FromString(meta["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    (detail,) = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.RetryInfo"
    info = protocol.message("google.rpc.RetryInfo").FromString(detail.value)
    assert info.retry_delay.seconds == int(meta["retry-after"])
    thread.join(30)
    assert out and not isinstance(out[0], Exception), out
    client.close()


def test_a_grpc_deadline_withdraws_the_images(slow: Grpc) -> None:
    client = triton.InferenceServerClient(slow.target)
    before = slow.svc.metric("seresnet_inference_count_total")
    one = uint8_input(np.zeros((1, 1, 28, 28), np.uint8))
    e = fails(client.infer, NAME, [one], client_timeout=0.5)
    assert e.status() == "StatusCode.DEADLINE_EXCEEDED"
    time.sleep(3.5)  # past the batching delay: the image would have run by now
    assert slow.svc.metric("seresnet_inference_count_total") == before
    assert slow.svc.metric("seresnet_queue_depth") == 0
    client.close()


def test_drain_finishes_accepted_calls_then_refuses(slow: Grpc) -> None:
    client = triton.InferenceServerClient(slow.target)
    thread, out = _in_background(client, 2)  # held by the batching delay
    _queued(slow, 2)
    slow.svc.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert out and not isinstance(out[0], Exception), out  # the drain ran it
    assert out[0].as_numpy(OUTPUT).shape == (2, CARD.num_classes)
    assert slow.svc.proc.wait(60) == 0
    late = triton.InferenceServerClient(slow.target)
    assert fails(late.is_server_live).status() == "StatusCode.UNAVAILABLE"
    late.close()
    client.close()
