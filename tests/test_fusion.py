"""The SE fusion pass: what it matches, what it leaves alone, and that it never changes what a
model computes (real ONNX Runtime sessions, fused node run by the op library)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from se_forms import SEBlockNet, export

from export.fusion import OP_DOMAIN, OP_TYPE, fuse_file, fuse_model
from testkit.sessions import cpu_session

pytestmark = pytest.mark.slow

FUSABLE = [
    "conv",
    "conv_gap",
    "linear_mean",
    "linear_gap_flatten",
    "linear_expand",
    "gate_first",
    "matmul",
]
EXPORTERS = ["dynamo", "torchscript", "torchscript18"]


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = cpu_session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _fused_ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("form", FUSABLE)
def test_every_exported_form_fuses_and_computes_the_same(form: str, exporter: str) -> None:
    torch.manual_seed(0)
    original = export(SEBlockNet(form), exporter)
    fused, report = fuse_model(onnx.ModelProto.FromString(original.SerializeToString()))

    assert report.fused == 1 and report.with_residual == 1
    counts = _fused_ops(fused)
    assert counts[OP_TYPE] == 1
    assert counts["Sigmoid"] == 0 and counts["Mul"] == 0
    assert not any(
        n.op_type in ("Add", "MatMul") for n in fused.graph.node if n.domain == ""
    )  # residual Add (and MatMul+Add FCs) were absorbed
    node = next(n for n in fused.graph.node if n.op_type == OP_TYPE)
    assert node.domain == OP_DOMAIN
    assert next(a.i for a in node.attribute if a.name == "relu") == 1
    onnx.checker.check_model(fused)

    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 12, 12), np.float32)
        want = _run(original, x)[0]
        got = _run(fused, x)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("form", ["conv3x3", "hardsigmoid", "gate_reused", "gate_is_output"])
def test_near_misses_are_left_alone(form: str, exporter: str) -> None:
    torch.manual_seed(0)
    original = export(SEBlockNet(form), exporter)
    before = original.SerializeToString()
    fused, report = fuse_model(onnx.ModelProto.FromString(before))
    assert report.fused == 0
    assert _fused_ops(fused) == _fused_ops(onnx.ModelProto.FromString(before))


def test_broadcast_add_is_not_absorbed_as_residual() -> None:
    torch.manual_seed(0)
    original = export(SEBlockNet("no_residual_shape"), "dynamo")
    fused, report = fuse_model(onnx.ModelProto.FromString(original.SerializeToString()))
    assert report.fused == 1 and report.with_residual == 0
    node = next(n for n in fused.graph.node if n.op_type == OP_TYPE)
    assert len(node.input) == 5
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12), np.float32)
    np.testing.assert_allclose(_run(fused, x)[0], _run(original, x)[0], rtol=0, atol=1e-5)


def test_classifier_head_pooling_is_not_matched(random_seresnet14: Path) -> None:
    fused, report = fuse_model(onnx.load(str(random_seresnet14)))
    assert report.fused == 6
    # the head's ReduceMean (keepdims=0, feeding the classifier) is still there
    assert _fused_ops(fused)["ReduceMean"] == 1


def test_model_without_se_is_copied_byte_for_byte(tmp_path: Path) -> None:
    from export.architectures import create_model
    from export.model_card import input_spec_for
    from export.onnx_export import export_onnx

    src = tmp_path / "plain.onnx"
    export_onnx(
        create_model("resnet14_cifar", init="random"), input_spec_for("resnet14_cifar"), src
    )
    dst = tmp_path / "plain.se.onnx"
    report = fuse_file(src, dst)
    assert report.fused == 0
    assert dst.read_bytes() == src.read_bytes()


def test_fuse_cli_reports_the_count(random_seresnet14: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "fuse", str(random_seresnet14), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fused 6 SE blocks" in proc.stdout
    assert out.is_file()


def test_fuse_cli_names_an_unparsable_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    proc = subprocess.run(
        [sys.executable, "-m", "export", "fuse", str(bad), str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "cannot parse" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


NEAR_MISS_REASONS = {
    "conv3x3": "3x3 excitation",
    "hardsigmoid": "HardSigmoid gate, not Sigmoid",
    "gate_reused": "a tensor inside the block is read outside it",
    "gate_is_output": "a tensor inside the block is a graph output",
}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("form", sorted(NEAR_MISS_REASONS))
def test_near_misses_are_counted_with_the_reason(
    form: str, exporter: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    original = export(SEBlockNet(form), exporter)
    with caplog.at_level(logging.DEBUG, logger="export.fusion"):
        _, report = fuse_model(original)
    reason = NEAR_MISS_REASONS[form]
    assert dict(report.left_alone) == {reason: 1}
    assert report.summary().endswith(f"; 1 SE-like block left alone: {reason}")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.endswith(f"left alone: {reason}") for m in debug), debug


@pytest.mark.parametrize("form", ["conv", "linear_expand", "matmul"])
def test_fused_blocks_are_not_near_misses(form: str) -> None:
    torch.manual_seed(0)
    _, report = fuse_model(export(SEBlockNet(form), "dynamo"))
    assert report.fused == 1 and not report.left_alone
    assert "left alone" not in report.summary()


def test_a_resnet_has_no_near_misses(random_onnx) -> None:
    """A plain ResNet's Muls (none) and a SE-ResNet's classifier pooling are not SE-like."""
    _, report = fuse_model(onnx.load(str(random_onnx("seresnet14_cifar"))))
    assert report.fused == 6 and not report.left_alone


def test_fuse_cli_says_which_blocks_it_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = tmp_path / "conv3x3.onnx"
    onnx.save(export(SEBlockNet("conv3x3"), "torchscript"), str(src))
    proc = subprocess.run(
        [sys.executable, "-m", "export", "fuse", str(src), str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fused 0 SE blocks" in proc.stdout
    assert "1 SE-like block left alone: 3x3 excitation" in proc.stdout


def test_a_max_pool_squeeze_in_a_real_network_is_left_alone_and_named(random_onnx) -> None:
    """One SE block of an exported SE-ResNet squeezes by max instead of mean: the other five
    fuse, that one is reported with its reason, and the fused model computes what the edited
    one does."""
    original = onnx.load(str(random_onnx("seresnet14_cifar")))
    readers = Counter(i for n in original.graph.node for i in n.input)
    squeezes = [
        n
        for n in original.graph.node
        if n.op_type in ("ReduceMean", "GlobalAveragePool")
        and any(m.op_type == "Conv" and n.output[0] in m.input for m in original.graph.node)
    ]
    assert len(squeezes) == 6 and all(readers[s.output[0]] == 1 for s in squeezes)
    edited = squeezes[2]
    edited.op_type = "ReduceMax" if edited.op_type == "ReduceMean" else "GlobalMaxPool"
    before = original.SerializeToString()

    fused, report = fuse_model(onnx.ModelProto.FromString(before))
    assert report.fused == 5
    assert dict(report.left_alone) == {f"squeeze by {edited.op_type}, not a global average": 1}
    assert report.summary().endswith(
        f"1 SE-like block left alone: squeeze by {edited.op_type}, not a global average"
    )
    from export.model_card import input_spec_for

    spec = input_spec_for("seresnet14_cifar")
    shape = (2, spec.channels, spec.height, spec.width)
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    want = _run(onnx.ModelProto.FromString(before), x)[0]
    np.testing.assert_allclose(_run(fused, x)[0], want, rtol=0, atol=1e-4)
