"""Bodies of the V2 metadata routes: server, model (versioned), Triton's model configuration
and repository index, plus the name/version check every per-model route makes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.v2.errors import ModelNotFound
from service.v2.signature import Signature
from service.v2.tensors import BYTES

# Triton's names of the extensions this package has the bodies for; a server lists in /v2
# only those its routes really serve.
BINARY_TENSOR_DATA = "binary_tensor_data"
CLASSIFICATION = "classification"
MODEL_CONFIGURATION = "model_configuration"
STATISTICS = "statistics"

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
# Triton's model-configuration names for the protocol's datatypes (BYTES is TYPE_STRING).
_CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}


def check_model(signature: Signature, name: str, version: str | None = None) -> None:
    """Raise :class:`ModelNotFound` unless ``name`` (and ``version``, when the URL has one)
    is the served model."""
    if name != signature.model_name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {signature.model_name!r}")
    if version is not None and version != signature.model_version:
        raise ModelNotFound(
            f"unknown version {version!r} of model {name!r}; the served "
            f"version is {signature.model_version!r}"
        )


def server_metadata(name: str, version: str, extensions: Iterable[str]) -> dict[str, Any]:
    """``GET /v2``; ``extensions`` are those the routes really implement."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_inputs(signature: Signature) -> list[dict[str, Any]]:
    """The inputs a client may send, one per request: the model's own tensor, and encoded
    image files as BYTES ``[N]`` (also taken under the tensor's name, as before they were
    advertised)."""
    inputs: list[dict[str, Any]] = [
        {
            "name": signature.input_name,
            "datatype": signature.input_datatype,
            "shape": [-1, *signature.image_shape],
        }
    ]
    if signature.files_input != signature.input_name:
        inputs.append({"name": signature.files_input, "datatype": BYTES, "shape": [-1]})
    return inputs


def model_metadata(signature: Signature) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]``: the protocol's fields; routes may add more."""
    return {
        "name": signature.model_name,
        "versions": [signature.model_version],
        "platform": PLATFORM,
        "inputs": model_inputs(signature),
        "outputs": [
            {
                "name": signature.output_name,
                "datatype": "FP32",
                "shape": [-1, signature.num_classes],
            }
        ],
    }


@dataclass(frozen=True)
class Batching:
    """How the server batches, in the terms of Triton's model configuration."""

    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: Sequence[int] = ()
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    instance_count: int = 1
    gpus: Sequence[int] = ()


def model_config(signature: Signature, batching: Batching) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]/config``: Triton's model configuration as JSON.

    With ``max_batch_size`` > 0 Triton's ``dims`` leave out the batch axis, which is how
    perf_analyzer and tritonclient read them; every number is a JSON number, as Triton
    writes it.
    """
    inputs = model_inputs(signature)
    return {
        "name": signature.model_name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"specific": {"versions": [int(signature.model_version)]}}
        if signature.model_version.isdigit()
        else {"latest": {"num_versions": 1}},
        "max_batch_size": batching.max_batch_size,
        # Either input, one per request: each is optional in Triton's terms.
        "input": [
            {
                "name": tensor["name"],
                "data_type": _CONFIG_TYPES[tensor["datatype"]],
                "format": "FORMAT_NCHW" if tensor["datatype"] != BYTES else "FORMAT_NONE",
                # Without the batch axis; Triton has no rank-0 dims, so BYTES [N] is [1].
                "dims": tensor["shape"][1:] or [1],
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": len(inputs) > 1,
            }
            for tensor in inputs
        ],
        "output": [
            {
                "name": signature.output_name,
                "data_type": "TYPE_FP32",
                "dims": [signature.num_classes],
                "label_filename": "",
                "is_shape_tensor": False,
            }
        ],
        "batch_input": [],
        "batch_output": [],
        "dynamic_batching": {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
        },
        "instance_group": [
            {
                "name": f"{signature.model_name}_0",
                "kind": batching.instance_kind,
                "count": batching.instance_count,
                "gpus": list(batching.gpus),
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            }
        ],
        "default_model_filename": "model.onnx",
        "parameters": {},
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": False},
    }


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]
    reason: str = ""


def repository_index(entries: Iterable[RepositoryEntry]) -> list[dict[str, str]]:
    """``POST /v2/repository/index``: one object per model version."""
    return [
        {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
        for e in entries
    ]
