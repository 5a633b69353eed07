"""The export step: ONNX with a dynamic batch axis and uint8 input, parity against PyTorch on
real images, and clear failures that leave no half-written model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.architectures import create_model
from export.model_card import input_spec_for
from export.onnx_export import (
    check_parity,
    export_onnx,
    parity_images,
    run_onnx,
    run_torch,
    session,
)
from modelcard import read_card

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_graph_has_dynamic_batch_and_uint8_input(random_seresnet14: Path) -> None:
    model = onnx.load(str(random_seresnet14))
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    sess = session(random_seresnet14)
    spec = input_spec_for("seresnet14_cifar")
    for n in (1, 5, 64):  # one session, any batch size
        assert run_onnx(sess, parity_images(spec, n), spec).shape == (n, 10)


def test_normalisation_folded_into_the_graph_is_exact() -> None:
    """uint8 graph input vs the float model fed (x/255 - mean)/std, borders included."""
    spec = input_spec_for("seresnet18").model_copy(update={"height": 64, "width": 64})
    model = create_model("seresnet18", seed=3, init="random")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    pixels[:, :, 0, :] = 255  # bright border: zero padding must mean "normalised zero"
    from export.onnx_export import PixelInput

    wrapped = PixelInput(model, spec.mean, spec.std)
    with torch.no_grad():
        got = wrapped(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got, run_torch(model, pixels, spec), atol=1e-4)


@pytest.mark.parametrize("arch", ["seresnet18", "seresnext50_32x4d"])
def test_parity_on_real_images(tmp_path: Path, arch: str) -> None:
    model = create_model(arch, seed=0, init="random")
    spec = input_spec_for(arch)
    path = tmp_path / "model.onnx"
    export_onnx(model, spec, path)
    result = check_parity(model, path, spec, count=8)
    assert result.max_abs_diff <= 1e-4 and result.top5_agreement == 1.0


def test_onnx_cli_writes_a_complete_folder(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    proc = _cli(
        "onnx",
        "--arch",
        "seresnet14_cifar",
        "--random-init",
        "--labels",
        "fashion-mnist",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "parity PyTorch vs ONNX Runtime on 256 real images" in proc.stdout
    card = read_card(out)
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.se.onnx", "model.json"} <= files
    # float16 is kept only when it agrees with float32; either way the card says so
    assert ("model.fp16.se.onnx" in files) == (card.float16 is not None)
    assert ("model.int8.se.onnx" in files) == (card.int8 is not None)  # likewise int8
    assert card.parity.max_abs_logit_diff_torch_vs_onnx <= 1e-4
    assert card.parity.max_abs_logit_diff_onnx_vs_fused <= 1e-5
    assert card.fusion.fused == 6
    assert card.labels[0] == "T-shirt/top" and card.input.dtype == "uint8"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "seresnet99", "--random-init"], "invalid choice: 'seresnet99'"),
        (["--arch", "seresnet14_cifar"], "--checkpoint FILE, or --random-init"),
        (["--arch", "seresnet14_cifar", "--checkpoint", "CORRUPT"], "cannot read checkpoint"),
        (["--arch", "seresnet14_cifar", "--checkpoint", "PLAIN"], "does not fit architecture"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save(create_model("resnet14_cifar").state_dict(), plain)
    args = [{"CORRUPT": str(corrupt), "PLAIN": str(plain)}.get(a, a) for a in args]
    out = tmp_path / "out"
    proc = _cli("onnx", *args, "--out", str(out))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    proc = _cli(
        "train",
        "--out",
        str(tmp_path / "c.pt"),
        "--epochs",
        "1",
        env={"FASHION_MNIST_DIR": str(tmp_path / "nowhere")},
    )
    assert proc.returncode != 0
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failed_parity_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild that fails leaves the existing folder as it was."""
    from export import pipeline
    from export.onnx_export import ParityError

    out = tmp_path / "m"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"keep": True}))

    def broken_parity(*_a: object, **_k: object) -> None:
        raise ParityError("injected parity failure")

    monkeypatch.setattr(pipeline, "check_parity", broken_parity)
    with pytest.raises(ParityError):
        pipeline.export_folder(pipeline.ExportOptions(arch="seresnet14_cifar", out=out))
    assert json.loads((out / "model.json").read_text()) == {"keep": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_top_level_help_lists_each_command_once() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "onnx", "fuse", "verify", "build"):
        listed = [line for line in proc.stdout.splitlines() if line.split()[:1] == [command]]
        assert len(listed) == 1, f"{command!r} listed {len(listed)} times:\n{proc.stdout}"


def test_build_offers_no_random_init_options() -> None:
    """build always starts from FOLDER/checkpoint.pt: no --seed, no --random-init."""
    build = _cli("build", "--help")
    assert build.returncode == 0, build.stderr
    assert "--seed" not in build.stdout and "--random-init" not in build.stdout
    assert _cli("build", "nowhere", "--seed", "3").returncode == 2  # argparse: unknown option
    onnx_help = _cli("onnx", "--help").stdout
    assert "--seed" in onnx_help and "--random-init" in onnx_help
