"""The engine's plan and its fallbacks (service/engine/plan.py) on real ONNX Runtime CPU
sessions: ORT's own option checks, the cause read from ORT's real error messages, a fallback
chosen by that cause, explicit settings that fail loudly instead of degrading, the
benchmark-only float16 file that auto never serves, the channels-last float16 graph the engine
builds in memory, and warm-up on the batcher's own thread."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelcard.schema import FP16_FUSED_FILE, FUSED_FILE, UNFUSED_FILE, read_card
from service.engine.batcher import Batcher
from service.engine.config import EngineConfig
from service.engine.model import Engine, folder_facts
from service.engine.plan import (
    EnginePlan,
    FolderFacts,
    LayoutChoice,
    choose_layout,
    fall_back,
    plan_engine,
)
from service.engine.policy import CPU_EP, CUDA_EP, EngineError
from service.engine.server import EngineProcessConfig, EngineServer
from service.engine.session import (
    LoadError,
    OpsStatus,
    cuda_options,
    load_cause,
    make_session,
    probe_ops,
    session_options,
    session_providers,
)
from testkit.server import EMBEDDED_MODEL

OPS_ALL = OpsStatus(True, frozenset({CPU_EP, CUDA_EP}), "lib", fp16_cuda=True)
FOLDER_ALL = FolderFacts(fused_present=True, fp16_present=True)


def _config(**kw: object) -> EngineConfig:
    return EngineConfig(model_dir=EMBEDDED_MODEL, **kw)  # type: ignore[arg-type]


def _cuda_plan(**kw: object) -> EnginePlan:
    """What a machine with a GPU, the CUDA EP and the full op library would try first."""
    return plan_engine(
        _config(**kw), gpu_count=1, ort_providers=[CUDA_EP, CPU_EP], ops=OPS_ALL, folder=FOLDER_ALL
    )


def _ort_error(path: str, so: ort.SessionOptions, providers: list) -> str:
    try:
        ort.InferenceSession(path, so, providers=providers, enable_fallback=0)
    except Exception as e:  # the message is what we test
        return str(e)
    return ""


# ----------------------------------------------------------------------------- providers


def test_cuda_graph_session_options_pass_onnxruntimes_configuration_check() -> None:
    """disable_cpu_ep_fallback with an explicit CPU EP is INVALID_ARGUMENT at Initialize, before
    any GPU is touched; the providers the engine lists with CUDA graphs must not hit it."""
    config = _config(provider="cuda")
    plan = _cuda_plan(provider="cuda", precision="fp32", graph="unfused")
    assert plan.cuda_graphs.enabled
    so = session_options(plan.graph, "cuda", config, cuda_graphs=True)
    providers = session_providers("cuda", cuda_options(config, cuda_graphs=True), True)
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    assert names == [CUDA_EP]
    path = str(EMBEDDED_MODEL / UNFUSED_FILE)
    # The check is live in this onnxruntime: the old pair is refused by it ...
    old = _ort_error(path, so, [*providers, CPU_EP])
    assert "Conflicting session configuration" in old
    # ... and the engine's pair gets past it: it loads where a GPU exists, and fails here
    # later, for the CUDA provider's absence, not for the configuration.
    assert "Conflicting session configuration" not in _ort_error(path, so, providers)
    # Without graphs the CPU provider stays listed, for the nodes CUDA does not take.
    assert session_providers("cuda", {}, False)[-1] == CPU_EP
    assert session_providers("cpu", {}, False) == [CPU_EP]


# ----------------------------------------------------------------------------- causes


def test_the_cause_comes_from_onnxruntimes_real_messages(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx file")
    assert load_cause(_ort_error(str(broken), ort.SessionOptions(), [CPU_EP])) == "model_file"
    # A fused graph without the op library registered: a node nobody implements.
    fused = str(EMBEDDED_MODEL / FUSED_FILE)
    assert load_cause(_ort_error(fused, ort.SessionOptions(), [CPU_EP])) == "model_file"
    conflict = ort.SessionOptions()
    conflict.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    assert load_cause(_ort_error(str(EMBEDDED_MODEL / UNFUSED_FILE), conflict, [CPU_EP])) == (
        "other"
    )
    # On a build with the CUDA EP listed but unusable (no GPU), every node lands on the CPU.
    if CUDA_EP in ort.get_available_providers():
        message = _ort_error(str(EMBEDDED_MODEL / UNFUSED_FILE), conflict, [(CUDA_EP, {})])
        if message:
            assert load_cause(message) == "cpu_node", message
    assert load_cause("something nobody planned for") == "other"


# ----------------------------------------------------------------------------- fall_back


def test_a_node_left_on_the_cpu_or_a_failed_capture_turns_graphs_off_and_nothing_else() -> None:
    plan = _cuda_plan()
    assert plan.cuda_graphs.enabled and plan.graph.precision == "fp16"
    for cause in ("cpu_node", "capture"):
        after = fall_back(plan, cause, "ORT said so", _config())
        assert not after.cuda_graphs.enabled and "ORT said so" in after.cuda_graphs.reason
        assert after.graph == plan.graph and after.precision == plan.precision
        assert after.fallbacks == (f"{cause}: ORT said so",)
    with pytest.raises(EngineError, match="SERESNET_CUDA_GRAPHS=on"):
        fall_back(_cuda_plan(cuda_graphs="on"), "capture", "x", _config(cuda_graphs="on"))


def test_a_float16_file_that_fails_gives_up_float16_only() -> None:
    plan = _cuda_plan()
    after = fall_back(plan, "model_file", "bad fp16", _config())
    assert after.graph.graph == "fused" and after.filename == FUSED_FILE
    assert after.precision.precision == "fp32" and "bad fp16" in after.precision.reason
    assert after.cuda_graphs == plan.cuda_graphs  # the cause was the file, not the graphs
    # The next failure of the fused file gives up the fused graph.
    last = fall_back(after, "model_file", "bad fused", _config())
    assert last.filename == UNFUSED_FILE and len(last.fallbacks) == 2
    with pytest.raises(EngineError, match=r"cannot load model\.onnx"):
        fall_back(last, "model_file", "bad unfused", _config())


@pytest.mark.parametrize(
    ("settings", "cause", "variable"),
    [
        ({"precision": "fp16"}, "model_file", "SERESNET_PRECISION=fp16"),
        ({"precision": "fp16"}, "op_library", "SERESNET_PRECISION=fp16"),
        ({"graph": "fused", "precision": "fp32"}, "op_library", "SERESNET_GRAPH=fused"),
        ({"graph": "fused", "precision": "fp32"}, "model_file", "SERESNET_GRAPH=fused"),
    ],
)
def test_an_explicit_setting_is_never_given_up(settings: dict, cause, variable: str) -> None:
    plan = _cuda_plan(**settings)
    with pytest.raises(EngineError, match=variable):
        fall_back(plan, cause, "it broke", _config(**settings))


def test_an_op_library_failure_gives_up_every_fused_file_at_once() -> None:
    after = fall_back(_cuda_plan(), "op_library", "cannot register", _config())
    assert after.filename == UNFUSED_FILE and after.precision.precision == "fp32"


def test_an_unknown_cause_is_an_error_not_a_guess() -> None:
    with pytest.raises(EngineError, match="Conflicting"):
        fall_back(_cuda_plan(), "other", "Conflicting session configuration", _config())


# ----------------------------------------------------------------------------- real loads


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, folder, ignore=shutil.ignore_patterns("checkpoint*"))
    return folder


def test_a_broken_fused_file_falls_back_to_unfused_with_its_cause(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / FUSED_FILE).write_bytes(b"truncated")
    engine = Engine.load(EngineConfig(model_dir=folder, provider="cpu"))
    assert engine.info.graph_file == UNFUSED_FILE
    assert engine.info.fallbacks and engine.info.fallbacks[0].startswith("model_file:")
    with pytest.raises(EngineError, match="SERESNET_GRAPH=fused"):
        Engine.load(EngineConfig(model_dir=folder, provider="cpu", graph="fused"))


def test_explicit_float16_on_the_cpu_names_the_variable() -> None:
    with pytest.raises(EngineError, match="SERESNET_PRECISION=fp16"):
        Engine.load(EngineConfig(model_dir=EMBEDDED_MODEL, provider="cpu", precision="fp16"))


def test_a_benchmark_only_float16_file_is_served_only_by_name(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["float16"]["parity_gated"] = False
    (folder / "model.json").write_text(json.dumps(card))
    parsed = read_card(folder)
    assert parsed.float16 is not None and not parsed.float16.parity_gated
    assert not folder_facts(folder, parsed, "auto").fp16_present
    assert folder_facts(folder, parsed, "fp16").fp16_present
    facts = folder_facts(folder, parsed, "auto")
    auto = plan_engine(
        _config(), gpu_count=1, ort_providers=[CUDA_EP, CPU_EP], ops=OPS_ALL, folder=facts
    )
    assert auto.graph.precision == "fp32"
    assert read_card(EMBEDDED_MODEL).float16.parity_gated  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- layout


def test_channels_last_is_float16_on_cuda_only() -> None:
    assert choose_layout("cuda", "auto", "fp16").layout == "nchw"
    assert choose_layout("cuda", "nhwc", "fp16").layout == "nhwc"
    for provider, precision in (("cpu", "fp16"), ("cuda", "fp32")):
        with pytest.raises(EngineError, match="SERESNET_CUDA_LAYOUT=nhwc"):
            choose_layout(provider, "nhwc", precision)
    plan = _cuda_plan(cuda_layout="nhwc")
    assert plan.layout.layout == "nhwc"
    with pytest.raises(EngineError, match="SERESNET_CUDA_LAYOUT=nhwc"):
        fall_back(plan, "model_file", "x", _config(cuda_layout="nhwc"))


def test_the_channels_last_float16_graph_computes_what_channels_first_does() -> None:
    """The session the engine builds for SERESNET_CUDA_LAYOUT=nhwc (channels-last SE nodes made
    in memory), run here on the CPU provider, against the channels-first float16 file."""
    if CPU_EP not in probe_ops().providers:
        pytest.skip("the op library's CPU kernel is not built (make test builds it)")
    config = _config(provider="cpu")
    first = _cuda_plan(precision="fp16")
    cpu = plan_engine(
        config,
        gpu_count=0,
        ort_providers=[CPU_EP],
        ops=probe_ops(),
        folder=FolderFacts(True, True),
    )
    nchw = replace(cpu, graph=first.graph, cuda_graphs=replace(cpu.cuda_graphs, enabled=False))
    nhwc = replace(nchw, layout=LayoutChoice("nhwc", "test"))
    assert nchw.filename == FP16_FUSED_FILE
    a, _ = make_session(EMBEDDED_MODEL, nchw, config)
    b, _ = make_session(EMBEDDED_MODEL, nhwc, config)
    name = a.get_inputs()[0].name
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(a.run(None, {name: x})[0], b.run(None, {name: x})[0], atol=2e-2)


def test_a_missing_file_is_a_load_error_with_its_cause(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / FP16_FUSED_FILE).unlink()
    plan = _cuda_plan()
    with pytest.raises(LoadError) as info:
        make_session(
            folder, replace(plan, provider=replace(plan.provider, provider="cpu")), _config()
        )
    assert info.value.cause == "model_file"


# ----------------------------------------------------------------------------- threads


def test_warm_up_runs_on_the_batchers_own_thread() -> None:
    engine = Engine.load(_config(provider="cpu"))

    async def main() -> tuple[int, int, int]:
        batcher = Batcher(engine.run, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64)
        batcher.start()
        try:
            await batcher.call(engine.warm_up, 1)
            serving = await batcher.call(threading.get_ident)
            image = np.zeros(engine.sample_shape, dtype=engine.input_dtype)
            await batcher.submit([image, image])
            return serving, batcher.stats.batches, threading.get_ident()
        finally:
            await batcher.close(10)

    serving, batches, loop_thread = asyncio.run(main())
    assert engine.warm_thread == serving != loop_thread
    assert batches == 1  # call() is not a batch


def test_the_engine_server_warms_up_on_the_thread_that_runs_its_batches(tmp_path: Path) -> None:
    engine = Engine.load(_config(provider="cpu"))
    config = EngineProcessConfig(
        engine=engine.config,
        socket_path=tmp_path / "engine.sock",
        shm_path=tmp_path / "slots",
        generation=1,
        max_queue_size=16,
        max_queue_delay_ms=1,
        warmup_rounds=1,
        drain_timeout_s=5,
        log_level="warning",
        log_format="text",
    )

    async def main() -> tuple[bool, int]:
        server = EngineServer(config, engine)
        server.batcher.start()
        try:
            await server.warm_up()
            return server.ready, await server.batcher.call(threading.get_ident)
        finally:
            await server.batcher.close(10)
            server.arena.close()
            server.arena.unlink()

    gc.unfreeze()
    try:
        ready, serving = asyncio.run(main())
        # Once ready, what loading made is out of the collector's sight (gc.freeze).
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert ready and engine.warm_thread == serving


def _fails_past_batch_one(folder: Path) -> None:
    """Rewrite the folder's model.onnx so that it loads, and runs batch 1, but fails at any
    larger batch (its logits reshaped to a fixed [1, classes]): a run-time failure at warm-up."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / UNFUSED_FILE))
    (output,) = model.graph.output
    for node in model.graph.node:
        node.output[:] = [f"{o}__raw" if o == output.name else o for o in node.output]
    classes = read_card(folder).num_classes
    shape = numpy_helper.from_array(np.array([1, classes], dtype=np.int64), "fixed_shape")
    model.graph.initializer.append(shape)
    model.graph.node.append(
        helper.make_node("Reshape", [f"{output.name}__raw", "fixed_shape"], [output.name])
    )
    onnx.save(model, str(folder / UNFUSED_FILE))


def test_a_failure_while_graphs_are_on_rebuilds_without_them_once(tmp_path: Path) -> None:
    """Warm-up that fails with CUDA graphs on gives up the graphs (auto) and warms a rebuilt
    session, once: here the rebuilt session fails too, so the error is raised, not retried.
    Run on the CPU provider with a plan that says graphs are on (what a GPU would plan)."""
    folder = _copy(tmp_path)
    _fails_past_batch_one(folder)
    for setting in ("auto", "on"):
        config = EngineConfig(model_dir=folder, provider="cpu", graph="unfused")
        engine = Engine.load(config)
        engine.config = replace(config, cuda_graphs=setting)  # as configured on a GPU
        on = replace(engine.plan, cuda_graphs=replace(engine.plan.cuda_graphs, enabled=True))
        engine._build(on)
        assert engine.info.cuda_graphs
        if setting == "on":
            with pytest.raises(EngineError, match="SERESNET_CUDA_GRAPHS=on"):
                engine.warm_up(1)
            continue
        with pytest.raises(Exception, match=r"(?i)reshape") as info:
            engine.warm_up(1)
        assert not isinstance(info.value, EngineError)  # the run's own error, after one rebuild
        assert not engine.info.cuda_graphs
        assert engine.info.fallbacks and engine.info.fallbacks[0].startswith("capture:")
        assert engine.info.cuda_graphs_reason.startswith("auto: capture failed")
