"""The int8 variant: export writes model.int8.se.onnx (static QDQ, calibrated on real training
images, SE node in float32) only past its accuracy gate and records the gate in the card; the
engine and the service serve it on the CPU when asked (or when auto may), agreeing with
float32 on real images, and refuse it clearly when the card does not vouch for it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import EMBEDDED_MODEL
from PIL import Image
from serverutil import running_service

import ops
from export import fashion_mnist
from modelcard import INT8_FUSED_FILE, read_card, to_array
from modelcard.cpu import cpu_int8_isa
from service.engine.config import EngineConfig
from service.engine.model import Engine
from service.engine.policy import EngineError, Int8Offer, choose_precision

IMAGES = 256


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model rebuilt from its checkpoint by the project's export command."""
    folder = tmp_path_factory.mktemp("int8") / "fashion-seresnet"
    folder.mkdir()
    for name in ("checkpoint.pt", "checkpoint.train.json", "baseline.train.json"):
        shutil.copy(EMBEDDED_MODEL / name, folder / name)
    command = [sys.executable, "-m", "export", "build", str(folder), "--no-fp16"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "int8 variant vs float32 fused" in proc.stdout
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint*", "*.train.json"))
    return dst


def _edit_card(folder: Path, **int8: object) -> None:
    path = folder / "model.json"
    card = json.loads(path.read_text())
    if int8.pop("drop", False):
        card["int8"] = None
    else:
        card["int8"].update(int8)
    path.write_text(json.dumps(card))


def _real_images(count: int = IMAGES) -> tuple[list[np.ndarray], list[bytes]]:
    import io

    spec = read_card(EMBEDDED_MODEL).input
    images, _ = fashion_mnist.load("test")
    arrays, pngs = [], []
    for img in images[:count]:
        pil = Image.fromarray(img, "L")
        arrays.append(to_array(pil, spec))
        buf = io.BytesIO()
        pil.save(buf, "PNG")
        pngs.append(buf.getvalue())
    return arrays, pngs


def _engine(folder: Path, precision: str) -> Engine:
    return Engine.load(EngineConfig(model_dir=str(folder), provider="cpu", precision=precision))


def test_export_writes_the_int8_graph_and_records_its_gate(built: Path) -> None:
    card = read_card(built)
    assert card.int8 is not None and card.int8.parity_gated
    assert card.int8.images == card.metrics.test_images == 10_000
    assert card.int8.test_top1_delta_vs_fp32 is not None
    assert abs(card.int8.test_top1_delta_vs_fp32) <= 0.005
    assert card.int8.top1_agreement_vs_fp32 is not None
    assert card.int8.top1_agreement_vs_fp32 >= 0.99
    assert card.int8.calibration_images > 0 and "training" in (card.int8.calibration_data or "")
    assert card.int8.cpu_speedup_vs_fp32 is not None and card.int8.cpu_int8_isa == cpu_int8_isa()
    graph = onnx.load(str(built / INT8_FUSED_FILE)).graph
    kinds = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", ops.OP_TYPE} <= kinds
    # The SE node stays float32: each of its inputs comes out of a DequantizeLinear.
    producer = {out: n.op_type for n in graph.node for out in n.output}
    se_nodes = [n for n in graph.node if n.op_type == ops.OP_TYPE]
    assert se_nodes and all(producer[n.input[0]] == "DequantizeLinear" for n in se_nodes)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_a_graph_that_misses_the_gate_is_not_written(tmp_path: Path) -> None:
    from export.model_card import input_spec_for
    from export.onnx_export import parity_images
    from export.quantize import int8_variant
    from modelcard import FUSED_FILE

    spec = input_spec_for("seresnet14_cifar")
    pixels = parity_images(spec, 16)
    failing = (pixels, np.zeros(len(pixels), dtype=np.int64), 2.0)  # unreachable float32 top-1
    for gated in (True, False):
        folder = _copy(EMBEDDED_MODEL, tmp_path / f"gated-{gated}")
        (folder / INT8_FUSED_FILE).unlink(missing_ok=True)
        entry = int8_variant(folder, FUSED_FILE, spec, pixels, failing, lambda _: None, gated)
        if gated:
            assert entry is None and not (folder / INT8_FUSED_FILE).exists()
        else:
            assert entry is not None and entry.parity_gated is False
            assert (folder / INT8_FUSED_FILE).is_file()


def test_engine_serves_int8_agreeing_with_fp32_on_real_images(built: Path) -> None:
    arrays, _ = _real_images()
    int8, fp32 = _engine(built, "int8"), _engine(built, "fp32")
    assert int8.info.precision == "int8" and int8.info.graph_file == INT8_FUSED_FILE
    assert fp32.info.graph_file == "model.se.onnx"
    top_int8 = np.concatenate([int8.run(arrays[i : i + 32]) for i in range(0, IMAGES, 32)])
    top_fp32 = np.concatenate([fp32.run(arrays[i : i + 32]) for i in range(0, IMAGES, 32)])
    agreement = (top_int8.argmax(axis=1) == top_fp32.argmax(axis=1)).mean()
    assert agreement >= 0.98, agreement
    assert not np.array_equal(top_int8, top_fp32)  # really the quantised graph


def test_service_classifies_with_int8_like_fp32(built: Path) -> None:
    _, pngs = _real_images(64)
    tops: dict[str, list[str]] = {}
    for precision in ("int8", "fp32"):
        env = {"SERESNET_PRECISION": precision, "SERESNET_PROVIDER": "cpu"}
        with running_service(built, env=env) as svc, httpx.Client(base_url=svc.url) as http:
            meta = http.get(f"/v2/models/{read_card(built).name}").json()
            assert precision in json.dumps(meta)
            labels = []
            for i in range(0, len(pngs), 16):  # one request of 16 images, one batch path
                parts = [
                    ("images", (f"{j}.png", png, "image/png"))
                    for j, png in enumerate(pngs[i : i + 16])
                ]
                r = http.post("/classify", files=parts)
                assert r.status_code == 200, r.text
                labels += [res["predictions"][0]["label"] for res in r.json()["results"]]
            tops[precision] = labels
    same = np.mean([a == b for a, b in zip(tops["int8"], tops["fp32"], strict=True)])
    assert same >= 0.95, same


def test_int8_is_refused_when_the_card_does_not_vouch_for_it(built: Path, tmp_path: Path) -> None:
    no_entry = _copy(built, tmp_path / "no-entry")
    _edit_card(no_entry, drop=True)  # the file is there, the card says nothing of it
    with pytest.raises(EngineError, match=r"SERESNET_PRECISION=int8 .*model\.int8\.se\.onnx"):
        _engine(no_entry, "int8")
    assert _engine(no_entry, "auto").info.precision == "fp32"

    no_file = _copy(built, tmp_path / "no-file")
    (no_file / INT8_FUSED_FILE).unlink()
    with pytest.raises(EngineError, match=r"no model\.int8\.se\.onnx"):
        _engine(no_file, "int8")

    ungated = _copy(built, tmp_path / "ungated")
    _edit_card(ungated, parity_gated=False)
    assert _engine(ungated, "auto").info.precision == "fp32"
    assert _engine(ungated, "int8").info.precision == "int8"  # benchmark-only, asked by name


def test_auto_picks_int8_only_when_measured_faster_on_a_like_cpu(built: Path) -> None:
    fast = Int8Offer(True, True, 1.5, "avx512_vnni", "avx512_vnni")
    assert choose_precision("cpu", "auto", "fused", False, False, fast).precision == "int8"
    for offer, why in (
        (Int8Offer(True, True, 1.02, "avx512_vnni", "avx512_vnni"), "measured"),
        (Int8Offer(True, True, 1.5, "avx512_vnni", "avx2"), "timed on a CPU"),
        (Int8Offer(True, False, 1.5, "avx512_vnni", "avx512_vnni"), "benchmark-only"),
    ):
        choice = choose_precision("cpu", "auto", "fused", False, False, offer)
        assert choice.precision == "fp32" and why in choice.reason
    assert choose_precision("cpu", "auto", "unfused", False, False, fast).precision == "fp32"
    assert choose_precision("cuda", "auto", "fused", False, False, fast).precision == "fp32"
    with pytest.raises(EngineError, match="CPU provider only"):
        choose_precision("cuda", "int8", "fused", True, True, fast)
    # The card of a real build: auto follows its timing on this CPU.
    card = read_card(built)
    assert card.int8 is not None and card.int8.cpu_speedup_vs_fp32 is not None
    expected = "int8" if card.int8.cpu_speedup_vs_fp32 >= 1.1 else "fp32"
    assert _engine(built, "auto").info.precision == expected
