"""The strict validator itself: it must reject what the API server or an operator would reject or prune."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.render.conftest import compiled
from tests.render.validators import CEL_RULES, ManifestError, Validator, strict

Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def jobs() -> dict[str, list[dict[str, Any]]]:
    return {t: compiled("zero3-gpu", t).manifests() for t in ("rayjob", "pytorchjob", "trainjob")}


def _worker(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]  # type: ignore[no-any-return]


def _master(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["pytorchReplicaSpecs"]["Master"]["template"]  # type: ignore[no-any-return]


def _patch(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]  # type: ignore[no-any-return]


CASES: list[tuple[str, str, Mutation, str]] = [
    (
        "rayjob",
        "unknown spec field",
        lambda o: o["spec"].update(entrypointt="x"),
        "'entrypointt' was unexpected",
    ),
    (
        "rayjob",
        "unknown container field",
        lambda o: _worker(o)["template"]["spec"]["containers"][0].update(imagePullPolicyy="x"),
        "'imagePullPolicyy' was unexpected",
    ),
    ("rayjob", "name over 47", lambda o: o["metadata"].update(name="a" * 48), "at most 47"),
    ("rayjob", "replicas outside min/max", lambda o: _worker(o).update(replicas=5), "outside [minReplicas"),
    (
        "rayjob",
        "Ray container without image",
        lambda o: _worker(o)["template"]["spec"]["containers"][0].pop("image"),
        "needs an image",
    ),
    (
        "rayjob",
        "rayStartParams labels",
        lambda o: _worker(o)["rayStartParams"].update(labels="a=b"),
        "rayStartParams.labels",
    ),
    (
        "rayjob",
        "bad managedBy (CEL)",
        lambda o: o["spec"].update(managedBy="me"),
        "CEL rule at /spec/managedBy fails",
    ),
    ("rayjob", "wrong type", lambda o: _worker(o).update(replicas="2"), "is not of type 'integer'"),
    (
        "pytorchjob",
        "container not named pytorch",
        lambda o: _master(o)["spec"]["containers"][0].update(name="torch"),
        "named 'pytorch'",
    ),
    (
        "pytorchjob",
        "unknown template metadata field",
        lambda o: _master(o)["metadata"].update(labelz={}),
        "'labelz' was unexpected",
    ),
    (
        "pytorchjob",
        "unknown env field",
        lambda o: _master(o)["spec"]["containers"][0]["env"].append({"name": "X", "vaue": "1"}),
        "'vaue' was unexpected",
    ),
    (
        "pytorchjob",
        "two masters",
        lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
        "Master.replicas must be 1",
    ),
    (
        "pytorchjob",
        "bad label value",
        lambda o: _master(o)["metadata"]["labels"].update(team="a b"),
        "invalid value",
    ),
    ("pytorchjob", "name not DNS-1035", lambda o: o["metadata"].update(name="1ft"), "DNS-1035"),
    (
        "pytorchjob",
        "bad volume (core schema)",
        lambda o: _master(o)["spec"]["volumes"].append({"name": "v", "emptyDir": {"medium": 3}}),
        "is not of type",
    ),
    (
        "trainjob",
        "name over 63 (CEL)",
        lambda o: o["metadata"].update(name="a" * 64),
        "size(self.metadata.name) <= 63",
    ),
    ("trainjob", "pod names over 63", lambda o: o["metadata"].update(name="a" * 46), "would exceed 63"),
    (
        "trainjob",
        "reserved PET_ env",
        lambda o: o["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "1"}),
        "reserved envs",
    ),
    (
        "trainjob",
        "patching a field runtimePatches lacks",
        lambda o: _patch(o)["template"]["spec"]["template"]["spec"]["containers"][0].update(resources={}),
        "'resources' was unexpected",
    ),
    (
        "trainjob",
        "patching a job the runtime lacks",
        lambda o: _patch(o).update(name="trainer"),
        "has no job 'trainer'",
    ),
    (
        "trainjob",
        "patching a container the runtime lacks",
        lambda o: _patch(o)["template"]["spec"]["template"]["spec"]["containers"][0].update(name="main"),
        "has no container 'main'",
    ),
    (
        "trainjob",
        "env patch on node",
        lambda o: _patch(o)["template"]["spec"]["template"]["spec"]["containers"][0].update(env=[]),
        "env patches of the node container",
    ),
    (
        "trainjob",
        "manager without domain",
        lambda o: o["spec"]["runtimePatches"][0].update(manager="optimenv"),
        "domain-prefixed",
    ),
    (
        "trainjob",
        "numNodes as string",
        lambda o: o["spec"]["trainer"].update(numNodes="2"),
        "is not of type 'integer'",
    ),
]


@pytest.mark.parametrize(("target", "what", "mutate", "message"), CASES, ids=[c[1] for c in CASES])
def test_rejects(
    validator: Validator,
    jobs: dict[str, list[dict[str, Any]]],
    target: str,
    what: str,
    mutate: Mutation,
    message: str,
) -> None:
    obj = copy.deepcopy(jobs[target][-1])
    validator.validate(obj)  # valid before the change
    mutate(obj)
    with pytest.raises(ManifestError, match=None) as info:
        validator.validate(obj)
    assert message in str(info.value), str(info.value)


def test_rejects_configmaps(validator: Validator, jobs: dict[str, list[dict[str, Any]]]) -> None:
    cm = jobs["rayjob"][0]
    for mutate, message in [
        (lambda o: o["data"].update(x=1), "is not of type 'string'"),
        (lambda o: o.update(dataa={}), "'dataa' was unexpected"),
        (lambda o: o["data"].update({"a b": "1"}), "not a valid ConfigMap key"),
        (lambda o: o["data"].update(big="x" * (1024 * 1024)), "over the 1 MiB ConfigMap limit"),
        (lambda o: o["metadata"].update(name="Ft-env"), "not a DNS-1123 subdomain"),
        (lambda o: o["metadata"].update(name="ft-env\n"), "not a DNS-1123 subdomain"),  # "$" took it
        (lambda o: o["metadata"]["labels"].update(team="nlp\n"), "label"),
    ]:
        bad = copy.deepcopy(cm)
        mutate(bad)
        with pytest.raises(ManifestError) as info:
            validator.validate(bad)
        assert message in str(info.value)


def test_strict_schema_rules() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "bare": {"type": "object"},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    out = strict(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["free"]
    assert out["properties"]["bare"]["additionalProperties"] is False  # pruning would empty it
    assert out["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in schema  # the input is not modified


def test_unknown_cel_rules_fail_closed(validator: Validator, jobs: dict[str, list[dict[str, Any]]]) -> None:
    rule = "size(self.metadata.name) <= 63"
    original = CEL_RULES.pop(rule)
    try:
        with pytest.raises(ManifestError, match="is not implemented here"):
            validator.validate(jobs["trainjob"][-1])
    finally:
        CEL_RULES[rule] = original
