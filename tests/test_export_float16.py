"""The float16 variant of a fused graph (export/float16.py) and the channels-last form of a
fused graph (ops.to_channels_last): graph structure, and logits in real ONNX Runtime sessions
on real images against the float32 channels-first graph they come from."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

import ops
from export.float16 import to_float16
from export.model_card import input_spec_for
from export.onnx_export import compare, parity_images
from testkit.sessions import cpu_session

pytestmark = pytest.mark.slow


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return cpu_session(model)


def _se_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == ops.OP_TYPE]


@pytest.fixture(scope="module")
def seresnet50(random_onnx) -> onnx.ModelProto:
    return onnx.load(str(random_onnx("seresnet50", fuse=True)))


def test_float16_keeps_the_boundary_and_converts_the_inside(seresnet50) -> None:
    half = to_float16(seresnet50)
    (image,) = half.graph.input
    (logits,) = half.graph.output
    assert image.type.tensor_type.elem_type == TensorProto.UINT8
    assert logits.type.tensor_type.elem_type == TensorProto.FLOAT
    # the uint8 -> float Cast now casts to float16 (onnxconverter-common#320 left it at float)
    first = half.graph.node[0]
    assert first.op_type == "Cast" and first.input[0] == image.name
    assert first.attribute[0].i == TensorProto.FLOAT16
    initializers = {i.name: i.data_type for i in half.graph.initializer}
    for node in half.graph.node:
        if node.op_type in ("Conv", "Gemm", ops.OP_TYPE):
            weights = [initializers[n] for n in node.input if n in initializers]
            assert weights and set(weights) == {TensorProto.FLOAT16}, node.name
    assert len(_se_nodes(half)) == 16
    # no Casts around the SE nodes (they run float16): only the input's and the logits'
    assert Counter(n.op_type for n in half.graph.node)["Cast"] == 2


def test_float16_runs_and_agrees_on_real_images(seresnet50) -> None:
    """CPU: float16 tensors between nodes (ORT casts around its float kernels; our op has a
    float16 kernel). Random weights make small logit gaps, so top-1 is the bar here; the
    embedded model's card holds the top-5 figures on its real test set."""
    spec = input_spec_for("seresnet50")
    pixels = parity_images(spec, 16)
    fp32 = _session(seresnet50).run(None, {"image": pixels})[0]
    fp16 = _session(to_float16(seresnet50)).run(None, {"image": pixels})[0]
    assert fp16.dtype == np.float32 and fp16.shape == fp32.shape
    assert not np.array_equal(fp16, fp32)  # it did compute in float16
    scale = np.abs(fp32).max()
    assert np.abs(fp16 - fp32).max() <= 0.05 * scale
    assert (fp16.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_float16_conversion_is_deterministic(seresnet50) -> None:
    assert to_float16(seresnet50).SerializeToString() == to_float16(seresnet50).SerializeToString()


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_channels_last_form_matches_channels_first(seresnet50, half: bool) -> None:
    model = to_float16(seresnet50) if half else seresnet50
    last = ops.to_channels_last(model)
    nodes = _se_nodes(last)
    assert len(nodes) == 16
    assert all(any(a.name == "channels_last" and a.i == 1 for a in n.attribute) for n in nodes)
    counts = Counter(n.op_type for n in last.graph.node)
    # one Transpose in and one out per block, plus one for each residual that is not the
    # previous block's output (the 4 downsampling shortcuts); no Transpose twice
    assert counts["Transpose"] == 16 * 2 + 4
    assert Counter(n.op_type for n in model.graph.node)["Transpose"] == 0
    spec = input_spec_for("seresnet50")
    pixels = parity_images(spec, 4)
    want = _session(model).run(None, {"image": pixels})[0]
    got = _session(last).run(None, {"image": pixels})[0]
    result = compare(want, got)
    tolerance = 1e-2 * np.abs(want).max() if half else 1e-5
    assert result.max_abs_diff <= tolerance, result


def test_channels_last_twice_changes_nothing(seresnet50) -> None:
    once = ops.to_channels_last(seresnet50)
    assert ops.to_channels_last(once).SerializeToString() == once.SerializeToString()


def test_fuse_cli_writes_the_float16_channels_last_form(tmp_path) -> None:
    import subprocess
    import sys

    from conftest import EMBEDDED_MODEL

    out = tmp_path / "m.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "fuse",
            "--fp16",
            "--channels-last",
            str(EMBEDDED_MODEL / "model.onnx"),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fused 6 SE blocks" in proc.stdout and "float16, channels-last" in proc.stdout
    model = onnx.load(str(out))
    assert len(_se_nodes(model)) == 6
    pixels = parity_images(input_spec_for("seresnet14_cifar"), 64)
    want = _session(onnx.load(str(EMBEDDED_MODEL / "model.se.onnx"))).run(None, {"image": pixels})[
        0
    ]
    got = _session(model).run(None, {"image": pixels})[0]
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() < 0.05


def test_verify_checks_the_float16_variant(tmp_path, random_seresnet14) -> None:
    """export verify re-measures model.fp16.se.onnx against model.se.onnx and fails a folder
    whose float16 file is not the float16 form of its fused model."""
    import shutil
    import subprocess
    import sys

    from conftest import EMBEDDED_MODEL

    from export.fusion import fuse_model

    folder = tmp_path / "m"
    shutil.copytree(EMBEDDED_MODEL, folder)
    verify = [sys.executable, "-m", "export", "verify", str(folder), "--parity-images", "64"]
    good = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok model.se.onnx vs model.fp16.se.onnx" in good.stdout

    other, _ = fuse_model(onnx.load(str(random_seresnet14)))  # same net, other weights
    onnx.save(to_float16(other), str(folder / "model.fp16.se.onnx"))
    bad = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "FAIL model.se.onnx vs model.fp16.se.onnx" in bad.stdout


def test_benchmark_only_keeps_the_float16_file_a_gate_would_drop(tmp_path) -> None:
    """A random-weight SE-ResNet-50 from 8 images misses the 99 % top-5 bar (tiny logit gaps);
    a benchmark folder still needs its float16 file, marked as not gated by parity."""
    import shutil

    from conftest import EMBEDDED_MODEL

    from export.pipeline import float16_variant
    from modelcard.schema import FP16_FUSED_FILE

    spec = input_spec_for("seresnet14_cifar")
    pixels = parity_images(spec, 16)
    labels = np.zeros(len(pixels), dtype=np.int64)
    # A float32 top-1 no float16 result can be within 0.1 % of: the gate must fail.
    failing = (pixels, labels, 2.0)
    for gated in (True, False):
        folder = tmp_path / f"gated-{gated}"
        shutil.copytree(EMBEDDED_MODEL, folder, ignore=shutil.ignore_patterns("checkpoint*"))
        (folder / FP16_FUSED_FILE).unlink()
        entry = float16_variant(folder, spec, pixels, failing, say=lambda _: None, gated=gated)
        if gated:
            assert entry is None and not (folder / FP16_FUSED_FILE).exists()
        else:
            assert entry is not None and entry.parity_gated is False
            assert (folder / FP16_FUSED_FILE).is_file()


def test_export_onnx_benchmark_only_records_the_card(tmp_path) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "bm"
    command = [sys.executable, "-m", "export", "onnx", "--arch", "seresnet14_cifar"]
    command += ["--random-init", "--parity-images", "8", "--benchmark-only", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    card = json.loads((out / "model.json").read_text())
    assert card["float16"]["parity_gated"] is False
    assert (out / card["float16"]["file"]).is_file()
