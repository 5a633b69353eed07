"""scripts/gpu-check.sh without a GPU: its option parsing, the dry run (every step's command
and estimated GPU seconds, within the budget, every entry point parsing its arguments), the
refusal to start without a CUDA set-up, `make gpu-setup`/`make gpu-check`, and the summary
that fails the check when the service does not serve fp16 with CUDA graphs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        check=False,
    )


def _steps(stdout: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^  (\S+)\s+~\s*(\d+)s  ", stdout, re.M)}


def test_help_teaches_every_option() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for option in ("--short", "--full", "--frontend", "--budget", "--out", "--dry-run"):
        assert option in proc.stdout
    assert "shared" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--budget"], "--budget needs a number"),
        (["--budget", "six"], "--budget must be whole seconds"),
        (["--out"], "--out needs a folder"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "--help" in proc.stderr


@pytest.mark.slow
def test_the_short_dry_run_fits_six_minutes_and_names_each_step(tmp_path: Path) -> None:
    proc = _run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = _steps(proc.stdout)
    assert list(steps) == ["kernels", "export", "parity", "frontend", "se-tax"]
    assert sum(steps.values()) <= 360
    assert f"estimated {sum(steps.values())}s" in proc.stdout
    # One export, reused: the frontend serves the exported folder in float16 and must find
    # fp16 + CUDA graphs served.
    assert proc.stdout.count("-m export onnx") == 1 and "--benchmark-only" in proc.stdout
    assert "--precision fp16" in proc.stdout and "--require-served fp16+graphs" in proc.stdout
    assert str(tmp_path / "gpu-frontend.json") in proc.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
def test_the_frontend_dry_run_and_option_order(tmp_path: Path) -> None:
    a = _run("--frontend", "--dry-run", "--out", str(tmp_path))
    b = _run("--dry-run", "--out", str(tmp_path), "--frontend")
    assert a.returncode == b.returncode == 0, a.stdout + a.stderr
    assert a.stdout == b.stdout
    assert list(_steps(a.stdout)) == ["engine", "export", "frontend"]


@pytest.mark.slow
def test_full_has_its_own_budget_and_a_small_budget_fails() -> None:
    full = _run("--full", "--dry-run")
    assert full.returncode == 0, full.stdout + full.stderr
    assert "budget 900s" in full.stdout and "matrix" in _steps(full.stdout)
    short = _run("--dry-run", "--budget=100")
    assert short.returncode == 1
    assert "more than --budget 100s" in short.stdout


def test_without_a_cuda_setup_it_refuses_to_start(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path), env={"GPU_READY": "0"})
    assert proc.returncode == 2 and "not set up" in proc.stdout
    # This machine: no NVIDIA driver, or no usable CUDA provider; either way exit 2, no steps.
    proc = _run("--out", str(tmp_path))
    if proc.returncode != 2:
        pytest.skip("a GPU set-up is present here; the real check runs instead")
    assert "== kernels" not in proc.stdout


def test_make_has_gpu_setup_and_gpu_check() -> None:
    setup = subprocess.run(
        ["make", "-n", "gpu-setup"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert setup.returncode == 0, setup.stderr
    assert "onnxruntime-gpu[cuda,cudnn]==" in setup.stdout and "preload_dlls" in setup.stdout
    check = subprocess.run(
        ["make", "-n", "gpu-check", "GPU_CHECK_ARGS=--full"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "scripts/gpu-check.sh --full" in check.stdout


def _summary(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_summary", str(folder), "--require-served", "fp16+graphs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def _frontend(served: dict) -> dict:
    return {
        "settings": {"batch": 64},
        "served": served,
        "raw_engine": {"images_per_s": 1.0, "buckets": [], "seconds_to_ready": 1.0},
        "http": [],
    }


def test_the_summary_fails_when_the_service_serves_something_else(tmp_path: Path) -> None:
    served = {"provider": "cuda", "precision": "fp16", "cuda_graphs": True, "fallbacks": []}
    (tmp_path / "gpu-frontend.json").write_text(json.dumps(_frontend(served)))
    good = _summary(tmp_path)
    assert good.returncode == 0, good.stdout
    fell_back = {**served, "cuda_graphs": False, "fallbacks": ["capture: boom"]}
    (tmp_path / "gpu-frontend.json").write_text(json.dumps(_frontend(fell_back)))
    bad = _summary(tmp_path)
    assert bad.returncode == 1
    assert "CUDA graphs off" in bad.stdout and "capture: boom" in bad.stdout
    (tmp_path / "gpu-frontend.json").unlink()
    missing = _summary(tmp_path)
    assert missing.returncode == 1 and "no gpu-frontend.json" in missing.stdout


def test_nothing_outside_ci_names_the_shared_folder() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in ("Makefile", "README.md", "scripts/gpu-check.sh", "bench/gpu_frontend.py"):
        if name in tracked:
            assert "../shared" not in (REPO / name).read_text(), name


def test_every_servable_matrix_row_is_what_the_service_would_plan() -> None:
    """The matrix's servable column: the settings it names make the service's plan serve
    exactly that row's graph, precision, layout and CUDA graphs (on a machine with a GPU)."""
    from bench.fusion_cuda import PRECISIONS, groups, servable
    from service.engine.plan import FolderFacts, plan_engine
    from service.engine.policy import CPU_EP, CUDA_EP
    from service.engine.session import OpsStatus
    from service.settings import load_settings

    ops = OpsStatus(True, frozenset({CPU_EP, CUDA_EP}), "lib", fp16_cuda=True)
    files = {
        "resnet50": "model.onnx",
        "seresnet50-unfused": "model.onnx",
        "seresnet50-fused": "model.se.onnx",
        "seresnet50-fused-cl": "model.fp16.se.onnx",
    }
    rows = 0
    for group in groups(list(PRECISIONS), [False, True]):
        for model in group.models:
            entry = servable(model, group)
            if not entry["servable"]:
                assert entry["why"]
                continue
            rows += 1
            env = dict(kv.split("=", 1) for kv in entry["settings"].split() if "=" in kv)
            overrides = {k.removeprefix("SERESNET_").lower(): v for k, v in env.items()}
            config = load_settings({"model_dir": "models/fashion-seresnet", **overrides})
            plan = plan_engine(
                config.engine_config(),
                gpu_count=1,
                ort_providers=[CUDA_EP, CPU_EP],
                ops=ops,
                folder=FolderFacts(True, True),
            )
            want_file = files[model]
            if group.precision == "fp16":
                want_file = "model.fp16.se.onnx"
            assert plan.filename == want_file, (model, group)
            assert plan.graph.precision == ("fp16" if group.precision == "fp16" else "fp32")
            assert config.cuda_tf32 == (group.precision != "fp32")
            assert plan.layout.layout == ("nhwc" if group.nhwc else "nchw")
            assert plan.cuda_graphs.enabled == group.graphs
    assert rows >= 10
