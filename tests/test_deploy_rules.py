"""The recording and alerting rules of deploy/ (the PrometheusRule that the autoscalers read)
run by Prometheus' own ``promtool test rules`` on made-up series. promtool comes from Debian's
``prometheus`` package, unpacked into a cache, not installed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from debtools import unpacked
from deployutil import DEPLOY, render

NS = '{namespace="seresnet"}'
POD_SUM = "namespace_pod:seresnet_admitted_images:sum"
LABELS = 'model="fashion-seresnet",version="1",provider="cuda",graph="fused",opt_level="all"'


def series(pod: str, values: str, name: str = "seresnet_admitted_images", extra: str = "") -> dict:
    labels = f'namespace="seresnet",pod="{pod}",{LABELS}{extra}'
    return {"series": f"{name}{{{labels}}}", "values": values}


@pytest.fixture(scope="module")
def promtool() -> Path:
    return unpacked(["prometheus"]) / "usr" / "bin" / "promtool"


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (rule,) = [o for o in render(DEPLOY / "kubernetes" / "base") if o["kind"] == "PrometheusRule"]
    path = tmp_path_factory.mktemp("rules") / "seresnet.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def run(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=120)


def test_rules_are_valid(promtool: Path, rules_file: Path) -> None:
    result = run(promtool, "check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_on_made_up_series(promtool: Path, rules_file: Path, tmp_path: Path) -> None:
    full = "the queue of pod-b is over 80 % full; next come 503 + Retry-After."
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # pod-a: 100 images in flight; pod-b: 450 (over 80 % of 512), split over
                    # two model label sets that the recording rule must add up.
                    series("pod-a", "100x80"),
                    series("pod-b", "300x80"),
                    series("pod-b", "150x80", extra=',replica="x"'),
                    series("pod-a", "0+150x80", name="seresnet_inference_count_total"),
                    series("pod-a", "0x80", name="seresnet_dropped_images_total"),
                ],
                "promql_expr_test": [
                    {
                        "expr": POD_SUM,
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": f'{POD_SUM}{{namespace="seresnet",pod="pod-a"}}',
                                "value": 100,
                            },
                            {
                                "labels": f'{POD_SUM}{{namespace="seresnet",pod="pod-b"}}',
                                "value": 450,
                            },
                        ],
                    },
                    {
                        "expr": "namespace:seresnet_admitted_images:sum",
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": f"namespace:seresnet_admitted_images:sum{NS}",
                                "value": 550,
                            }
                        ],
                    },
                    {
                        "expr": "namespace:seresnet_admitted_images_per_pod:avg",
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": f"namespace:seresnet_admitted_images_per_pod:avg{NS}",
                                "value": 275,
                            }
                        ],
                    },
                    {
                        # What KEDA's trigger asks: the total, which it divides by the pods.
                        "expr": f'sum({POD_SUM}{{namespace="seresnet"}})',
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 550}],
                    },
                    {
                        "expr": "namespace:seresnet_images_per_second:rate1m",
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": f"namespace:seresnet_images_per_second:rate1m{NS}",
                                "value": 10,
                            }
                        ],
                    },
                ],
                "alert_rule_test": [
                    # Over the threshold for 1 minute only: pending, not firing.
                    {"eval_time": "1m", "alertname": "SeresnetQueueNearlyFull", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "SeresnetQueueNearlyFull",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": "seresnet",
                                    "pod": "pod-b",
                                },
                                "exp_annotations": {
                                    "summary": "pod-b holds 450 admitted images (queue 512)",
                                    "description": full.replace("the queue", "The queue")
                                    + " Check that the autoscaler can add GPU pods "
                                    "(maxReplicaCount, free GPUs).",
                                },
                            }
                        ],
                    },
                    {"eval_time": "10m", "alertname": "SeresnetRefusingImages", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "seresnet.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_catches_a_wrong_expectation(
    promtool: Path, rules_file: Path, tmp_path: Path
) -> None:
    """The test above can fail: the same series, a wrong sum."""
    tests = {
        "rule_files": [str(rules_file)],
        "tests": [
            {
                "interval": "15s",
                "input_series": [series("pod-a", "100x20")],
                "promql_expr_test": [
                    {
                        "expr": "namespace:seresnet_admitted_images:sum",
                        "eval_time": "2m",
                        "exp_samples": [{"labels": '{namespace="seresnet"}', "value": 101}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "wrong.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    assert run(promtool, "test", "rules", str(path)).returncode != 0
