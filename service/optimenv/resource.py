"""The ``OptimEnv`` custom resource: its pydantic models and the CRD generated from them.

Pure: no Kubernetes client. The reconciler validates ``spec`` with :func:`parse_spec`; the API server
validates with the structural schema that :func:`crd_manifest` derives from the same models, so the
two cannot drift apart. ``python -m optimenv.resource`` (or ``optimenv crd``) prints the CRD.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimenv.errors import ConfigError
from optimenv.plan import DEFAULT_DEEPSPEED_PATH
from optimenv.validation import parse_model
from optimenv.workload import JobSpec, Topology

GROUP = "optimenv.dev"
VERSION = "v1alpha1"
KIND = "OptimEnv"
PLURAL = "optimenvs"
SINGULAR = "optimenv"
SHORT_NAMES = ("oenv",)
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

_STRICT = ConfigDict(extra="forbid")


class ConfigMapRef(BaseModel):
    """A ConfigMap in the OptimEnv's namespace whose key holds the training config as YAML."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap.")
    key: str = Field("config.yaml", min_length=1, max_length=253, description="Key holding the YAML.")


class OptimEnvSpec(BaseModel):
    """Desired state: a training config (inline or from a ConfigMap), its topology, optionally a job."""

    model_config = _STRICT

    config: dict[str, Any] | None = Field(
        None, description="The Axolotl-style training config, inline. Exactly one of config and configMapRef."
    )
    configMapRef: ConfigMapRef | None = Field(
        None,
        description="A ConfigMap key holding the training config. Exactly one of config and configMapRef.",
    )
    topology: Topology = Field(default_factory=Topology, description="Nodes, GPUs and their capabilities.")
    deepspeedPath: str = Field(
        DEFAULT_DEEPSPEED_PATH,
        pattern=r"^/",
        description="Absolute path where the DeepSpeed JSON is mounted on the workers.",
    )
    policy: Literal["plan-wins", "user-wins"] = Field(
        "plan-wins", description="Whether planned variables override env the user set on the workers."
    )
    job: JobSpec | None = Field(
        None, description="Create and own this training job; leave out for ConfigMaps only."
    )

    @field_validator("topology")
    @classmethod
    def _sized(cls, topology: Topology) -> Topology:
        # The schema has no null sizes (the API server defaults them to 1); "unknown" is for Python.
        if topology.nodes is None or topology.gpus_per_node is None:
            raise ValueError("nodes and gpusPerNode must be whole numbers >= 1 (or left out for 1)")
        return topology

    @model_validator(mode="after")
    def _exactly_one_source(self) -> OptimEnvSpec:
        if (self.config is None) == (self.configMapRef is None):
            raise ValueError("set exactly one of spec.config and spec.configMapRef")
        return self


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(BaseModel):
    """One entry of status.conditions, shaped and validated like metav1.Condition."""

    model_config = _STRICT

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Condition type: Ready or Valid.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observedGeneration: int | None = Field(
        None, ge=0, description="metadata.generation the condition was set for."
    )
    lastTransitionTime: str = Field(
        json_schema_extra={"format": "date-time"}, description="When the status last changed."
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason for the last transition.",
    )
    message: str = Field(max_length=32768, description="Human-readable detail; may be empty.")


class PlanSummary(BaseModel):
    """What the last good reconcile produced."""

    model_config = _STRICT

    target: str | None = Field(None, description="Job target, when a job is owned.")
    envConfigMap: str | None = Field(None, description="ConfigMap with the planned env (for envFrom).")
    specConfigMap: str | None = Field(None, description="ConfigMap with the worker spec JSON.")
    deepspeedConfigMap: str | None = Field(
        None, description="ConfigMap with deepspeed.json, if DeepSpeed is on."
    )
    hash: str | None = Field(None, description="Content hash of the worker spec.")


JobPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Stopped"]


class JobStatus(BaseModel):
    """The owned job's lifecycle, mapped from its operator's own status."""

    model_config = _STRICT

    kind: str = Field(description="RayJob, PyTorchJob or TrainJob.")
    name: str = Field(description="Name of the job (the OptimEnv's).")
    uid: str | None = Field(None, description="uid of the job object this entry describes.")
    phase: JobPhase = Field(description="Pending, Running, Succeeded, Failed or Stopped.")
    reason: str = Field(
        max_length=1024, description="Why: the operator's own state or reason, or JobDeleted."
    )
    message: str = Field("", max_length=4096, description="The operator's message, if any.")
    startTime: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the job started."
    )
    completionTime: str | None = Field(
        None, json_schema_extra={"format": "date-time"}, description="When the job finished."
    )
    observedGeneration: int | None = Field(
        None, ge=0, description="metadata.generation of the OptimEnv when this entry was written."
    )


class OptimEnvStatus(BaseModel):
    """Observed state, written by the controller through the status subresource."""

    model_config = _STRICT

    observedGeneration: int | None = Field(None, ge=0, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready and Valid, with reason, message and observedGeneration.",
    )
    plan: PlanSummary | None = Field(None, description="Summary of the last good plan.")
    job: JobStatus | None = Field(None, description="The owned job's phase, when spec.job is set.")

    def to_patch(self) -> dict[str, Any]:
        """The merge patch that makes the stored status this one: every field, an unset one as null.

        A merge patch merges objects key by key and deletes a key sent as null, so a field left out
        would keep a stale value (a plan's job target after ``spec.job`` was removed). A list is
        stored as sent, nulls included, so the conditions leave their unset fields out.
        """
        patch = self.model_dump(mode="json")
        patch["conditions"] = [c.model_dump(mode="json", exclude_none=True) for c in self.conditions]
        return patch

    def stored(self) -> dict[str, Any]:
        """The status as the API server keeps it after :meth:`to_patch` (no null anywhere)."""
        return self.model_dump(mode="json", exclude_none=True)


def max_length(model: type[BaseModel], field: str) -> int:
    """The ``maxLength`` of a string field of ``model``, as the CRD's schema has it."""
    found: int = next(m.max_length for m in model.model_fields[field].metadata if hasattr(m, "max_length"))
    return found


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying so: a longer status field fails the whole write."""
    if len(text) <= limit:
        return text
    marker = " … (truncated)"
    return text[: limit - len(marker)] + marker


def parse_spec(data: Mapping[str, Any] | None) -> OptimEnvSpec:
    """Validate an object's ``spec``; a :class:`ConfigError` names the field as ``spec.<path>``."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError("spec", f"must be a mapping, got {type(data).__name__}")
    hint = "check its spelling in `kubectl explain optimenv.spec`"
    return parse_model(OptimEnvSpec, dict(data or {}), "spec", hint)


# ---------------------------------------------------------------------------------------------------
# pydantic JSON schema -> Kubernetes structural schema


class UnsupportedSchemaError(TypeError):
    """A model uses a construct a structural schema cannot express (a programming error)."""


_DROP = {"title", "examples"}
_UNSUPPORTED = {"oneOf", "allOf", "not", "prefixItems", "patternProperties", "discriminator", "$defs"}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s validation JSON schema rewritten into an ``openAPIV3Schema`` the API server accepts."""
    raw = model.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _sorted(_rewrite(raw, defs, path=model.__name__))
    return schema


def _sorted(node: Any) -> Any:
    """Keys in alphabetical order at every level (as controller-gen writes them); lists keep theirs."""
    if isinstance(node, dict):
        return {key: _sorted(node[key]) for key in sorted(node)}
    if isinstance(node, list):
        return [_sorted(item) for item in node]
    return node


def _rewrite(node: Mapping[str, Any], defs: Mapping[str, Any], path: str) -> dict[str, Any]:
    node = dict(node)
    nullable = False
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise UnsupportedSchemaError(f"{path}: unions other than X | None are not structural")
        nullable = True
        node = {**branches[0], **node}
    if "$ref" in node:
        # The field's own keys (its description) win over the referenced model's (its docstring).
        node = {**defs[node.pop("$ref").removeprefix("#/$defs/")], **node}
    for key in _UNSUPPORTED & node.keys():
        raise UnsupportedSchemaError(f"{path}: {key} cannot be expressed in a structural schema")
    if node.get("uniqueItems"):
        raise UnsupportedSchemaError(f"{path}: uniqueItems; use x-kubernetes-list-type: set")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default":
            # Only scalar defaults are worth persisting; empty collections and null are implied.
            if value is not None and not isinstance(value, dict | list):
                out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out[key] = {name: _rewrite(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _rewrite(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _rewrite(value, defs, f"{path}.*")
            # False (extra="forbid") is not allowed in a CRD; the API server prunes unknown fields.
        else:
            out[key] = value
    if nullable:
        out["nullable"] = True
    if not out.get("type") and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise UnsupportedSchemaError(f"{path}: no type (Any is only allowed as dict[str, Any])")
    return out


def crd_manifest() -> dict[str, Any]:
    """The ``apiextensions.k8s.io/v1`` CustomResourceDefinition of ``OptimEnv``."""
    spec = structural_schema(OptimEnvSpec)
    # A CEL rule so the API server refuses what parse_spec refuses (GA since Kubernetes 1.29).
    spec["x-kubernetes-validations"] = [
        {
            "rule": "has(self.config) != has(self.configMapRef)",
            "message": "set exactly one of spec.config and spec.configMapRef",
        }
    ]
    status = structural_schema(OptimEnvStatus)
    schema = {
        "description": "OptimEnv plans the Accelerate / DeepSpeed environment of a training config "
        "and keeps its ConfigMaps (and optionally its job) in line with it.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    ready = '.status.conditions[?(@.type=="Ready")]'
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            {"name": "Target", "type": "string", "jsonPath": ".spec.job.target"},
            {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
            {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason", "priority": 1},
            {"name": "Job", "type": "string", "jsonPath": ".status.job.phase"},
            {"name": "Job Reason", "type": "string", "jsonPath": ".status.job.reason", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "schema": {"openAPIV3Schema": schema},
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["ml"],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML committed under ``manifests/crds/`` (deterministic bytes)."""
    return yaml.safe_dump(crd_manifest(), sort_keys=False, width=110, allow_unicode=True)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(crd_yaml())
