"""The OptimEnv CRD: generated from the models, committed, structural, valid, and strict on objects."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from optimenv.cli import cli
from optimenv.config import parse_config
from optimenv.errors import ConfigError
from optimenv.plan import plan
from optimenv.resource import (
    API_VERSION,
    KIND,
    OptimEnvStatus,
    UnsupportedSchemaError,
    crd_manifest,
    crd_yaml,
    parse_spec,
    structural_schema,
)

from ._strict import strict_validator

CRD_FILE = Path("manifests/crds/optimenv.dev_optimenvs.yaml")
REGENERATE = (
    "run `UPDATE_GOLDEN=1 pytest tests/crd` or "
    "`python -m optimenv.resource > manifests/crds/optimenv.dev_optimenvs.yaml`"
)
KUBE_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
FORBIDDEN_KEYS = {
    "$ref", "$defs", "definitions", "dependencies", "deprecated", "discriminator", "id",
    "patternProperties", "readOnly", "writeOnly", "xml", "const", "title", "examples", "prefixItems",
    "oneOf", "anyOf", "allOf", "not",
}  # fmt: skip


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crd_manifest()


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> Any:
    return strict_validator(crd, "v1alpha1")


def test_committed_crd_matches_the_models(repo: Path) -> None:
    path = repo / CRD_FILE
    expected = crd_yaml()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(expected)
    assert path.is_file(), f"{CRD_FILE} is missing; {REGENERATE}"
    assert path.read_text() == expected, f"{CRD_FILE} is out of date with optimenv.resource; {REGENERATE}"


def test_crd_command_prints_the_committed_crd(repo: Path) -> None:
    result = CliRunner().invoke(cli, ["crd"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (repo / CRD_FILE).read_text()
    assert result.stderr == ""


def _walk(node: dict[str, Any], path: str) -> Any:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = dict(_walk(root, "<root>"))
    assert len(nodes) > 40
    for path, node in nodes.items():
        exempt = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert node.get("type") or exempt, f"{path}: every node needs a type"
        assert not FORBIDDEN_KEYS & node.keys(), f"{path}: {FORBIDDEN_KEYS & node.keys()}"
        assert node.get("additionalProperties") is not False, path
        assert not ("additionalProperties" in node and "properties" in node), path
        assert not node.get("uniqueItems"), path
        if "default" in node:
            assert not isinstance(node["default"], dict | list) and node["default"] is not None, path
    assert nodes["<root>.metadata"] == {"type": "object"}
    assert nodes["<root>.spec.config"]["x-kubernetes-preserve-unknown-fields"] is True
    assert nodes["<root>.spec.config"]["type"] == "object"
    assert nodes["<root>.spec.configMapRef"]["nullable"] is True
    conditions = nodes["<root>.status.conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(nodes["<root>.status.conditions[]"]["required"]) == {
        "type", "status", "reason", "message", "lastTransitionTime"
    }  # fmt: skip
    assert set(nodes["<root>.status.conditions[]"]["properties"]) == {
        "type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"
    }  # fmt: skip
    assert set(nodes["<root>.status.plan"]["properties"]) == {
        "target", "envConfigMap", "specConfigMap", "deepspeedConfigMap", "hash"
    }  # fmt: skip


def test_names_scope_subresource_and_columns(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "optimenvs.optimenv.dev"
    assert spec["group"] == "optimenv.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] | {} == {
        "kind": "OptimEnv", "listKind": "OptimEnvList", "plural": "optimenvs", "singular": "optimenv",
        "shortNames": ["oenv"], "categories": ["ml"],
    }  # fmt: skip
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Target"]["jsonPath"] == ".spec.job.target"
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_crd_is_a_valid_custom_resource_definition(crd: dict[str, Any], kube_version: str) -> None:
    kubernetes_validate.validate(crd, kube_version, strict=True)


def test_strict_validation_catches_what_pruning_would_hide(crd: dict[str, Any]) -> None:
    broken = copy.deepcopy(crd)
    broken["spec"]["versions"][0]["additionalPrinterColumns"][0]["colour"] = "red"
    with pytest.raises(kubernetes_validate.ValidationError, match="colour"):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


FSDP2 = {
    "base_model": "optimenv/tiny-llama",
    "micro_batch_size": 2,
    "bf16": "auto",
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    },
}


def _object(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


GOOD_SPECS = {
    "inline-minimal": {"config": FSDP2},
    "configmap-ref": {"configMapRef": {"name": "train-config"}},
    "full-job": {
        "config": FSDP2,
        "topology": {"nodes": 2, "gpusPerNode": 8, "bf16Supported": True, "fp8Supported": False,
                     "torchVersion": "2.9.0"},
        "deepspeedPath": "/etc/optimenv/deepspeed.json",
        "policy": "user-wins",
        "job": {
            "target": "trainjob",
            "image": "ghcr.io/example/train:1",
            "command": ["python", "train.py"],
            "serviceAccount": "trainer",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "labels": {"team": "ml"},
            "runtime": "deepspeed-distributed",
        },
    },
    "nulls-for-unknowns": {"configMapRef": {"name": "c", "key": "x.yaml"},
                           "topology": {"bf16Supported": None}, "job": None},
}  # fmt: skip

# Refused by the schema (strict) and by parse_spec alike, with the field named.
BAD_SPECS = {
    "unknown-field": ({"config": FSDP2, "topolgy": {}}, "spec.topolgy"),
    "unknown-nested-field": ({"config": FSDP2, "topology": {"gpus": 8}}, "spec.topology.gpus"),
    "zero-nodes": ({"config": FSDP2, "topology": {"nodes": 0}}, "spec.topology.nodes"),
    "bad-target": ({"config": FSDP2, "job": {"target": "mpijob", "image": "i"}}, "spec.job.target"),
    "job-without-image": ({"config": FSDP2, "job": {"target": "rayjob"}}, "spec.job.image"),
    "relative-deepspeed-path": ({"config": FSDP2, "deepspeedPath": "ds.json"}, "spec.deepspeedPath"),
    "bad-policy": ({"config": FSDP2, "policy": "merge"}, "spec.policy"),
    "configmap-without-name": ({"configMapRef": {"key": "a"}}, "spec.configMapRef.name"),
}


@pytest.mark.parametrize("name", sorted(GOOD_SPECS))
def test_good_objects_validate_and_parse(validator: Any, name: str) -> None:
    spec = GOOD_SPECS[name]
    errors = [e.message for e in validator.iter_errors(_object(spec))]
    assert errors == []
    parsed = parse_spec(spec)
    assert (parsed.config is None) != (parsed.configMapRef is None)


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_objects_are_refused_by_schema_and_parser(validator: Any, name: str) -> None:
    spec, field = BAD_SPECS[name]
    assert list(validator.iter_errors(_object(spec))), "the strict schema accepted it"
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    assert str(info.value).startswith(f"{field}: "), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec", [{}, {"config": FSDP2, "configMapRef": {"name": "c"}}], ids=["neither", "both"]
)
def test_exactly_one_config_source(crd: dict[str, Any], spec: dict[str, Any]) -> None:
    # The API server enforces this with the CEL rule; the controller with parse_spec.
    with pytest.raises(ConfigError, match=r"^spec: set exactly one of spec.config and spec.configMapRef$"):
        parse_spec(spec)
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert rules["x-kubernetes-validations"][0]["rule"] == "has(self.config) != has(self.configMapRef)"


@pytest.mark.parametrize("spec", [["config"], "config: {}", 3])
def test_a_spec_that_is_not_a_mapping_is_refused(spec: Any) -> None:
    with pytest.raises(ConfigError, match=r"^spec: must be a mapping, got \w+$"):
        parse_spec(spec)


def test_status_written_by_the_controller_validates(validator: Any) -> None:
    condition = {
        "type": "Ready", "status": "True", "reason": "Reconciled", "message": "",
        "lastTransitionTime": "2026-11-25T21:00:00Z", "observedGeneration": 3,
    }  # fmt: skip
    status = {
        "observedGeneration": 3,
        "conditions": [condition, {**condition, "type": "Valid"}],
        "plan": {"target": "rayjob", "envConfigMap": "llama-env", "specConfigMap": "llama-spec",
                 "deepspeedConfigMap": None, "hash": "sha256:abc"},
    }  # fmt: skip
    assert [e.message for e in validator.iter_errors(_object({"config": FSDP2}, status))] == []
    OptimEnvStatus.model_validate(status)
    for bad in ({"reason": "not camel case"}, {"status": "Yes"}, {"colour": "red"}):
        broken = {**status, "conditions": [{**condition, **bad}]}
        assert list(validator.iter_errors(_object({"config": FSDP2}, broken))), bad


def test_defaults_and_topology_feed_the_planner() -> None:
    spec = parse_spec({"config": FSDP2, "topology": {"nodes": 2, "gpusPerNode": 4, "bf16Supported": True}})
    assert spec.policy == "plan-wins" and spec.job is None
    hardware = spec.topology.hardware()
    assert (hardware.nodes, hardware.gpus_per_node, hardware.bf16_supported) == (2, 4, True)
    assert hardware.world_size == 8
    assert spec.config is not None
    result = plan(parse_config(spec.config), hardware, deepspeed_path=spec.deepspeedPath)
    assert result.env_dict["ACCELERATE_USE_FSDP"] == "true"
    assert result.env_dict["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_default_topology_is_one_gpu() -> None:
    hardware = parse_spec({"configMapRef": {"name": "c"}}).topology.hardware()
    assert (hardware.nodes, hardware.gpus_per_node, hardware.bf16_supported) == (1, 1, None)


def test_unsupported_constructs_fail_at_generation_time() -> None:
    class Union(BaseModel):
        value: int | str

    class Pair(BaseModel):
        value: tuple[int, int]

    class Untyped(BaseModel):
        value: Any

    for model in (Union, Pair, Untyped):
        with pytest.raises(UnsupportedSchemaError, match="value"):
            structural_schema(model)


def test_yaml_round_trips(repo: Path) -> None:
    assert yaml.safe_load((repo / CRD_FILE).read_text()) == crd_manifest()


# --- what the reconciler writes fits this schema --------------------------------------------------

ZERO3 = {"base_model": "meta-llama/Llama-3.2-1B", "micro_batch_size": 8, "bf16": True, "deepspeed": "zero3"}
RECONCILED = {
    "valid-with-job": {
        "config": ZERO3,
        "topology": {"nodes": 2, "gpusPerNode": 8, "bf16Supported": True},
        "job": {
            "target": "pytorchjob",
            "image": "ghcr.io/example/train:1",
            "command": ["python", "train.py"],
        },
    },
    "valid-configmaps-only": {"config": FSDP2},
    "invalid-config": {"config": {**FSDP2, "fsdp_version": 3}},
    "invalid-spec": {"config": FSDP2, "topology": {"nodes": 0}},
    "missing-configmap": {"configMapRef": {"name": "absent"}},
}


@pytest.mark.parametrize("case", sorted(RECONCILED))
def test_status_the_reconciler_writes_validates(validator: Any, case: str) -> None:
    from optimenv_controller import reconcile as rc

    obj = _object(RECONCILED[case])
    obj["metadata"] |= {"uid": "0b7c6f4e-1", "generation": 4}
    want = rc.desired(obj)
    outcome = rc.decide(obj, want, {}, "2026-11-25T21:00:00Z")
    assert outcome.status is not None
    # The status alone is checked (the invalid-spec object would not pass the API server).
    stored = _object({"config": FSDP2}, outcome.status.stored())
    assert [e.message for e in validator.iter_errors(stored)] == []
    status = outcome.status
    assert {c.type for c in status.conditions} == {"Ready", "Valid"}
    assert all(c.observedGeneration == 4 for c in status.conditions)
    valid = next(c for c in status.conditions if c.type == "Valid")
    assert (valid.status == "True") == case.startswith("valid")
    if isinstance(want, rc.Desired):
        for child in want.children:
            (owner,) = child["metadata"]["ownerReferences"]
            assert (owner["apiVersion"], owner["kind"], owner["uid"]) == (API_VERSION, KIND, "0b7c6f4e-1")


def test_the_documented_example_is_valid(repo: Path, validator: Any) -> None:
    from optimenv_controller import reconcile as rc

    text = (repo / "docs" / "controller.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    (example,) = [yaml.safe_load(b) for b in blocks if "kind: OptimEnv" in b]
    assert [e.message for e in validator.iter_errors(example)] == []
    (status,) = [yaml.safe_load(b)["status"] for b in blocks if b.startswith("status:")]
    assert [e.message for e in validator.iter_errors(_object({"config": FSDP2}, status))] == []
    example["metadata"]["uid"] = "u"
    want = rc.desired(example)
    assert isinstance(want, rc.Desired), want
    names = sorted((c["kind"], c["metadata"]["name"]) for c in want.children)
    assert names == [
        ("ConfigMap", "llama-zero3-deepspeed"),
        ("ConfigMap", "llama-zero3-env"),
        ("ConfigMap", "llama-zero3-spec"),
        ("PyTorchJob", "llama-zero3"),
    ]
