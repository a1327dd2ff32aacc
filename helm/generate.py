"""Generated parts of the optimenv chart, from one source of truth each.

* ``optimenv/values.schema.json`` from the ``HelmValues`` model below (Helm checks it on install,
  upgrade, lint and template).
* ``optimenv/files/crds/optimenv.dev_optimenvs.yaml``, a copy of ``manifests/crds/`` (Helm cannot
  read files outside the chart).
* ``manifests/rbac/{namespaced,cluster-wide}.yaml``: the controller's ServiceAccount and RBAC as the
  chart renders them (release ``optimenv`` in ``optimenv-system``), for installs without Helm and
  for review. Needs helm-python-sdk (requirements-test.txt).

Run ``python helm/generate.py`` after changing either; ``--check`` exits 1 on drift (the chart tests
do the same).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

HERE = Path(__file__).resolve().parent
CHART = HERE / "optimenv"
SCHEMA_FILE = CHART / "values.schema.json"
CRD_SOURCE = HERE.parent / "manifests" / "crds" / "optimenv.dev_optimenvs.yaml"
CRD_COPY = CHART / "files" / "crds" / CRD_SOURCE.name
RBAC_DIR = HERE.parent / "manifests" / "rbac"
RBAC_MODES: dict[str, dict[str, Any]] = {
    "namespaced.yaml": {"watch": {"allNamespaces": False}},
    "cluster-wide.yaml": {"watch": {"allNamespaces": True}},
}
_RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")

Namespace = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
_CLOSED = ConfigDict(extra="forbid")
JobKind = Literal["rayjob", "pytorchjob", "trainjob"]
JOB_KINDS: tuple[JobKind, ...] = ("rayjob", "pytorchjob", "trainjob")


class Image(BaseModel):
    model_config = _CLOSED
    repository: str = Field("ghcr.io/optimenv/optimenv-controller", min_length=1)
    tag: str = Field("", description="Defaults to the chart's appVersion.")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class PullSecret(BaseModel):
    model_config = _CLOSED
    name: str = Field(min_length=1)


class Crds(BaseModel):
    model_config = _CLOSED
    enabled: bool = Field(True, description="Install the OptimEnv CRD with the chart.")
    keep: bool = Field(True, description="Keep the CRD (and so every OptimEnv) on helm uninstall.")


class Watch(BaseModel):
    model_config = _CLOSED
    allNamespaces: bool = Field(False, description="Watch every namespace (ClusterRole) instead of a list.")
    namespaces: list[Namespace] = Field(
        default_factory=list,
        description="Namespaces to watch (a Role in each); empty means the release namespace.",
    )


class Jobs(BaseModel):
    model_config = _CLOSED
    enabled: bool = Field(
        True, description="Grant access to the job kinds and watch them, for OptimEnvs with spec.job."
    )
    targets: list[JobKind] = Field(
        default_factory=lambda: list(JOB_KINDS),
        min_length=1,
        description="Job kinds to grant and watch (--job-kind); one without its CRD is skipped.",
    )


class ServiceAccount(BaseModel):
    model_config = _CLOSED
    create: bool = True
    name: str = Field("", description="Defaults to the release's full name.")
    annotations: dict[str, str] = Field(default_factory=dict)


class Rbac(BaseModel):
    model_config = _CLOSED
    create: bool = Field(True, description="Create the controller's (Cluster)Role and binding.")
    aggregateToDefaultRoles: bool = Field(
        True, description="Let the built-in edit/view roles manage/read OptimEnvs."
    )


class Controller(BaseModel):
    model_config = _CLOSED
    verbose: bool = Field(False, description="Debug logs (always JSON, one object per line).")
    extraArgs: list[str] = Field(default_factory=list)


class MetricsService(BaseModel):
    model_config = _CLOSED
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(9090, ge=1, le=65535)
    annotations: dict[str, str] = Field(default_factory=dict)


class Metrics(BaseModel):
    model_config = _CLOSED
    enabled: bool = Field(True, description="Serve Prometheus metrics and create the metrics Service.")
    port: int = Field(9090, ge=1024, le=65535)
    service: MetricsService = Field(default_factory=MetricsService)


class Health(BaseModel):
    model_config = _CLOSED
    port: int = Field(8080, ge=1024, le=65535, description="kopf's liveness endpoint (/healthz).")


class Probe(BaseModel):
    model_config = _CLOSED
    initialDelaySeconds: int = Field(5, ge=0)
    periodSeconds: int = Field(10, ge=1)
    timeoutSeconds: int = Field(5, ge=1)
    failureThreshold: int = Field(3, ge=1)


class PodSecurity(BaseModel):
    model_config = _CLOSED
    runAsUser: int = Field(10001, ge=1, description="Non-root UID; the image's user is 10001.")
    runAsGroup: int = Field(10001, ge=1)
    fsGroup: int = Field(10001, ge=1)


def _default_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


class HelmValues(BaseModel):
    """values.yaml of the optimenv chart; every key is listed here and nowhere else."""

    model_config = _CLOSED
    nameOverride: str = ""
    fullnameOverride: str = ""
    replicaCount: int = Field(
        1, ge=1, le=1, description="kopf runs standalone (no peering): exactly one replica."
    )
    image: Image = Field(default_factory=Image)
    imagePullSecrets: list[PullSecret] = Field(default_factory=list)
    crds: Crds = Field(default_factory=Crds)
    watch: Watch = Field(default_factory=Watch)
    jobs: Jobs = Field(default_factory=Jobs)
    serviceAccount: ServiceAccount = Field(default_factory=ServiceAccount)
    rbac: Rbac = Field(default_factory=Rbac)
    controller: Controller = Field(default_factory=Controller)
    metrics: Metrics = Field(default_factory=Metrics)
    health: Health = Field(default_factory=Health)
    livenessProbe: Probe = Field(default_factory=lambda: Probe(initialDelaySeconds=10, failureThreshold=6))
    readinessProbe: Probe = Field(default_factory=Probe)
    podSecurityContext: PodSecurity = Field(default_factory=PodSecurity)
    resources: dict[str, Any] = Field(default_factory=_default_resources)
    env: list[dict[str, Any]] = Field(default_factory=list, description="Extra container env.")
    podAnnotations: dict[str, str] = Field(default_factory=dict)
    podLabels: dict[str, str] = Field(default_factory=dict)
    priorityClassName: str = ""
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)


def values_schema() -> dict[str, Any]:
    """Draft-07 JSON schema of the values: refs inlined, closed objects, no defaults or titles."""
    raw = HelmValues.model_json_schema()
    defs = raw.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            node = {
                **defs[node["$ref"].removeprefix("#/$defs/")],
                **{k: v for k, v in node.items() if k != "$ref"},
            }
        return {k: inline(v) for k, v in node.items() if k not in ("title", "default")}

    return {"$schema": "http://json-schema.org/draft-07/schema#", **inline(raw)}


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


def rbac_text(values: dict[str, Any]) -> str:
    """The chart's ServiceAccount and controller RBAC for ``values``, without Helm's own labels."""
    import helm_python
    import yaml

    rendered = helm_python.Chart.load(CHART).render(
        {**values, "rbac": {"aggregateToDefaultRoles": False}}, name="optimenv", namespace="optimenv-system"
    )
    docs = []
    for path in sorted(rendered):
        for doc in yaml.safe_load_all(rendered[path]) if path.endswith(".yaml") else ():
            if doc and doc["kind"] in _RBAC_KINDS:
                for label in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
                    doc["metadata"]["labels"].pop(label)
                docs.append(doc)
    docs.sort(key=lambda d: _RBAC_KINDS.index(d["kind"]))
    header = "# Generated by helm/generate.py from helm/optimenv (release optimenv in optimenv-system).\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def expected_files() -> dict[Path, str]:
    files = {SCHEMA_FILE: schema_text(), CRD_COPY: CRD_SOURCE.read_text()}
    files |= {RBAC_DIR / name: rbac_text(values) for name, values in RBAC_MODES.items()}
    return files


def main(argv: list[str]) -> int:
    expected = expected_files()
    stale = [path for path, text in expected.items() if not path.is_file() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(
                f"{path.relative_to(HERE.parent)} is out of date; run python helm/generate.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(expected[path])
        print(f"wrote {path.relative_to(HERE.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
