"""V2 metadata, Triton model configuration, statistics and repository index bodies.

Every body is parsed with Triton's own protobuf schema (``model_config.proto`` and
``grpc_service.proto``, shipped inside tritonclient), strictly: an unknown field, a wrong type
or a bad enum name fails.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from conftest import EMBEDDED_MODEL
from google.protobuf import json_format

from modelcard.schema import read_card
from service.v2.errors import ModelNotFound
from service.v2.metadata import (
    Batching,
    RepositoryEntry,
    check_model,
    model_config,
    model_metadata,
    repository_index,
    server_metadata,
)
from service.v2.signature import Signature
from service.v2.stats import BatchDurations, Duration, ModelCounters, model_statistics

SIG = Signature.from_card(read_card(EMBEDDED_MODEL))


@pytest.fixture(scope="module")
def triton_protos() -> tuple[ModuleType, ModuleType]:
    """(model_config_pb2, service_pb2): Triton's own schemas, as tritonclient.grpc ships them,
    imported plainly now that grpcio is the service's dependency (no stand-in package, no
    second registration of their files). They share protobuf's default pool with nothing of
    the service's: its own messages live in a pool of their own (service.grpc.protocol)."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    return model_config_pb2, service_pb2


@pytest.fixture(scope="module")
def model_config_pb2(triton_protos: tuple[ModuleType, ModuleType]) -> ModuleType:
    return triton_protos[0]


@pytest.fixture(scope="module")
def service_pb2(triton_protos: tuple[ModuleType, ModuleType]) -> ModuleType:
    return triton_protos[1]


def test_server_metadata_lists_the_given_extensions(service_pb2: ModuleType) -> None:
    body = server_metadata("seresnet-serve", "0.1.0", ["binary_tensor_data", "classification"])
    assert body == {
        "name": "seresnet-serve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "classification"],
    }
    json_format.ParseDict(body, service_pb2.ServerMetadataResponse())


def test_model_metadata(service_pb2: ModuleType) -> None:
    body = model_metadata(SIG)
    parsed = json_format.ParseDict(body, service_pb2.ModelMetadataResponse())
    assert list(parsed.inputs[0].shape) == [-1, 1, 28, 28]
    assert body["name"] == "fashion-seresnet" and body["versions"] == ["1"]
    assert body["platform"] == "onnxruntime_onnx"
    # The tensor, and encoded image files (either one per request), so clients discover both.
    assert body["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 28, 28]},
        {"name": "image_files", "datatype": "BYTES", "shape": [-1]},
    ]
    assert body["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


def test_check_model_knows_the_served_name_and_version() -> None:
    check_model(SIG, "fashion-seresnet")
    check_model(SIG, "fashion-seresnet", "1")
    with pytest.raises(ModelNotFound, match="unknown model 'resnet50'") as caught:
        check_model(SIG, "resnet50")
    assert caught.value.status == 404
    with pytest.raises(ModelNotFound, match="unknown version '2'"):
        check_model(SIG, "fashion-seresnet", "2")


def test_model_config_follows_tritons_schema(model_config_pb2: ModuleType) -> None:
    batching = Batching(
        max_batch_size=32,
        max_queue_delay_us=2000,
        preferred_batch_sizes=[8, 16, 32],
        instance_kind="KIND_GPU",
        gpus=[0],
    )
    body = model_config(SIG, batching)

    parsed = json_format.ParseDict(body, model_config_pb2.ModelConfig())

    assert parsed.name == "fashion-seresnet"
    assert parsed.platform == "onnxruntime_onnx" and parsed.backend == "onnxruntime"
    assert parsed.max_batch_size == 32
    inp, files = parsed.input
    assert inp.name == "image" and list(inp.dims) == [1, 28, 28]  # no batch axis
    assert inp.data_type == model_config_pb2.TYPE_UINT8
    assert inp.format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert files.name == "image_files" and list(files.dims) == [1]
    assert files.data_type == model_config_pb2.TYPE_STRING
    assert inp.optional and files.optional  # one or the other per request
    (out,) = parsed.output
    assert out.name == "logits" and list(out.dims) == [10]
    assert out.data_type == model_config_pb2.TYPE_FP32
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(parsed.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    (group,) = parsed.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert group.count == 1 and list(group.gpus) == [0]
    assert list(parsed.version_policy.specific.versions) == [1]
    # perf_analyzer reads plain JSON numbers, as Triton writes them (not protobuf's strings)
    assert body["input"][0]["dims"] == [1, 28, 28] and body["max_batch_size"] == 32


def test_model_config_for_a_cpu_model_with_a_named_version(model_config_pb2: ModuleType) -> None:
    sig = Signature.from_card(read_card(EMBEDDED_MODEL).model_copy(update={"version": "2026a"}))
    body = model_config(sig, Batching(max_batch_size=8, max_queue_delay_us=0))
    parsed = json_format.ParseDict(body, model_config_pb2.ModelConfig())
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parsed.version_policy.latest.num_versions == 1


def test_statistics(service_pb2: ModuleType) -> None:
    counters = ModelCounters(
        inference_count=12,
        execution_count=5,
        last_inference_ms=1700,
        success=Duration(4, 9_000),
        fail=Duration(1, 300),
        queue=Duration(4, 1_000),
        compute_infer=Duration(4, 6_000),
    )
    counters.compute_input.add(200)
    counters.batches[4] = BatchDurations(compute_infer=Duration(2, 4_000))
    counters.batches[1] = BatchDurations(compute_infer=Duration(3, 2_000))

    body = model_statistics(SIG, counters)

    (stat,) = body["model_stats"]
    assert stat["name"] == "fashion-seresnet" and stat["version"] == "1"
    assert stat["inference_count"] == 12 and stat["execution_count"] == 5
    assert stat["last_inference"] == 1700
    inference = stat["inference_stats"]
    assert inference["success"] == {"count": 4, "ns": 9_000}
    assert inference["fail"] == {"count": 1, "ns": 300}
    assert inference["queue"] == {"count": 4, "ns": 1_000}
    assert inference["compute_input"] == {"count": 1, "ns": 200}
    assert inference["compute_infer"] == {"count": 4, "ns": 6_000}
    assert inference["compute_output"] == {"count": 0, "ns": 0}
    assert [b["batch_size"] for b in stat["batch_stats"]] == [1, 4]
    assert stat["batch_stats"][1]["compute_infer"] == {"count": 2, "ns": 4_000}
    parsed = json_format.ParseDict(body, service_pb2.ModelStatisticsResponse())
    assert parsed.model_stats[0].inference_stats.success.ns == 9_000
    assert parsed.model_stats[0].batch_stats[1].batch_size == 4


def test_repository_index(service_pb2: ModuleType) -> None:
    body = repository_index([RepositoryEntry("fashion-seresnet", "1", "READY")])
    assert body == [{"name": "fashion-seresnet", "version": "1", "state": "READY", "reason": ""}]
    json_format.ParseDict({"models": body}, service_pb2.RepositoryIndexResponse())
