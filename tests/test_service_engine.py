"""service.engine: the provider and graph policy, the op-library fallback, the signature check,
and that the engine computes exactly what a direct ONNX Runtime session computes, on the
embedded model. The CUDA bucket runner is exercised on the CPU device, where it must agree
with the plain runner bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelcard.schema import FUSED_FILE, UNFUSED_FILE, read_card
from service import ranking
from service.engine.config import EngineConfig
from service.engine.model import Engine, pick_threads
from service.engine.policy import (
    CPU_EP,
    CUDA_EP,
    EngineError,
    choose_graph,
    choose_provider,
    cuda_device_count,
)
from service.engine.runners import BucketRunner
from service.engine.session import OpsStatus, probe_ops
from service.ranking import softmax
from service.ranking import top_k as top_k_rows
from service.settings import load_settings
from testkit.server import EMBEDDED_MODEL


def _settings(model_dir: Path = EMBEDDED_MODEL, **kw: object) -> EngineConfig:
    return load_settings({"model_dir": model_dir, "provider": "cpu", **kw}).engine_config()


def top_k(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    ids, probs = top_k_rows(row[None, :], k)
    return [(int(c), float(p)) for c, p in zip(ids[0], probs[0], strict=True)]


def _images(n: int, engine: Engine, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, engine.sample_shape, dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    e = Engine.load(_settings())
    e.warm_up(1)
    return e


# ----------------------------------------------------------------------------- provider


@pytest.mark.parametrize(
    ("requested", "gpus", "eps", "want"),
    [
        ("auto", 0, [CUDA_EP, CPU_EP], "cpu"),  # onnxruntime-gpu on a machine without a GPU
        ("auto", 1, [CUDA_EP, CPU_EP], "cuda"),
        ("auto", 2, [CPU_EP], "cpu"),  # a GPU, but a CPU-only onnxruntime
        ("cpu", 4, [CUDA_EP, CPU_EP], "cpu"),
        ("cuda", 1, [CUDA_EP, CPU_EP], "cuda"),
    ],
)
def test_provider_policy(requested: str, gpus: int, eps: list[str], want: str) -> None:
    choice = choose_provider(requested, gpus, eps)
    assert choice.provider == want
    assert choice.reason


@pytest.mark.parametrize(
    ("gpus", "eps", "why"), [(0, [CUDA_EP, CPU_EP], "no GPU"), (1, [CPU_EP], "no CUDA provider")]
)
def test_explicit_cuda_that_cannot_work_is_an_error(gpus: int, eps: list[str], why: str) -> None:
    with pytest.raises(EngineError, match=f"SERESNET_PROVIDER=cuda.*{why}"):
        choose_provider("cuda", gpus, eps)


def test_auto_picks_what_this_machine_really_has() -> None:
    e = Engine.load(
        load_settings({"model_dir": EMBEDDED_MODEL, "provider": "auto"}).engine_config()
    )
    has_gpu = cuda_device_count() > 0 and CUDA_EP in ort.get_available_providers()
    assert e.info.provider == ("cuda" if has_gpu else "cpu")
    assert e.info.session_providers[0] == (CUDA_EP if has_gpu else CPU_EP)


# ----------------------------------------------------------------------------- graph


@pytest.mark.parametrize(
    ("provider", "lib", "fused_file", "graph", "level", "want", "want_level", "why"),
    [
        ("cpu", {CPU_EP}, True, "auto", "auto", "fused", "all", "has a CPUExecution"),
        ("cpu", {CPU_EP}, True, "auto", "extended", "fused", "extended", "OPT_LEVEL=extended"),
        ("cpu", {CPU_EP, CUDA_EP}, True, "unfused", "auto", "unfused", "all", "GRAPH=unfused"),
        ("cpu", set(), True, "auto", "auto", "unfused", "all", "has no CPUExecution"),
        ("cpu", {CPU_EP}, False, "auto", "auto", "unfused", "all", "no model.se.onnx"),
        ("cuda", {CPU_EP}, True, "auto", "auto", "unfused", "all", "no CUDAExecution"),
        ("cuda", {CPU_EP, CUDA_EP}, True, "auto", "auto", "fused", "all", "CUDAExecution"),
        ("cpu", {CPU_EP}, True, "fused", "all", "fused", "all", "OPT_LEVEL=all"),
        ("cpu", {CPU_EP}, True, "auto", "basic", "fused", "basic", "OPT_LEVEL=basic"),
    ],
)
def test_graph_policy(provider, lib, fused_file, graph, level, want, want_level, why) -> None:
    choice = choose_graph(provider, frozenset(lib), fused_file, graph, level)
    assert (choice.graph, choice.opt_level) == (want, want_level)
    assert choice.filename == (FUSED_FILE if want == "fused" else UNFUSED_FILE)
    assert why in choice.reason


def test_library_error_is_the_reason_for_the_fallback() -> None:
    choice = choose_graph("cpu", frozenset(), True, "auto", "auto", "libfoo.so: wrong ELF")
    assert choice.graph == "unfused" and "wrong ELF" in choice.reason


@pytest.mark.parametrize(("lib", "fused_file"), [(set(), True), ({CPU_EP}, False)])
def test_explicit_fused_that_cannot_be_honoured_is_an_error(lib, fused_file) -> None:
    with pytest.raises(EngineError, match="SERESNET_GRAPH=fused"):
        choose_graph("cpu", frozenset(lib), fused_file, "fused")


def test_unloadable_library_falls_back_to_the_unfused_graph(monkeypatch, tmp_path) -> None:
    bogus = tmp_path / "libseresnet_ops.so"
    bogus.write_bytes(b"not a shared object")
    monkeypatch.setenv("SERESNET_OPS_LIBRARY", str(bogus))
    status = probe_ops()
    assert not status.loaded and "libseresnet_ops.so" in (status.error or "")
    e = Engine.load(_settings(), ops_status=status)
    assert e.info.graph == "unfused" and e.info.graph_file == UNFUSED_FILE
    assert "op library unavailable" in e.info.reason
    assert e.info.describe()["ops"]["error"] == status.error


def test_fused_and_unfused_graphs_agree(engine: Engine) -> None:
    status = probe_ops()
    if not ((EMBEDDED_MODEL / FUSED_FILE).is_file() and CPU_EP in status.providers):
        pytest.fail(
            f"the embedded model must ship {FUSED_FILE} and the op library must build "
            f"with a CPU kernel: {status}"
        )
    fused = Engine.load(_settings(graph="fused"))
    unfused = Engine.load(_settings(graph="unfused"))
    assert (fused.info.graph, unfused.info.graph) == ("fused", "unfused")
    images = _images(16, engine, seed=5)
    np.testing.assert_allclose(fused.run(images), unfused.run(images), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- results


def test_engine_equals_a_direct_onnxruntime_run(engine: Engine) -> None:
    images = _images(7, engine, seed=2)
    session = (
        ort.InferenceSession(str(EMBEDDED_MODEL / engine.info.graph_file), providers=[CPU_EP])
        if engine.info.graph == "unfused"
        else None
    )
    if session is None:  # the fused graph needs the op library registered
        import ops

        so = ort.SessionOptions()
        ops.register(so)
        session = ort.InferenceSession(str(EMBEDDED_MODEL / FUSED_FILE), so, providers=[CPU_EP])
    card = engine.card
    direct = session.run([card.output.logits], {card.input.tensor: np.stack(images)})[0]
    np.testing.assert_allclose(engine.run(images), direct, rtol=0, atol=1e-5)
    # batch composition does not change a row
    np.testing.assert_allclose(engine.run(images[3:4])[0], direct[3], rtol=0, atol=1e-5)


def test_bucket_runner_pads_and_binds_correctly_on_cpu(engine: Engine) -> None:
    card = engine.card
    session = ort.InferenceSession(str(EMBEDDED_MODEL / UNFUSED_FILE), providers=[CPU_EP])
    runner = BucketRunner(
        session,
        card.input.tensor,
        card.output.logits,
        engine.sample_shape,
        np.dtype(card.input.dtype),
        card.num_classes,
        (1, 4, 8),
        device="cpu",
    )
    images = _images(8, engine, seed=3)
    plain = session.run([card.output.logits], {card.input.tensor: np.stack(images)})[0]
    for n in (8, 4, 3, 1, 5, 2):  # padded shapes after full ones: no stale rows may leak
        out = runner.run(images[:n])
        assert out.shape == (n, card.num_classes)
        np.testing.assert_allclose(out, plain[:n], rtol=0, atol=1e-5)
    assert runner.bucket_for(3) == 4 and runner.bucket_for(5) == 8
    with pytest.raises(EngineError, match="largest bucket"):
        runner.bucket_for(9)


def test_warm_up_runs_each_shape_and_records_it() -> None:
    e = Engine.load(_settings(max_batch_size=8, max_queue_size=8, max_images_per_request=8))
    e.warm_up(1)
    assert e.info.warm_shapes == (1, 8)
    assert e.info.warmup_seconds is not None
    assert e.info.batch_buckets == (1, 2, 4, 8)


def test_thread_count_is_measured_unless_set(engine: Engine) -> None:
    # The module's engine runs on the default settings: 0 threads, so one against every core.
    config = engine.config
    assert config.intra_op_threads == 0
    info = engine.info
    session_threads = engine.session.get_session_options().intra_op_num_threads
    assert session_threads == info.intra_op_threads
    # The pool spins between operators only where splitting the model was measured to pay.
    spin = engine.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning"
    )
    assert spin == ("1" if info.intra_op_spinning else "0")
    assert info.intra_op_spinning == (info.intra_op_threads > 1)
    if config.cpu_cores > 1:
        assert info.intra_op_threads in (1, config.cpu_cores)
        assert (
            "one thread" in info.intra_op_reason
            and f"on {config.cpu_cores}" in info.intra_op_reason
        )
    else:
        assert (info.intra_op_threads, info.intra_op_reason) == (1, "one core")
    fixed = Engine.load(_settings(intra_op_threads=3))
    assert fixed.session.get_session_options().intra_op_num_threads == 3
    assert (fixed.info.intra_op_threads, fixed.info.intra_op_reason) == (3, "as configured")
    assert not fixed.info.intra_op_spinning


@pytest.mark.parametrize(
    ("one_ms", "many_ms", "want"),
    [
        (0.44, 0.57, (1, False)),  # the embedded model here: splitting costs more than it gives
        (0.44, 0.42, (1, False)),  # faster, but not by MIN_GAIN: the workers keep the core
        (71.1, 41.4, (2, True)),  # SE-ResNet-50: every core, the pool spinning
    ],
)
def test_every_core_spinning_only_when_splitting_pays(
    one_ms: float, many_ms: float, want: tuple[int, bool]
) -> None:
    threads = pick_threads(one_ms, many_ms, cores=2)
    assert (threads.count, threads.spinning) == want
    assert f"{one_ms:.2f} ms on one thread" in threads.reason


def test_softmax_and_top_k_are_exact() -> None:
    logits = np.array(
        [[2.0, 1.0, 0.1, 2.0, -3.0], [1000.0, 0.0, -1000.0, 999.0, 5.0]], dtype=np.float32
    )
    probs = softmax(logits)
    ref = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    assert top_k(probs[0], 2) == [(0, probs[0, 0]), (3, probs[0, 3])]  # tie: lower id first
    assert [c for c, _ in top_k(probs[0], 50)] == [0, 3, 1, 2, 4]  # clamped to 5 classes
    assert [c for c, _ in top_k(probs[1], 1)] == [0]
    scores = [p for _, p in top_k(probs[1], 5)]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("rows", [1, 8])  # one stable sort, and the partition of many scores
def test_top_k_of_many_classes_keeps_ties_in_class_order(rows: int) -> None:
    # Scores rounded to a coarse grid tie often, also across the k-th place.
    scores = np.round(np.random.default_rng(3).random((rows, 1000)) * 50) / 50
    assert (scores.size > ranking.PARTITION_FROM) == (rows > 1)
    for k in (1, 5, 37):
        ids, values = top_k_rows(scores, k)
        want = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, want, axis=-1))


# ----------------------------------------------------------------------------- card checks


def _copy_with_card(tmp_path: Path, **input_changes: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(EMBEDDED_MODEL / UNFUSED_FILE, folder / UNFUSED_FILE)
    card = read_card(EMBEDDED_MODEL)
    spec = card.input.model_copy(update=input_changes)
    card.model_copy(update={"input": spec}).write(folder)
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tensor": "pixels"}, "no input named 'pixels'"),
        ({"dtype": "float32", "normalization": "caller"}, "model.json says float32"),
        ({"height": 32, "width": 32}, "does not match model.json"),
    ],
)
def test_a_card_that_disagrees_with_the_graph_is_refused(tmp_path, changes, message) -> None:
    with pytest.raises(EngineError, match=message):
        Engine.load(_settings(_copy_with_card(tmp_path, **changes), graph="unfused"))


def test_a_folder_without_a_card_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"model\.json"):
        Engine.load(_settings(tmp_path))


def test_ops_status_describes_itself() -> None:
    d = OpsStatus(True, frozenset({CUDA_EP, CPU_EP}), "x.so").describe()
    assert d["providers"] == [CPU_EP, CUDA_EP] and d["error"] is None


# ----------------------------------------------------------------------------- precision, graphs


def test_precision_policy() -> None:
    from service.engine.policy import choose_precision

    auto = choose_precision("cuda", "auto", "fused", True, True)
    assert auto.precision == "fp16" and "model.fp16.se.onnx" in auto.reason
    for provider, graph, present, kernel, why in (
        ("cpu", "fused", True, True, "CUDA only"),
        ("cuda", "unfused", True, True, "unfused"),
        ("cuda", "fused", False, True, "no model.fp16.se.onnx"),
        ("cuda", "fused", True, False, "no float16 CUDA kernel"),
    ):
        fallback = choose_precision(provider, "auto", graph, present, kernel)
        assert fallback.precision == "fp32" and why in fallback.reason
        with pytest.raises(EngineError, match="SERESNET_PRECISION=fp16"):
            choose_precision(provider, "fp16", graph, present, kernel)
    assert choose_precision("cuda", "fp32", "fused", True, True).precision == "fp32"


def test_cuda_graph_policy() -> None:
    from service.engine.policy import choose_cuda_graphs

    assert choose_cuda_graphs("cuda", "auto").enabled
    assert not choose_cuda_graphs("cuda", "off").enabled
    assert not choose_cuda_graphs("cpu", "auto").enabled
    with pytest.raises(EngineError, match="SERESNET_CUDA_GRAPHS=on"):
        choose_cuda_graphs("cpu", "on")


def test_the_engine_says_what_runs_and_why(engine: Engine) -> None:
    info = engine.info.describe()
    # On the CPU auto weighs the card's int8 graph (kept at fp32 unless it was timed faster).
    assert info["precision"] == "fp32" and "int8" in info["precision_reason"]
    assert info["cuda_graphs"] is False and "not on CUDA" in info["cuda_graphs_reason"]
    assert info["graph_file"] == "model.se.onnx"
    with pytest.raises(EngineError, match="SERESNET_PRECISION=fp16"):
        Engine.load(_settings(precision="fp16"))
