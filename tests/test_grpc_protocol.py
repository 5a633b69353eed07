"""The gRPC interface as shipped: the descriptor set is the .proto files compiled, every message
matches Triton's own field for field (so tritonclient reads what the service writes), the
service's messages and tritonclient's live in one process, and every error code has a gRPC
status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from serverutil import REPO_ROOT
from tritonclient.grpc import model_config_pb2, service_pb2

from service.errors import CODES, GRPC_STATUS
from service.grpc import protocol

PROTOS = ("service/grpc/grpc_predict_v2.proto", "service/grpc/rpc_status.proto")


def test_the_shipped_descriptor_set_is_the_protos_compiled(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "protocol.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--descriptor_set_out={out}",
            *PROTOS,
        ],
        cwd=REPO_ROOT,
        check=True,
    )
    shipped = descriptor_pb2.FileDescriptorSet.FromString(protocol.DESCRIPTOR_SET.read_bytes())
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert shipped == fresh, "regenerate service/grpc/protocol.binpb (service/grpc says how)"


def _triton(full_name: str):
    for module in (service_pb2, model_config_pb2):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise KeyError(full_name)


def _messages(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _messages(nested)


def test_every_message_matches_tritons_field_for_field() -> None:
    own = protocol.pool().FindFileByName("service/grpc/grpc_predict_v2.proto")
    checked = 0
    for top in own.message_types_by_name.values():
        for message in _messages(top):
            theirs = _triton(message.full_name)
            for field in message.fields:
                other = theirs.fields_by_name.get(field.name)
                assert other is not None, f"{message.full_name}.{field.name} is not Triton's"
                assert (field.number, field.type, field.is_repeated) == (
                    other.number,
                    other.type,
                    other.is_repeated,
                ), f"{message.full_name}.{field.name}"
                checked += 1
    assert checked > 100
    service = protocol.pool().FindServiceByName(protocol.SERVICE)
    triton_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = triton_service.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name


def test_messages_cross_between_the_service_and_tritonclient() -> None:
    ours = protocol.message("ModelInferResponse")(model_name="m", id="7")
    ours.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    ours.raw_output_contents.append(b"\0" * 40)
    theirs = service_pb2.ModelInferResponse.FromString(ours.SerializeToString())
    assert theirs.outputs[0].name == "logits" and list(theirs.outputs[0].shape) == [1, 10]
    assert theirs.id == "7" and len(theirs.raw_output_contents[0]) == 40


def test_every_code_has_a_grpc_status() -> None:
    assert set(GRPC_STATUS) == set(CODES)
    names = {s.name for s in grpc.StatusCode}
    assert set(GRPC_STATUS.values()) <= names
    assert GRPC_STATUS["queue_full"] == "RESOURCE_EXHAUSTED"
    assert GRPC_STATUS["not_ready"] == "UNAVAILABLE"
    assert GRPC_STATUS["unauthorized"] == "UNAUTHENTICATED"
    assert GRPC_STATUS["model_not_found"] == "NOT_FOUND"
    assert GRPC_STATUS["deadline_exceeded"] == "DEADLINE_EXCEEDED"
    assert GRPC_STATUS["schema_error"] == "INVALID_ARGUMENT"
