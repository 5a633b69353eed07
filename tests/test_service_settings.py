"""Configuration: SERESNET_* variables, flags over variables, one-line errors naming the
variable or flag, and a --help that teaches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.settings import Settings, SettingsError, load_settings
from testkit.server import EMBEDDED_MODEL, REPO_ROOT


def test_defaults_and_derived_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SERESNET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(REPO_ROOT)
    s = load_settings()
    assert s.model_dir.resolve() == EMBEDDED_MODEL.resolve()
    assert (s.provider, s.graph, s.opt_level) == ("auto", "auto", "auto")
    assert s.buckets() == (1, 2, 4, 8, 16, 32)
    assert s.preprocess_workers() >= 1
    engine = s.engine_config()  # 0: the engine measures one thread against every core
    assert engine.intra_op_threads == 0 and engine.cpu_cores >= 1
    assert s.api_key is None


def test_environment_is_read_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERESNET_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("SERESNET_PROVIDER", "cpu")
    monkeypatch.setenv("SERESNET_BATCH_BUCKETS", "1, 3,6")
    monkeypatch.setenv("SERESNET_API_KEY", "k")
    s = load_settings({"model_dir": EMBEDDED_MODEL})
    assert (s.max_batch_size, s.provider, s.buckets()) == (12, "cpu", (1, 3, 6, 12))
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert load_settings({"model_dir": EMBEDDED_MODEL, "max_batch_size": "20"}).max_batch_size == 20


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("SERESNET_MAX_BATCH_SIZE", "abc", "valid integer"),
        ("SERESNET_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("SERESNET_PROVIDER", "gpu", "'auto', 'cuda' or 'cpu'"),
        ("SERESNET_GRAPH", "both", "'auto', 'fused' or 'unfused'"),
        ("SERESNET_OPT_LEVEL", "max", "'auto', 'basic', 'extended' or 'all'"),
        ("SERESNET_MAX_QUEUE_DELAY_MS", "-1", "greater than or equal to 0"),
        ("SERESNET_DRAIN_TIMEOUT_S", "inf", "finite"),
        ("SERESNET_MODEL_DIR", "no/such/folder", "is not a directory"),
        ("SERESNET_BATCH_BUCKETS", "1,x", "comma-separated"),
        ("SERESNET_BATCH_BUCKETS", "1,64", "exceed max_batch_size"),
        ("SERESNET_MAX_IMAGES_PER_REQUEST", "5000", "exceeds max_queue_size"),
        ("SERESNET_PORT", "70000", "less than or equal to 65535"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch, env: str, value: str, fragment: str) -> None:
    monkeypatch.setenv(env, value)
    overrides = {} if env == "SERESNET_MODEL_DIR" else {"model_dir": EMBEDDED_MODEL}
    with pytest.raises(SettingsError) as info:
        load_settings(overrides)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"{env}={value}: ") and fragment in line


def test_a_bad_flag_is_named_as_typed() -> None:
    with pytest.raises(SettingsError, match=r"^--max-batch-size=-3: "):
        load_settings(
            {"model_dir": EMBEDDED_MODEL, "max_batch_size": "-3"},
            {"max_batch_size": "--max-batch-size"},
        )


def test_the_api_key_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERESNET_API_KEY", "x" * 10)
    s = Settings(model_dir=EMBEDDED_MODEL)
    assert "xxxxxxxxxx" not in repr(s)


def _run_service(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ([], {"SERESNET_MAX_QUEUE_DELAY_MS": "soon"}, "SERESNET_MAX_QUEUE_DELAY_MS=soon"),
        ([], {"SERESNET_MODEL_DIR": "nowhere"}, "SERESNET_MODEL_DIR=nowhere"),
        (["--port", "-1"], {}, "--port=-1"),
        (["--model-dir", "."], {}, "model.json"),
    ],
)
def test_start_up_stops_with_one_line(args: list[str], env: dict[str, str], named: str) -> None:
    proc = _run_service([*args, "--host", "127.0.0.1"], env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and named in lines[0]


def test_help_teaches_flags_variables_and_examples() -> None:
    proc = _run_service(["--help"], {})
    assert proc.returncode == 0
    out = proc.stdout
    for needle in (
        "--model-dir",
        "SERESNET_MODEL_DIR",
        "SERESNET_PROVIDER",
        "SERESNET_GRAPH",
        "SERESNET_OPT_LEVEL",
        "SERESNET_MAX_BATCH_SIZE",
        "SERESNET_MAX_QUEUE_DELAY_MS",
        "SERESNET_MAX_QUEUE_SIZE",
        "SERESNET_REQUEST_TIMEOUT_S",
        "SERESNET_MAX_BODY_BYTES",
        "SERESNET_MAX_IMAGE_PIXELS",
        "SERESNET_MAX_IMAGES_PER_REQUEST",
        "SERESNET_API_KEY",
        "overrides",
        "examples:",
        "curl",
        "/classify",
        "/v2/health/ready",
    ):
        assert needle in out, needle


@pytest.mark.parametrize(
    ("content", "want"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_a_container_cpu_quota_caps_the_thread_counts(tmp_path, content: str, want) -> None:
    from service.settings import _cgroup_cpu_limit

    path = tmp_path / "cpu.max"
    path.write_text(content)
    assert _cgroup_cpu_limit(path) == want
    assert _cgroup_cpu_limit(tmp_path / "missing") is None


def test_tf32_is_on_by_default_and_can_be_turned_off() -> None:
    from service.engine.session import cuda_options

    on = load_settings({"model_dir": EMBEDDED_MODEL})
    off = load_settings({"model_dir": EMBEDDED_MODEL, "cuda_tf32": "0"})
    assert cuda_options(on.engine_config())["use_tf32"] == "1"
    assert cuda_options(off.engine_config())["use_tf32"] == "0"


def test_worker_count_follows_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.settings as settings_module

    for cores, want in ((1, 1), (2, 2), (3, 2), (4, 3), (16, 15)):
        monkeypatch.setattr(settings_module, "available_cores", lambda c=cores: c)
        assert load_settings({"model_dir": EMBEDDED_MODEL}).worker_count() == want
    assert load_settings({"model_dir": EMBEDDED_MODEL, "workers": 3}).worker_count() == 3


def test_settings_that_could_never_work_stop_start_up() -> None:
    with pytest.raises(SettingsError, match=r"SERESNET_API_KEY.*ASCII"):
        load_settings({"model_dir": EMBEDDED_MODEL, "api_key": "clé"})
    with pytest.raises(SettingsError, match=r"max_inflight_body_mb|MAX_INFLIGHT"):
        load_settings(
            {"model_dir": EMBEDDED_MODEL, "max_inflight_body_mb": 1, "max_body_bytes": 8 * 2**20}
        )
