"""The SqueezeExcitation kernels in real ONNX Runtime sessions against the NumPy reference.

Every test runs on each execution provider that both the built library and this machine can
run: always the CPU provider; the CUDA provider too where a GPU is usable. The reference
tests cover both element types (float32, float16) and both layouts (channels first and last).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ops

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# float16 kernels compute in float and round once at the end: the reference (exact arithmetic on
# the same float16 inputs, rounded once) may differ by that rounding, 2**-11 relative, and by
# one float16 step more where float arithmetic lands on the other side of a rounding boundary.
FP16_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}
NP_TYPES = {"float32": np.float32, "float16": np.float16}
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
# (element type, layout) of every reference test
VARIANTS = [
    pytest.param("float32", False, id="fp32-nchw"),
    pytest.param("float32", True, id="fp32-nhwc"),
    pytest.param("float16", False, id="fp16-nchw"),
    pytest.param("float16", True, id="fp16-nhwc"),
]
# onnx may write a newer IR version than the installed runtime reads.
IR_VERSION = 10


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """The execution providers that can run the fused node here (CPU, and CUDA on a GPU)."""
    found = ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider"
    if cuda in ops.providers() & set(ort.get_available_providers()) and _cuda_session_works():
        found.append(cuda)
    return tuple(found)


def _cuda_session_works() -> bool:
    # onnxruntime-gpu lists CUDA even without a GPU or CUDA libraries; only a session tells.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # Missing CUDA wheels: the session below tells the rest.
        with contextlib.suppress(Exception):
            preload()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17)]
    )
    ort.set_default_logger_severity(4)  # a failed CUDA start-up is expected on CPU machines
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CUDAExecutionProvider"]
        )
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


def se_model(
    channels: int,
    reduced: int,
    height: int,
    width: int,
    weights: dict[str, np.ndarray],
    residual: str | None = None,
    relu: bool = False,
    batch: int | str = "batch",
    dtype: str = "float32",
    channels_last: bool = False,
) -> onnx.ModelProto:
    """One SqueezeExcitation node; weights are initializers, x (and residual) graph inputs.

    ``residual``: None (5 inputs), "" (6th input given as the empty name) or "residual".
    ``dtype``: every tensor's element type; ``channels_last``: x is [N,H,W,C].
    """
    shape = [batch, height, width, channels] if channels_last else [batch, channels, height, width]
    elem = ONNX_TYPES[dtype]
    inputs = [helper.make_tensor_value_info("x", elem, shape)]
    if residual:
        inputs.append(helper.make_tensor_value_info(residual, elem, shape))
    node = ops.make_node(
        "x",
        "w1",
        "b1",
        "w2",
        "b2",
        "y",
        residual=residual,
        relu=relu,
        name="se",
        channels_last=channels_last,
    )
    graph = helper.make_graph(
        [node],
        "se_block",
        inputs,
        [helper.make_tensor_value_info("y", elem, None)],
        [
            numpy_helper.from_array(weights[name].astype(NP_TYPES[dtype]), name)
            for name in ("w1", "b1", "w2", "b2")
        ],
    )
    return helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", 17), ops.opset_import()],
    )


def random_weights(rng: np.random.Generator, channels: int, reduced: int) -> dict[str, np.ndarray]:
    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Scaled like a trained layer so the gates spread over (0, 1) instead of saturating.
    return {
        "w1": normal(reduced, channels, scale=channels**-0.5),
        "b1": normal(reduced, scale=0.1),
        "w2": normal(channels, reduced, scale=reduced**-0.5),
        "b2": normal(channels, scale=0.1),
    }


def session(
    model: onnx.ModelProto,
    provider: str,
    threads: int = 0,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    if provider != "CPUExecutionProvider":
        # Fail instead of quietly running the node on the CPU when this provider lacks a kernel.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    ops.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


# (batch, channels, reduced, height, width, residual, relu)
CASES = [
    pytest.param(1, 3, 1, 4, 4, None, False, id="c3-batch1"),
    pytest.param(2, 17, 4, 5, 3, "residual", True, id="c17-residual-relu"),
    pytest.param(3, 130, 8, 7, 7, "residual", False, id="c130-residual"),
    pytest.param(2, 130, 8, 9, 11, None, True, id="c130-odd-hw-relu"),
    pytest.param(1, 64, 4, 1, 1, None, False, id="hw1"),
    pytest.param(5, 33, 3, 1, 1, "residual", True, id="hw1-residual-relu"),
    pytest.param(64, 32, 2, 6, 6, "residual", True, id="batch64"),
    pytest.param(2, 256, 16, 28, 28, "", True, id="c256-empty-residual-relu"),
    pytest.param(2, 24, 6, 40, 40, None, False, id="hw1600"),
    pytest.param(5, 200, 72, 3, 3, "residual", False, id="cr72-batch5"),
    pytest.param(9, 512, 128, 2, 2, None, True, id="cr128-batch9"),
    # Planes of 9216: the CUDA kernel pools them with a whole block per plane.
    pytest.param(3, 64, 4, 96, 96, "residual", True, id="large-images"),
    # SE-ResNet-50's last two stages: planes of 196 and 49 (not a multiple of 8 halves), walked
    # by 16-byte vectors that cross plane boundaries; 136 channels end in a short tile.
    pytest.param(2, 1024, 64, 14, 14, "residual", True, id="seresnet50-14x14"),
    pytest.param(2, 2048, 128, 7, 7, "residual", True, id="seresnet50-7x7"),
    pytest.param(3, 136, 8, 7, 7, None, False, id="c136-7x7-short-tile"),
]


@pytest.mark.parametrize("provider", usable_providers())
@pytest.mark.parametrize(("dtype", "channels_last"), VARIANTS)
@pytest.mark.parametrize(
    ("batch", "channels", "reduced", "height", "width", "residual", "relu"), CASES
)
def test_matches_numpy_reference(
    provider: str,
    dtype: str,
    channels_last: bool,
    batch: int,
    channels: int,
    reduced: int,
    height: int,
    width: int,
    residual: str | None,
    relu: bool,
) -> None:
    rng = np.random.default_rng(batch * 1000 + channels)
    weights = {
        k: v.astype(NP_TYPES[dtype]) for k, v in random_weights(rng, channels, reduced).items()
    }
    shape = (batch, height, width, channels) if channels_last else (batch, channels, height, width)
    x = rng.standard_normal(shape).astype(NP_TYPES[dtype])
    feeds = {"x": x}
    r = None
    if residual:
        r = rng.standard_normal(x.shape).astype(NP_TYPES[dtype])
        feeds[residual] = r
    model = se_model(
        channels,
        reduced,
        height,
        width,
        weights,
        residual,
        relu,
        dtype=dtype,
        channels_last=channels_last,
    )

    (y,) = session(model, provider).run(None, feeds)

    expected = ops.numpy_reference(x, **weights, residual=r, relu=relu, channels_last=channels_last)
    assert y.shape == x.shape
    assert y.dtype == NP_TYPES[dtype]
    tolerance = FP16_TOLERANCE if dtype == "float16" else TOLERANCE
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), **tolerance)
    if relu:
        assert (y >= 0).all()


def test_channels_last_is_the_transposed_op() -> None:
    """The two layouts are one op: the NHWC output is the NCHW output transposed (up to the
    order of the pooling sums, which differs between the layouts)."""
    rng = np.random.default_rng(41)
    weights = random_weights(rng, 48, 12)
    x = rng.standard_normal((3, 48, 7, 5)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    first = session(se_model(48, 12, 7, 5, weights, "residual", relu=True), "CPUExecutionProvider")
    last = session(
        se_model(48, 12, 7, 5, weights, "residual", relu=True, channels_last=True),
        "CPUExecutionProvider",
    )
    (a,) = first.run(None, {"x": x, "residual": r})
    (b,) = last.run(
        None, {"x": x.transpose(0, 2, 3, 1).copy(), "residual": r.transpose(0, 2, 3, 1).copy()}
    )
    np.testing.assert_allclose(b.transpose(0, 3, 1, 2), a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("provider", usable_providers())
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("batch", "channels", "reduced"), [(1, 40, 8), (5, 200, 72)])
def test_weights_as_graph_inputs(
    provider: str, dtype: str, batch: int, channels: int, reduced: int
) -> None:
    """Weights fed at run time (not initializers) take the path without pre-packing."""
    rng = np.random.default_rng(31)
    weights = {
        k: v.astype(NP_TYPES[dtype]) for k, v in random_weights(rng, channels, reduced).items()
    }
    model = se_model(channels, reduced, 4, 4, weights, relu=True, dtype=dtype)
    graph = model.graph
    for init in graph.initializer:
        graph.input.append(
            helper.make_tensor_value_info(init.name, ONNX_TYPES[dtype], list(init.dims))
        )
    del graph.initializer[:]
    x = rng.standard_normal((batch, channels, 4, 4)).astype(NP_TYPES[dtype])

    (y,) = session(model, provider).run(None, {"x": x, **weights})

    tolerance = FP16_TOLERANCE if dtype == "float16" else TOLERANCE
    np.testing.assert_allclose(
        y.astype(np.float32),
        ops.numpy_reference(x, **weights, relu=True).astype(np.float32),
        **tolerance,
    )


@pytest.mark.parametrize("provider", usable_providers())
def test_empty_residual_name_means_no_residual(provider: str) -> None:
    rng = np.random.default_rng(7)
    weights = random_weights(rng, 20, 5)
    x = rng.standard_normal((3, 20, 6, 6)).astype(np.float32)
    with_empty = session(se_model(20, 5, 6, 6, weights, residual=""), provider)
    without = session(se_model(20, 5, 6, 6, weights, residual=None), provider)

    (a,) = with_empty.run(None, {"x": x})
    (b,) = without.run(None, {"x": x})

    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ops.numpy_reference(x, **weights), **TOLERANCE)


@pytest.mark.parametrize("provider", usable_providers())
@pytest.mark.parametrize(
    "level",
    [ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL],
    ids=["extended", "all"],
)
def test_symbolic_batch_survives_shape_inference(
    provider: str, level: ort.GraphOptimizationLevel
) -> None:
    rng = np.random.default_rng(3)
    weights = random_weights(rng, 16, 4)
    model = se_model(16, 4, 8, 8, weights, residual="residual", relu=True)
    # The op's shape inference must carry x's type and shape, batch symbol included, to y.
    sess = session(model, provider, level=level)

    batch_dim = sess.get_outputs()[0].shape[0]
    assert batch_dim is None or isinstance(batch_dim, str), batch_dim
    assert sess.get_outputs()[0].shape[1:] == [16, 8, 8]
    for batch in (1, 7):
        x = rng.standard_normal((batch, 16, 8, 8)).astype(np.float32)
        r = rng.standard_normal(x.shape).astype(np.float32)
        (y,) = sess.run(None, {"x": x, "residual": r})
        expected = ops.numpy_reference(x, **weights, residual=r, relu=True)
        np.testing.assert_allclose(y, expected, **TOLERANCE)


def test_symbolic_batch_flows_into_following_nodes() -> None:
    """A node after the fused op sees [batch, C, H, W]: ORT's inferred shape of y keeps the
    batch symbol, so a Flatten behind it still has a dynamic leading dim."""
    rng = np.random.default_rng(5)
    weights = random_weights(rng, 8, 2)
    model = se_model(8, 2, 3, 3, weights)
    graph = model.graph
    graph.node.append(helper.make_node("Flatten", ["y"], ["flat"], axis=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, None))
    sess = session(model, "CPUExecutionProvider")

    assert isinstance(sess.get_outputs()[0].shape[0], str)
    for batch in (1, 4):
        x = rng.standard_normal((batch, 8, 3, 3)).astype(np.float32)
        (flat,) = sess.run(None, {"x": x})
        assert flat.shape == (batch, 72)


@pytest.mark.parametrize("provider", usable_providers())
def test_empty_batch(provider: str) -> None:
    rng = np.random.default_rng(11)
    weights = random_weights(rng, 12, 3)
    sess = session(se_model(12, 3, 5, 5, weights), provider)
    (y,) = sess.run(None, {"x": np.zeros((0, 12, 5, 5), np.float32)})
    assert y.shape == (0, 12, 5, 5)


def test_thread_count_does_not_change_results() -> None:
    """Work is split into the same tasks whatever the pool size, so results are bit-equal."""
    rng = np.random.default_rng(13)
    weights = random_weights(rng, 64, 8)
    model = se_model(64, 8, 28, 28, weights, residual="residual", relu=True)
    x = rng.standard_normal((4, 64, 28, 28)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    feeds = {"x": x, "residual": r}

    (one,) = session(model, "CPUExecutionProvider", threads=1).run(None, feeds)
    (two,) = session(model, "CPUExecutionProvider", threads=2).run(None, feeds)

    np.testing.assert_array_equal(one, two)
    np.testing.assert_allclose(
        one, ops.numpy_reference(x, **weights, residual=r, relu=True), **TOLERANCE
    )


def test_bad_weight_shape_names_node_and_input() -> None:
    rng = np.random.default_rng(17)
    weights = random_weights(rng, 10, 2)
    weights["w2"] = weights["w2"][:9]  # [C-1, Cr]
    sess = session(se_model(10, 2, 4, 4, weights), "CPUExecutionProvider")
    with pytest.raises(
        Exception, match=r"node 'se': input w2 has shape \[9,2\], expected \[10,2\]"
    ):
        sess.run(None, {"x": np.ones((1, 10, 4, 4), np.float32)})


def test_residual_shape_mismatch_is_rejected() -> None:
    rng = np.random.default_rng(19)
    weights = random_weights(rng, 6, 2)
    model = se_model(6, 2, 4, 4, weights, residual="residual")
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_value = 5
    sess = session(model, "CPUExecutionProvider")
    feeds = {"x": np.ones((1, 6, 4, 4), np.float32), "residual": np.ones((1, 6, 5, 4), np.float32)}
    with pytest.raises(Exception, match=r"input residual has shape \[1,6,5,4\]"):
        sess.run(None, feeds)


@pytest.mark.parametrize("attribute", ["relu", "channels_last"])
def test_flag_attributes_must_be_0_or_1(attribute: str) -> None:
    rng = np.random.default_rng(23)
    model = se_model(6, 2, 4, 4, random_weights(rng, 6, 2))
    model.graph.node[0].attribute.append(helper.make_attribute(attribute, 2))
    if attribute == "relu":
        del model.graph.node[0].attribute[0]
    with pytest.raises(Exception, match=f"attribute {attribute} must be 0 or 1, got 2"):
        session(model, "CPUExecutionProvider")


def test_mixed_element_types_are_rejected() -> None:
    """float16 x with float32 weights matches neither kernel: ONNX Runtime refuses the model
    instead of reading float32 weights as halves."""
    rng = np.random.default_rng(37)
    model = se_model(8, 2, 4, 4, random_weights(rng, 8, 2), dtype="float16")
    for init in model.graph.initializer:
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name)
        )
    with pytest.raises(Exception, match=r"(?i)type"):
        session(model, "CPUExecutionProvider")


def test_unregistered_library_is_a_clear_error() -> None:
    """What a session reports when the fused node has no kernel because the library was not
    registered: the service must never get this far (it checks ops.providers() first)."""
    rng = np.random.default_rng(29)
    model = se_model(6, 2, 4, 4, random_weights(rng, 6, 2))
    with pytest.raises(Exception, match=r"ai\.seresnet:SqueezeExcitation.*not a registered"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _cuda_sources_ptx(tmp_path) -> str:
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernel's PTX cannot be checked here")
    src = Path(ops.__file__).parent / "src"
    out = tmp_path / "se.ptx"
    subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-arch=sm_90",
            "-ptx",
            str(src / "se_cuda_kernels.cu"),
            "-I",
            str(src),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out.read_text()


@pytest.mark.slow
def test_channels_first_gate_scale_has_no_64_bit_division(tmp_path) -> None:
    """A 64-bit division costs dozens of instructions; the channels-first scale used one per
    element on planes that are not a multiple of the vector width (fp16 14x14 and 7x7: 9 of
    SE-ResNet-50's 16 SE blocks). Every variant with 32-bit offsets must have none at all."""
    import re

    ptx = _cuda_sources_ptx(tmp_path)
    entries = re.findall(r"\.entry (\S*GateScaleKernel\S*)\((.*?)\n}", ptx, re.S)
    narrow = [(name, body) for name, body in entries if "EjEEv" in name]  # Index = uint32_t
    walks = {re.search(r"WalkE(\d)", name).group(1) for name, _ in narrow}  # type: ignore[union-attr]
    assert walks == {"0", "1", "2"}, [name for name, _ in entries]
    for name, body in narrow:
        assert not re.search(r"\b(div|rem)\.[su]64", body), name
