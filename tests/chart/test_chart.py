"""The optimenv Helm chart, rendered and linted by the real Helm engine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from optimenv.resource import crd_manifest

from .conftest import RELEASE_NAMESPACE, Render

KUBE_VERSIONS = ["1.30", kubernetes_validate.latest_version()]

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced-list": {"watch": {"namespaces": ["team-a", "team-b"]}, "jobs": {"targets": ["rayjob"]}},
    "cluster-wide": {"watch": {"allNamespaces": True}},
    "crds-disabled-jobs-off": {"crds": {"enabled": False}, "jobs": {"enabled": False}},
    "crds-not-kept-no-metrics": {"crds": {"keep": False}, "metrics": {"enabled": False}},
    "bring-your-own-account": {
        "serviceAccount": {"create": False, "name": "platform-controller"},
        "rbac": {"create": False, "aggregateToDefaultRoles": False},
    },
    "everything-set": {
        "fullnameOverride": "oenv",
        "image": {"repository": "registry.example/optimenv", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "watch": {"allNamespaces": True},
        "jobs": {"targets": ["pytorchjob", "trainjob"]},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "controller": {"verbose": True, "extraArgs": ["--job-kind=rayjob"]},
        "metrics": {"port": 9100, "service": {"type": "NodePort", "port": 9101, "annotations": {"a": "b"}}},
        "health": {"port": 8081},
        "podSecurityContext": {"runAsUser": 2000, "runAsGroup": 2000, "fsGroup": 2000},
        "resources": {"requests": {"cpu": "50m"}},
        "env": [{"name": "OPTIMENV_EXTRA", "value": "1"}],
        "podAnnotations": {"prometheus.io/scrape": "true"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "arch", "operator": "In", "values": ["amd64"]}]}
                    ]
                }
            }
        },
    },
}

ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
CONTROLLER_RULES = [
    {"apiGroups": ["optimenv.dev"], "resources": ["optimenvs"], "verbs": ["list", "watch"]},
    {"apiGroups": ["optimenv.dev"], "resources": ["optimenvs/status"], "verbs": ["patch"]},
    {"apiGroups": ["optimenv.dev"], "resources": ["optimenvs/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
JOB_RULES = {
    "rayjob": {"apiGroups": ["ray.io"], "resources": ["rayjobs"]},
    "pytorchjob": {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"]},
    "trainjob": {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"]},
}
JOB_VERBS = ["get", "list", "watch", "create", "patch"]


def _expected_rules(targets: list[str]) -> list[dict[str, Any]]:
    return CONTROLLER_RULES + [
        {**JOB_RULES[t], "verbs": JOB_VERBS} for t in ("rayjob", "pytorchjob", "trainjob") if t in targets
    ]


def _kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = _kinds(objects, kind)
    return found


# --- generated files and lint ---------------------------------------------------------------------


def test_generated_files_are_up_to_date(generator: ModuleType) -> None:
    for path, text in generator.expected_files().items():
        assert path.read_text() == text, f"{path} is out of date; run `python helm/generate.py`"
    assert generator.main(["--check"]) == 0


def test_values_yaml_is_the_models_defaults(chart_dir: Path, generator: ModuleType) -> None:
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    assert values == generator.HelmValues().model_dump()
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)


def test_every_value_is_documented(chart_dir: Path) -> None:
    lines = (chart_dir / "values.yaml").read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^ *[a-zA-Z]+:", line)]
    assert len(keys) > 50
    for i in keys:
        # A "# --" comment above the key, or above its first child for a group of settings.
        above = lines[i - 1].strip().startswith("#")
        group = i + 1 < len(lines) and lines[i + 1].strip().startswith("# --")
        in_documented_group = lines[i].startswith(" ") and _parent_documented(lines, i)
        assert above or group or in_documented_group, f"undocumented value: {lines[i].strip()}"


def _parent_documented(lines: list[str], i: int) -> bool:
    """Whether some enclosing key of line ``i`` has a comment right above it."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        line = lines[j]
        if not line.strip() or line.lstrip().startswith(("#", "-")):
            continue
        if len(line) - len(line.lstrip()) < indent:
            if j > 0 and lines[j - 1].strip().startswith("#"):
                return True
            indent = len(line) - len(line.lstrip())
    return False


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_lint_is_clean(chart_dir: Path, case: str, kube_version: str) -> None:
    result = helm.lint(chart_dir, VALUE_SETS[case], strict=True, kube_version=f"v{kube_version}.0")
    assert result["errors"] == []
    # Severity 1 is INFO; the only one is Helm's suggestion of an icon URL, which the chart has not.
    assert [m for m in result["messages"] if (m["severity"], m["error"]) != (1, "icon is recommended")] == []


# --- every object valid ---------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid(render: Render, case: str, kube_version: str) -> None:
    objects = render(VALUE_SETS[case])
    assert _kinds(objects, "Deployment")
    for obj in objects:
        kubernetes_validate.validate(obj, kube_version, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert obj["metadata"]["namespace"], obj["metadata"]


def test_default_release_objects(render: Render) -> None:
    kinds = sorted(o["kind"] for o in render())
    controller = [
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    ]
    users = ["ClusterRole", "ClusterRole"]  # the aggregated edit and view roles
    assert kinds == sorted(controller + users)


# --- the Deployment -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_restricted_pod_security_profile(render: Render, case: str) -> None:
    deployment = _one(render(VALUE_SETS[case]), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    uid = VALUE_SETS[case].get("podSecurityContext", {}).get("runAsUser", 10001)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert forbidden not in pod
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert all("hostPath" not in v for v in pod["volumes"])


def test_deployment_defaults(render: Render) -> None:
    deployment = _one(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/optimenv/optimenv-controller:0.1.0"
    assert pod["serviceAccountName"] == "optimenv"
    assert container["args"] == [
        f"--namespace={RELEASE_NAMESPACE}",
        "--job-kind=rayjob",
        "--job-kind=pytorchjob",
        "--job-kind=trainjob",
        "--health-port=8080",
        "--metrics-port=9090",
    ]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8080, "metrics": 9090}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["livenessProbe"]["failureThreshold"] == 6
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "512Mi"},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["PYTHONDONTWRITEBYTECODE"]["value"] == "1"
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "optimenv", "app.kubernetes.io/instance": "optimenv"}
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_non_default_deployment(render: Render) -> None:
    values = VALUE_SETS["everything-set"]
    objects = render(values)
    deployment = _one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "oenv"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/optimenv:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["args"] == [
        "--all-namespaces",
        "--job-kind=pytorchjob",
        "--job-kind=trainjob",
        "--health-port=8081",
        "--metrics-port=9100",
        "--verbose",
        "--job-kind=rayjob",
    ]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8081, "metrics": 9100}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    # Helm merges maps with the defaults.
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "256Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert {"name": "OPTIMENV_EXTRA", "value": "1"} in container["env"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    service = _one(objects, "Service")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9101, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["metadata"]["annotations"] == {"a": "b"}
    account = _one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]


def test_metrics_off_removes_service_port_and_flag(render: Render) -> None:
    objects = render({"metrics": {"enabled": False}})
    assert not _kinds(objects, "Service")
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in container["ports"]] == ["health"]
    # The controller serves metrics unless told 0.
    assert "--metrics-port=0" in container["args"]


def test_metrics_service_selects_the_controller_pod(render: Render) -> None:
    objects = render()
    service, deployment = _one(objects, "Service"), _one(objects, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_rendered_args_are_accepted_by_the_controller_command(render: Render) -> None:
    from optimenv_controller.main import controller_command as command

    # What `optimenv controller` parses from the chart's args:
    # (namespaces, all, job kinds watched, metrics, health).
    all_jobs = ("rayjob", "pytorchjob", "trainjob")
    expected = {
        "default": ((RELEASE_NAMESPACE,), False, all_jobs, 9090, 8080),
        "cluster-wide": ((), True, all_jobs, 9090, 8080),
        "namespaced-list": (("team-a", "team-b"), False, ("rayjob",), 9090, 8080),
        "crds-disabled-jobs-off": ((RELEASE_NAMESPACE,), False, (), 9090, 8080),
        "crds-not-kept-no-metrics": ((RELEASE_NAMESPACE,), False, all_jobs, 0, 8080),
    }
    for case, want in expected.items():
        (container,) = _one(render(VALUE_SETS[case]), "Deployment")["spec"]["template"]["spec"]["containers"]
        params = command.make_context("controller", list(container["args"])).params
        got = (
            params["namespaces"],
            params["all_namespaces"],
            params["job_kinds"],
            params["metrics_port"],
            params["health_port"],
        )
        assert got == want, case


def test_service_account_can_be_supplied(render: Render) -> None:
    objects = render(VALUE_SETS["bring-your-own-account"])
    assert not _kinds(objects, "ServiceAccount")
    assert not [
        o for o in objects if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-controller"


# --- RBAC -----------------------------------------------------------------------------------------


def _all_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for o in objects if o["kind"] in ("Role", "ClusterRole") for rule in o["rules"]]


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_no_wildcards_no_secrets_only_known_verbs(render: Render, case: str) -> None:
    for rule in _all_rules(render(VALUE_SETS[case])):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert not {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule["resources"]), rule
        assert set(rule["verbs"]) <= ALL_VERBS, rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def test_namespaced_mode_grants_a_role_per_watched_namespace(render: Render) -> None:
    objects = render(VALUE_SETS["namespaced-list"])
    roles = _kinds(objects, "Role")
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
    for role in roles:
        assert role["rules"] == _expected_rules(["rayjob"])
    bindings = _kinds(objects, "RoleBinding")
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "optimenv",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "optimenv", "namespace": RELEASE_NAMESPACE}
        ]
    assert not _kinds(objects, "ClusterRoleBinding")
    # The only ClusterRoles are the aggregated ones for users, bound by Kubernetes, not to us.
    assert sorted(c["metadata"]["name"] for c in _kinds(objects, "ClusterRole")) == [
        "optimenv-edit",
        "optimenv-view",
    ]


def test_default_watches_the_release_namespace_only(render: Render) -> None:
    objects = render()
    (role,) = _kinds(objects, "Role")
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert role["rules"] == _expected_rules(["rayjob", "pytorchjob", "trainjob"])


def test_cluster_wide_mode_uses_a_cluster_role(render: Render) -> None:
    objects = render(VALUE_SETS["cluster-wide"])
    assert not _kinds(objects, "Role") and not _kinds(objects, "RoleBinding")
    roles = {c["metadata"]["name"]: c for c in _kinds(objects, "ClusterRole")}
    assert roles["optimenv"]["rules"] == _expected_rules(["rayjob", "pytorchjob", "trainjob"])
    binding = _one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "optimenv",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "optimenv", "namespace": RELEASE_NAMESPACE}
    ]


def test_job_access_follows_the_jobs_values(render: Render) -> None:
    off = render({"jobs": {"enabled": False}})
    assert _one(off, "Role")["rules"] == CONTROLLER_RULES
    some = render({"watch": {"allNamespaces": True}, "jobs": {"targets": ["trainjob", "pytorchjob"]}})
    controller = next(c for c in _kinds(some, "ClusterRole") if c["metadata"]["name"] == "optimenv")
    assert controller["rules"] == _expected_rules(["pytorchjob", "trainjob"])


def test_aggregated_user_roles(render: Render) -> None:
    roles = {c["metadata"]["name"]: c for c in _kinds(render(), "ClusterRole")}
    edit, view = roles["optimenv-edit"], roles["optimenv-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {r["apiGroups"][0] for r in edit["rules"] + view["rules"]} == {"optimenv.dev"}
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in view["rules"])
    # Users never write status: only the controller does.
    assert next(r for r in edit["rules"] if r["resources"] == ["optimenvs/status"])["verbs"] == ["get"]
    assert not _kinds(render({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole")


# --- the CRD --------------------------------------------------------------------------------------


def test_crd_is_the_generated_one_and_kept(render: Render) -> None:
    crd = _one(render(), "CustomResourceDefinition")
    assert crd["spec"] == crd_manifest()["spec"]
    assert crd["metadata"]["name"] == "optimenvs.optimenv.dev"
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_not_kept_or_disabled(render: Render) -> None:
    crd = _one(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]
    assert not _kinds(render({"crds": {"enabled": False}}), "CustomResourceDefinition")


# --- values schema --------------------------------------------------------------------------------

BAD_VALUES = {
    "replicas-zero": ({"replicaCount": 0}, "/replicaCount"),
    "replicas-two": ({"replicaCount": 2}, "/replicaCount"),
    "unknown-key": ({"replicas": 1}, "replicas"),
    "unknown-nested-key": ({"crds": {"install": True}}, "install"),
    "namespace-not-dns": ({"watch": {"namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    "unknown-job-kind": ({"jobs": {"targets": ["mpijob"]}}, "/jobs/targets/0"),
    "no-job-kinds": ({"jobs": {"targets": []}}, "/jobs/targets"),
    "root-uid": ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    "privileged-port": ({"metrics": {"port": 80}}, "/metrics/port"),
    "verbose-not-a-flag": ({"controller": {"verbose": "yes"}}, "/controller/verbose"),
    "port-not-a-number": ({"health": {"port": "8080"}}, "/health/port"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(chart: Any, chart_dir: Path, case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.render(values, name="optimenv", namespace=RELEASE_NAMESPACE)
    errors = helm.lint(chart_dir, values, strict=True)["errors"]
    assert errors and where in errors[0]


# --- NOTES and Dockerfile -------------------------------------------------------------------------


def test_notes_tell_what_is_watched_and_next_steps(render_raw: Any) -> None:
    notes = render_raw({"watch": {"namespaces": ["team-a", "team-b"]}})["optimenv/templates/NOTES.txt"]
    assert "watching team-a, team-b" in notes
    assert "kubectl get optimenvs -A" in notes
    assert "NOTE:" not in notes
    cluster = render_raw({"watch": {"allNamespaces": True}, "crds": {"enabled": False}})
    text = cluster["optimenv/templates/NOTES.txt"]
    assert "watching all namespaces" in text
    assert "kubectl apply --server-side -f manifests/crds/" in text


def test_dockerfile_runs_as_the_charts_user(repo: Path, generator: ModuleType) -> None:
    lines = [line.strip() for line in (repo / "Dockerfile").read_text().splitlines()]
    uid = generator.HelmValues().podSecurityContext.runAsUser
    assert f"USER {uid}:{uid}" in lines
    (entrypoint,) = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT")) == ["optimenv", "controller"]
    assert any(line.startswith("FROM python:3.11-slim") for line in lines)
    assert any("pip install --no-cache-dir" in line and ".[controller]" in line for line in lines)


@pytest.mark.parametrize("name", ["namespaced.yaml", "cluster-wide.yaml"])
def test_plain_rbac_manifests(repo: Path, name: str) -> None:
    docs = list(yaml.safe_load_all((repo / "manifests" / "rbac" / name).read_text()))
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        assert "app.kubernetes.io/managed-by" not in doc["metadata"]["labels"]
    role_kind = "Role" if name == "namespaced.yaml" else "ClusterRole"
    assert [d["kind"] for d in docs] == ["ServiceAccount", role_kind, f"{role_kind}Binding"]
    assert docs[1]["rules"] == _expected_rules(["rayjob", "pytorchjob", "trainjob"])


def test_metrics_and_health_on_one_port_is_refused(render_raw: Any) -> None:
    # Both servers would bind the same port and the controller would crash-loop.
    with pytest.raises(Exception, match=r"metrics.port and health.port must differ"):
        render_raw({"metrics": {"port": 8080}, "health": {"port": 8080}})
    assert render_raw({"metrics": {"enabled": False, "port": 8080}, "health": {"port": 8080}})
