"""The rendered manifests of deploy/: every kustomization, rendered once by ``kubectl
kustomize``, as lists of objects; and the custom resources' schemas from their CRDs."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
CRD_ENV = "SERESNET_CRD_SCHEMAS"
#: The oldest and newest Kubernetes the manifests are for (docs/scaling.md).
KUBERNETES_VERSIONS = ("1.30", "1.37")

Obj = dict[str, Any]


def kustomizations() -> list[Path]:
    """Every folder under deploy/ (each must be a kustomization)."""
    return sorted(p for p in DEPLOY.rglob("*") if p.is_dir())


@functools.cache
def render(folder: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (it renders deploy/ with `kubectl kustomize`): install it")
    run = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"kubectl kustomize {folder}:\n{run.stderr}"
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def rendered() -> dict[str, list[Obj]]:
    return {str(p.relative_to(DEPLOY)): render(p) for p in kustomizations()}


def all_objects() -> list[tuple[str, Obj]]:
    return [(where, obj) for where, objs in rendered().items() for obj in objs]


def of_kind(kind: str) -> list[tuple[str, Obj]]:
    return [(w, o) for w, o in all_objects() if o["kind"] == kind]


def crd_dir() -> Path:
    where = os.environ.get(CRD_ENV)
    if not where:
        pytest.skip(
            f"{CRD_ENV} is not set: point it at a folder of CustomResourceDefinition YAML files "
            "for KEDA ScaledObject, Prometheus Operator ServiceMonitor and PrometheusRule, "
            "KServe InferenceService and ServingRuntime (from a cluster that has them: "
            "`kubectl get crd NAME -o yaml > NAME.yaml`, e.g. scaledobjects.keda.sh)"
        )
    return Path(where)


@functools.cache
def crd_schemas(folder: Path) -> dict[tuple[str, str], Obj]:
    """``(apiVersion, kind)`` -> the version's openAPIV3Schema, for every CRD in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.y*ml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def strict(schema: Any) -> Any:
    """The schema with unknown fields as errors, as the API server's strict field validation
    treats them: every object with ``properties`` closes, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
