"""Finding, describing and registering the built custom-op library (ops/__init__.py)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ops

CUDA = "CUDAExecutionProvider"
# The device code a CUDA build must embed: SASS per architecture, PTX for newer GPUs.
EXPECTED_CUDA_CODE = {("sass", 80), ("sass", 86), ("sass", 89), ("sass", 90), ("ptx", 90)}


def elf_section(path: Path, wanted: str) -> bytes | None:
    """Contents of the named section of a 64-bit little-endian ELF file, or None."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not ELF64 LE"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, names_offset, _ = header(shstrndx)
    for index in range(shnum):
        name, offset, size = header(index)
        end = data.index(b"\0", names_offset + name)
        if data[names_offset + name : end].decode() == wanted:
            return data[offset : offset + size]
    return None


def fatbin_contents(section: bytes) -> set[tuple[str, int]]:
    """(kind, sm) of every image in an .nv_fatbin section: kind "sass" or "ptx"."""
    found = set()
    position = 0
    while position + 16 <= len(section):
        magic, _, header_size, body_size = struct.unpack_from("<IHHQ", section, position)
        if magic != 0xBA55ED50:
            break
        entry = position + header_size
        end = entry + body_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            arch = struct.unpack_from("<I", section, entry + 28)[0]
            found.add(({1: "ptx", 2: "sass"}.get(kind, str(kind)), arch))
            entry += entry_header + payload
        position = end
    return found


def tiny_weights() -> list[np.ndarray]:
    """w1, b1, w2, b2 of a 2-channel block."""
    return [
        np.full((1, 2), 0.5, np.float32),
        np.zeros(1, np.float32),
        np.ones((2, 1), np.float32),
        np.zeros(2, np.float32),
    ]


def tiny_model() -> bytes:
    weights = dict(zip(("w1", "b1", "w2", "b2"), tiny_weights(), strict=True))
    graph = helper.make_graph(
        [ops.make_node("x", "w1", "b1", "w2", "b2", "y")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 2, 2])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(
        graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()]
    )
    return model.SerializeToString()


def test_providers_include_cpu() -> None:
    assert "CPUExecutionProvider" in ops.providers()
    assert ops.providers() <= {"CPUExecutionProvider", CUDA}


def test_kernels_cover_both_element_types_on_each_provider() -> None:
    """Every provider the library claims has a float32 and a float16 kernel; has_fp16_kernel
    (what the service asks before choosing model.fp16.se.onnx) agrees."""
    kernels = ops.kernels()
    assert {provider for provider, _ in kernels} == ops.providers()
    for provider in ops.providers():
        assert {(provider, "float32"), (provider, "float16")} <= kernels
        assert ops.has_fp16_kernel(provider)
    assert ops.has_fp16_kernel(CUDA) == (CUDA in ops.providers())


def test_cuda_claim_matches_embedded_device_code() -> None:
    """providers() says CUDA exactly when the binary carries CUDA kernels for sm_80/86/89/90
    and compute_90 PTX; the build info agrees."""
    section = elf_section(ops.library_path(), ".nv_fatbin")
    info = ops.build_info()
    if CUDA in ops.providers():
        assert section is not None, "CUDA claimed but no device code embedded"
        assert fatbin_contents(section) >= EXPECTED_CUDA_CODE
        assert info["cuda"] != "none"
        assert info["cuda_architectures"].split() == ["80-real", "86-real", "89-real", "90"]
    else:
        assert section is None, "device code embedded but CUDA not claimed"
        assert info["cuda"] == "none"
    assert info["ort_api"] == "21"


def test_cpu_kernel_is_registered_and_runs() -> None:
    options = ort.SessionOptions()
    ops.register(options)
    session = ort.InferenceSession(tiny_model(), options, providers=["CPUExecutionProvider"])
    x = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, ops.numpy_reference(x, *tiny_weights()), rtol=1e-6)


def test_register_twice_serves_both_sessions() -> None:
    sessions = []
    for _ in range(2):
        options = ort.SessionOptions()
        ops.register(options)
        sessions.append(
            ort.InferenceSession(tiny_model(), options, providers=["CPUExecutionProvider"])
        )
    x = np.ones((1, 2, 2, 2), np.float32)
    first, second = (s.run(None, {"x": x})[0] for s in sessions)
    np.testing.assert_array_equal(first, second)


def test_env_override_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "elsewhere" / ops.LIBRARY_NAME
    copy.parent.mkdir()
    shutil.copy2(ops.library_path(), copy)
    monkeypatch.setenv(ops.LIBRARY_ENV, str(copy))
    assert ops.library_path() == copy.resolve()
    assert "CPUExecutionProvider" in ops.providers()
    ops.register(ort.SessionOptions())


def test_env_override_to_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(ops.OpsLibraryError, match=rf"{ops.LIBRARY_ENV}=.*nope\.so is not a file"):
        ops.library_path()


def test_not_built_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No override, nothing beside the package, distribution not installed."""
    monkeypatch.delenv(ops.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(ops, "__file__", str(tmp_path / "ops" / "__init__.py"))
    monkeypatch.setattr(ops, "DISTRIBUTION", "seresnet-serve-not-installed")
    with pytest.raises(ops.OpsLibraryError, match=r"not found .*pip install \."):
        ops.library_path()


def test_register_rejects_a_file_that_is_no_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / ops.LIBRARY_NAME
    junk.write_bytes(b"not a shared object")
    monkeypatch.setenv(ops.LIBRARY_ENV, str(junk))
    with pytest.raises(ops.OpsLibraryError, match="cannot load"):
        ops.register(ort.SessionOptions())


def test_register_rejects_a_foreign_library(monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_shared.so"
    monkeypatch.setenv(ops.LIBRARY_ENV, str(foreign))
    with pytest.raises(ops.OpsLibraryError, match="is not a seresnet ops library"):
        ops.register(ort.SessionOptions())


def test_register_refuses_an_older_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built against 1.21 headers: an older onnxruntime gets a clear message, not a crash."""
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    with pytest.raises(ops.OpsLibraryError, match=r"needs onnxruntime >= 1\.21.*1\.20\.1"):
        ops.register(ort.SessionOptions())
