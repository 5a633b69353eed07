"""deploy/ checked short of a cluster: every kustomization renders; every core object validates
strictly (unknown fields are errors; warnings too) against the oldest and newest Kubernetes
supported; every custom resource against its CRD's schema; and the project's own rules, read
from the project's code: settings, metric names, routes, shutdown timing, shared memory."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deployutil import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    REPO_ROOT,
    Obj,
    all_objects,
    crd_dir,
    crd_schemas,
    kustomizations,
    of_kind,
    render,
    strict,
)

from client.__main__ import build_parser
from service.ingress.routes import v2
from service.settings import Settings, env_name

CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "serving.kserve.io/")
SETTINGS = {env_name(name) for name in Settings.model_fields}
# The largest common model input, 3x224x224 float32: shm must hold its slots whatever the model.
LARGEST_INPUT_BYTES = 3 * 224 * 224 * 4
QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}


def is_custom(obj: Obj) -> bool:
    return obj["apiVersion"].startswith(CUSTOM_GROUPS)


def name_of(where: str, obj: Obj) -> str:
    return f"{where}: {obj['kind']}/{obj['metadata']['name']}"


def quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", str(text)).groups()  # type: ignore[union-attr]
    return int(number) * QUANTITY[unit or ""]


def service_metric_names() -> set[str]:
    """Every metric family the service defines (service/metrics.py), with the suffixes
    Prometheus adds to counters and histograms."""
    tree = ast.parse((REPO_ROOT / "service" / "metrics.py").read_text())
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
            "Counter",
            "Gauge",
            "Histogram",
        ):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Name):  # the metric's name is one of the module's constants
                first = ast.Constant(constants.get(first.id))
            if isinstance(first, ast.Constant) and str(first.value).startswith("seresnet_"):
                base = str(first.value)
                suffixes = {
                    "Counter": ("_total", "_created"),
                    "Histogram": ("_bucket", "_sum", "_count", "_created"),
                    "Gauge": (),
                }[node.func.id]  # type: ignore[attr-defined]
                names |= {base, *(base + s for s in suffixes)}
    assert "seresnet_admitted_images" in names
    return names


def pod_specs() -> list[tuple[str, Obj, Obj]]:
    """(where, owner, pod spec) of every Deployment and Job."""
    out = []
    for where, obj in all_objects():
        if obj["kind"] in ("Deployment", "Job"):
            out.append((where, obj, obj["spec"]["template"]["spec"]))
    return out


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def serving_containers() -> list[tuple[str, Obj, Obj, Obj]]:
    """(where, pod-level spec, container, env) of every container that runs the service: the
    Deployments' and the ServingRuntime's (whose pod-level fields live on the InferenceService)."""
    out = []
    for where, owner, spec in pod_specs():
        if owner["kind"] == "Deployment":
            c = spec["containers"][0]
            out.append((where, spec, c, env_of(c)))
    for where, runtime in of_kind("ServingRuntime"):
        isvcs = [o for w, o in of_kind("InferenceService") if w == where]
        assert isvcs, f"{where}: a ServingRuntime without its InferenceService"
        predictor = isvcs[0]["spec"]["predictor"]
        c = runtime["spec"]["containers"][0]
        spec = {**predictor, "volumes": runtime["spec"].get("volumes", [])}
        out.append((where, spec, c, env_of(c)))
    assert len(out) >= 4
    return out


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_folder_is_a_kustomization_that_renders(folder: Path) -> None:
    assert (folder / "kustomization.yaml").is_file(), f"{folder} has no kustomization.yaml"
    objects = render(folder)
    assert objects, f"{folder} renders nothing"
    for obj in objects:
        assert obj["metadata"].get("name"), obj


def test_the_expected_folders_exist() -> None:
    names = {str(p.relative_to(DEPLOY)) for p in kustomizations()}
    expected = {"kubernetes", "kubernetes/base", "kubernetes/cpu", "kubernetes/keda"}
    assert expected | {"kubernetes/hpa", "kubernetes/batch", "kserve"} <= names


# ------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_strictly(version: str) -> None:
    checked = 0
    for where, obj in all_objects():
        if is_custom(obj):
            continue
        with warnings.catch_warnings():
            # kubernetes-validate only warns on removed APIs and unknown kinds: fail on them.
            warnings.simplefilter("error")
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name_of(where, obj)} on Kubernetes {version}: {e}")
        checked += 1
    kinds = {o["kind"] for _, o in all_objects()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Ingress"} <= kinds
    assert {"HorizontalPodAutoscaler", "Job", "ConfigMap", "Namespace"} <= kinds
    assert checked >= 10


def test_custom_resources_validate_strictly_against_their_crds() -> None:
    schemas = crd_schemas(crd_dir())
    seen = set()
    for where, obj in all_objects():
        if not is_custom(obj):
            continue
        key = (obj["apiVersion"], obj["kind"])
        assert key in schemas, f"{name_of(where, obj)}: no CRD in the schema folder for {key}"
        validator = jsonschema.Draft7Validator(strict(schemas[key]))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name_of(where, obj)}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
        seen.add(obj["kind"])
    expected = {"ScaledObject", "ServiceMonitor", "PrometheusRule", "InferenceService"}
    assert expected | {"ServingRuntime"} <= seen


def test_the_strict_schema_rejects_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is an error."""
    schemas = crd_schemas(crd_dir())
    _, obj = of_kind("ScaledObject")[0]
    bad = {**obj, "spec": {**obj["spec"], "minReplicas": 2}}
    validator = jsonschema.Draft7Validator(strict(schemas[(obj["apiVersion"], obj["kind"])]))
    assert any("minReplicas" in e.message for e in validator.iter_errors(bad))


# ------------------------------------------------------------------------------ project rules


def test_every_seresnet_variable_is_a_setting() -> None:
    for where, obj in all_objects():
        text = repr(obj)
        for var in set(re.findall(r"SERESNET_[A-Z0-9_]+", text)):
            assert var in SETTINGS, f"{name_of(where, obj)} sets {var}, which is no setting"


def queries() -> list[tuple[str, str]]:
    """Every PromQL expression of deploy/: rules, KEDA and KServe triggers, adapter rules."""
    out = []
    for where, obj in all_objects():
        kind = obj["kind"]
        if kind == "PrometheusRule":
            for group in obj["spec"]["groups"]:
                out += [(where, rule["expr"]) for rule in group["rules"]]
        elif kind == "ScaledObject":
            out += [(where, t["metadata"]["query"]) for t in obj["spec"]["triggers"]]
        elif kind == "InferenceService":
            for m in obj["spec"]["predictor"]["autoScaling"]["metrics"]:
                out.append((where, m["external"]["metric"]["query"]))
        elif kind == "ConfigMap" and "config.yaml" in obj.get("data", {}):
            for rule in yaml.safe_load(obj["data"]["config.yaml"])["rules"]:
                out += [(where, rule["seriesQuery"]), (where, rule["metricsQuery"])]
    assert len(out) >= 6
    return out


def recorded() -> set[str]:
    return {
        rule["record"]
        for _, obj in of_kind("PrometheusRule")
        for group in obj["spec"]["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def test_every_metric_in_a_query_exists() -> None:
    metrics = service_metric_names()
    rules = recorded()
    for where, query in queries():
        bare = re.sub(r"\{[^}]*\}", "", query)  # label matchers hold names, not metrics
        for name in re.findall(r"[a-z_:]*seresnet[a-z_:]*", bare):
            if ":" in name:
                assert name in rules, f"{where}: {query!r} reads {name}, recorded by no rule"
            else:
                assert name in metrics, f"{where}: {query!r} reads {name}, no service metric"
    scaling = [q for _, q in queries() if "admitted_images" in q]
    assert len(scaling) >= 3  # KEDA, adapter, KServe


def test_probes_point_at_the_health_routes() -> None:
    routes = {route.path for route in v2.router.routes}  # type: ignore[attr-defined]
    assert {"/v2/health/ready", "/v2/health/live"} <= routes
    for where, _spec, c, _env in serving_containers():
        ports = {p.get("name") for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
        for probe, path in (
            ("startupProbe", "/v2/health/ready"),
            ("readinessProbe", "/v2/health/ready"),
            ("livenessProbe", "/v2/health/live"),
        ):
            assert probe in c, f"{where}: {probe} missing"
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["path"] in routes, f"{where}: {probe} {get}"
            assert get["port"] in ports, f"{where}: {probe} on port {get['port']} not served"


def _setting(env: dict[str, str], name: str) -> Any:
    field = Settings.model_fields[name]
    return type(field.default)(env.get(env_name(name), field.default))


def test_the_grace_period_covers_delay_and_drain() -> None:
    for where, spec, c, env in serving_containers():
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        delay = _setting(env, "shutdown_delay_s")
        drain = _setting(env, "drain_timeout_s")
        assert pre_stop + delay >= 5, f"{where}: no time for balancers to drop a leaving pod"
        needed = pre_stop + delay + drain + 5  # + the engine's own stop
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > needed, f"{where}: grace {grace}s <= preStop+delay+drain+5 = {needed}s"


def test_shared_memory_covers_the_slots() -> None:
    for where, spec, c, env in serving_containers():
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/dev/shm" in mounts, f"{where}: no /dev/shm"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"])
        assert volume["emptyDir"]["medium"] == "Memory"
        slots = _setting(env, "max_queue_size") + _setting(env, "max_batch_size")
        need = 2 * slots * LARGEST_INPUT_BYTES  # the service wants twice the slots free
        assert quantity(volume["emptyDir"]["sizeLimit"]) >= need, f"{where}: shm < {need} B"
        memory = c["resources"]["limits"]["memory"]
        assert quantity(memory) > quantity(volume["emptyDir"]["sizeLimit"]), where


def test_gpu_pods_are_guaranteed_one_gpu_non_root_read_only_and_spread() -> None:
    for where, spec, c, _env in serving_containers():
        res = c["resources"]
        assert res["requests"] == res["limits"], f"{where}: requests != limits"
        gpus = res["limits"].get("nvidia.com/gpu")
        assert gpus == ("1" if "cpu" not in where else None), f"{where}: GPUs {gpus}"
        pod_sc = spec.get("securityContext", {})
        sc = c.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot"), where
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert spec.get("topologySpreadConstraints"), f"{where}: no topology spread"


def test_rolling_updates_surge_one_and_never_go_below_the_count() -> None:
    deployments = of_kind("Deployment")
    assert deployments
    for where, d in deployments:
        rolling = d["spec"]["strategy"]["rollingUpdate"]
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0), where
    for where, pdb in of_kind("PodDisruptionBudget"):
        assert pdb["spec"]["maxUnavailable"] == 1, where


def test_autoscalers_keep_two_gpu_pods_scale_up_fast_and_down_slowly() -> None:
    behaviours = []
    for where, so in of_kind("ScaledObject"):
        assert so["spec"]["minReplicaCount"] == 2, where
        behaviours.append(so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    for where, hpa in of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] == 2, where
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "seresnet_admitted_images"
        behaviours.append(hpa["spec"]["behavior"])
    for where, isvc in of_kind("InferenceService"):
        predictor = isvc["spec"]["predictor"]
        assert predictor["minReplicas"] == 2, where
        annotations = isvc["metadata"]["annotations"]
        assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
        assert annotations["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
        behaviours.append(predictor["autoScaling"]["behavior"])
    assert len(behaviours) >= 3
    for b in behaviours:
        assert b["scaleUp"]["stabilizationWindowSeconds"] == 0
        assert b["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_the_queue_alert_fires_before_the_queue_is_full() -> None:
    sizes = {_setting(env, "max_queue_size") for *_, env in serving_containers()}
    for _, rule in of_kind("PrometheusRule"):
        alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
        expr = alerts["SeresnetQueueNearlyFull"]["expr"]
        fraction, size = re.search(r">\s*([\d.]+)\s*\*\s*(\d+)", expr).groups()  # type: ignore[union-attr]
        assert {int(size)} == sizes and float(fraction) < 1


def test_the_cpu_overlay_has_no_gpu() -> None:
    objects = render(DEPLOY / "kubernetes" / "cpu")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    text = repr(deployment)
    assert "nvidia.com/gpu" not in text
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["SERESNET_PROVIDER"] == "cpu"
    assert container["image"].endswith(":cpu")


def test_the_indexed_job_scores_its_shard_with_resume() -> None:
    ((_, job),) = of_kind("Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    c = spec["template"]["spec"]["containers"][0]
    args = c["args"]
    shard = args[args.index("--shard") + 1]
    assert shard == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}"
    assert "--resume" in args and "$(JOB_COMPLETION_INDEX)" in args[args.index("--out") + 1]
    env = {e["name"]: e for e in c["env"]}
    ref = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "job-completion-index" in ref
    # The arguments are the real client's.
    parsed = build_parser().parse_args([*args[: -0 or None]])
    assert parsed.resume and parsed.shard == shard


def test_the_kserve_runtime_serves_the_inferenceservice_name_over_v2_on_8080() -> None:
    ((_, runtime),) = of_kind("ServingRuntime")
    ((_, isvc),) = of_kind("InferenceService")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = spec["containers"]
    env = env_of(container)
    # KServe substitutes {{.Name}} with the InferenceService's name, the one in its URLs.
    assert env["SERESNET_MODEL_NAME"] == "{{.Name}}"
    assert env["SERESNET_PORT"] == "8080" and container["ports"][0]["containerPort"] == 8080
    # gRPC beside it; Knative takes one container port, so an InferenceService picks it.
    assert env["SERESNET_GRPC_PORT"] == "9000"
    assert env["SERESNET_MODEL_DIR"] == "/mnt/models"  # where the storage initializer writes
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8080"
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    pdbs = [o for w, o in of_kind("PodDisruptionBudget") if w == "kserve"]
    name = isvc["metadata"]["name"]
    assert pdbs[0]["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": name
    }
