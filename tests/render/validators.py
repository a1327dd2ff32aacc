"""Strict validation of rendered manifests, reusable by any test suite.

* Core kinds (ConfigMap, ...) go through ``kubernetes-validate`` in strict mode for Kubernetes
  1.30 and the newest version it ships.
* Custom kinds (RayJob, PyTorchJob, TrainJob) are checked against the upstream CRD schemas in
  ``shared/crds``. A CRD schema says nothing about unknown fields (the API server prunes them), so
  the schema is made strict first: every object schema that does not say
  ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false`` (an object schema
  listing no properties at all therefore only accepts ``{}``, which is what pruning would leave).
  The CEL rules (``x-kubernetes-validations``) on the fields present are evaluated by Python
  re-implementations; a rule this module does not know fails the check rather than passing it.
* The rules the operators enforce in webhooks and controllers (not in the CRDs) are re-implemented
  per kind, and the pod templates embedded in RayJob/PyTorchJob go through ``kubernetes-validate``
  as ``PodTemplate`` objects too.

Usage::

    from tests.render.validators import Validator
    Validator(shared_path).validate(obj)      # raises ManifestError with a one-line reason
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))

CRDS: dict[tuple[str, str], tuple[str, str]] = {
    ("ray.io/v1", "RayJob"): ("kuberay-v1.7.0_rayjob_ray.io-v1.crd.yaml", "v1"),
    ("ray.io/v1", "RayCluster"): ("kuberay-v1.7.0_raycluster_ray.io-v1.crd.yaml", "v1"),
    ("kubeflow.org/v1", "PyTorchJob"): (
        "kubeflow-training-operator-v1.9.4_pytorchjob_kubeflow.org-v1.crd.yaml",
        "v1",
    ),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): (
        "kubeflow-trainer-v2.3.0_trainjob_trainer.kubeflow.org-v1alpha1.crd.yaml",
        "v1alpha1",
    ),
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): (
        "kubeflow-trainer-v2.3.0_clustertrainingruntime_trainer.kubeflow.org-v1alpha1.crd.yaml",
        "v1alpha1",
    ),
}
RUNTIME_EXAMPLES = {
    "torch-distributed": "kubeflow-trainer-v2.3.0_clustertrainingruntime-torch-distributed_"
    "trainer.kubeflow.org-v1alpha1.example.yaml",
    "deepspeed-distributed": "kubeflow-trainer-v2.3.0_clustertrainingruntime-deepspeed-distributed_"
    "trainer.kubeflow.org-v1alpha1.example.yaml",
}
TRAINER_RESERVED_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
)
MAX_CONFIGMAP_BYTES = 1024 * 1024
MAX_ANNOTATIONS_BYTES = 256 * 1024

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
OBJECT_META_KEYS = frozenset(
    {"name", "generateName", "namespace", "labels", "annotations", "ownerReferences", "finalizers"}
)


class ManifestError(AssertionError):
    """A rendered object the API server or the operator would reject (or silently prune)."""


# ---- CEL rules found on the fields of the pinned CRDs, as Python --------------------------------
def _has(value: Any, key: str) -> bool:
    return isinstance(value, dict) and key in value


CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": lambda s: bool(
        DNS1035_LABEL.fullmatch(s["metadata"]["name"])
    ),
    "size(self.metadata.name) <= 63": lambda s: len(s["metadata"]["name"]) <= 63,
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')": lambda s: (
        s == "" or bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", s))
    ),
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']": lambda s: (
        s in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
    ),
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']": lambda s: (
        s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
    ),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))": lambda s: (
        not ((_has(s, "onSuccess") or _has(s, "onFailure")) and _has(s, "deletionRules"))
    ),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))": lambda s: (
        (_has(s, "onSuccess") and _has(s, "onFailure")) or _has(s, "deletionRules")
    ),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))": lambda s: (
        not (_has(s, "jobStatus") and _has(s, "jobDeploymentStatus"))
    ),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": lambda s: (
        _has(s, "jobStatus") or _has(s, "jobDeploymentStatus")
    ),
    "has(self.lastUpdatedTime)": lambda s: _has(s, "lastUpdatedTime"),
}


def strict(schema: Any) -> Any:
    """A copy of a CRD schema in which unknown fields are errors (see the module docstring)."""
    node = copy.deepcopy(schema)
    _strict(node)
    return node


def _strict(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _strict(item)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            for sub in value.values():
                _strict(sub)
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            _strict(value)
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and not preserve and "additionalProperties" not in node:
        if node.get("x-kubernetes-embedded-resource"):
            node.setdefault("properties", {})
            for key in ("apiVersion", "kind"):
                node["properties"].setdefault(key, {"type": "string"})
            node["properties"].setdefault("metadata", {"type": "object"})
        node["additionalProperties"] = False


class Validator:
    """Validates rendered objects; CRD schemas are loaded once per ``shared`` directory."""

    def __init__(self, shared: Path) -> None:
        self.crds = Path(shared) / "crds"

    # ---- public -----------------------------------------------------------------------------
    def validate(self, obj: dict[str, Any]) -> None:
        """Raise :class:`ManifestError` unless ``obj`` would be accepted unchanged."""
        if not isinstance(obj, dict):
            raise ManifestError(f"not an object: {obj!r:.80}")
        key = (obj.get("apiVersion"), obj.get("kind"))
        where = f"{key[1]} {obj.get('metadata', {}).get('name')!r}"
        try:
            _roundtrips(obj)
            self._metadata(obj.get("metadata"), top=True)
            if key in CRDS:
                self._custom(obj, *CRDS[key])  # type: ignore[index]
                check = getattr(self, f"_{str(key[1]).lower()}", None)
                if check is not None:
                    check(obj)
            else:
                self._core(obj)
        except ManifestError as exc:
            raise ManifestError(f"{where}: {exc}") from None

    def validate_all(self, objects: list[dict[str, Any]]) -> None:
        names: set[tuple[str, str, str]] = set()
        for obj in objects:
            self.validate(obj)
            ident = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            if ident in names:
                raise ManifestError(f"duplicate object {ident}")
            names.add(ident)

    def runtime(self, name: str) -> dict[str, Any]:
        """A default ClusterTrainingRuntime shipped with Trainer v2.3 (from ``shared/crds/examples``)."""
        return _load_yaml(self.crds / "examples" / RUNTIME_EXAMPLES[name])

    # ---- layers ------------------------------------------------------------------------------
    def _core(self, obj: dict[str, Any]) -> None:
        for version in K8S_VERSIONS:
            errors = sorted(
                _core_validator(version, obj["apiVersion"], obj["kind"]).iter_errors(obj),
                key=lambda e: list(e.absolute_path),
            )
            if errors:
                path = "/".join(str(p) for p in errors[0].absolute_path)
                raise ManifestError(f"Kubernetes {version}: {path or '<root>'}: {errors[0].message:.300}")
        if obj.get("kind") == "ConfigMap":
            data = obj.get("data", {})
            for key in data:
                if not CONFIGMAP_KEY.fullmatch(key) or len(key) > 253:
                    raise ManifestError(f"data key {key!r} is not a valid ConfigMap key")
            size = sum(len(v.encode("utf-8")) for v in data.values())
            if size > MAX_CONFIGMAP_BYTES:
                raise ManifestError(f"data is {size} bytes, over the 1 MiB ConfigMap limit")

    def _custom(self, obj: dict[str, Any], filename: str, version: str) -> None:
        schema = _crd_schema(self.crds / filename, version)
        body = {k: v for k, v in obj.items() if k != "metadata"}
        errors = sorted(
            _body_validator(self.crds / filename, version).iter_errors(body),
            key=lambda e: list(e.absolute_path),
        )
        if errors:
            first = errors[0]
            path = "/".join(str(p) for p in first.absolute_path)
            raise ManifestError(f"CRD schema: {path or '<root>'}: {first.message:.300}")
        for rule_path, rule, target in _cel_targets(schema, obj, ""):
            fn = CEL_RULES.get(rule)
            if fn is None:
                raise ManifestError(f"CEL rule at {rule_path or '<root>'} is not implemented here: {rule}")
            if not fn(target):
                raise ManifestError(f"CEL rule at {rule_path or '<root>'} fails: {rule}")

    def _metadata(self, meta: Any, *, top: bool) -> None:
        if not isinstance(meta, dict):
            raise ManifestError("metadata must be an object")
        unknown = set(meta) - OBJECT_META_KEYS
        if unknown:
            raise ManifestError(f"metadata has unknown fields {sorted(unknown)}")
        if top:
            name = meta.get("name")
            if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
                raise ManifestError(f"metadata.name {name!r} is not a DNS-1123 subdomain")
            ns = meta.get("namespace")
            if ns is not None and (len(ns) > 63 or not DNS1123_LABEL.fullmatch(ns)):
                raise ManifestError(f"metadata.namespace {ns!r} is not a DNS-1123 label")
        for key, value in meta.get("labels", {}).items():
            prefix, _, label = key.rpartition("/")
            if (
                (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)))
                or len(label) > 63
                or not LABEL_NAME.fullmatch(label)
            ):
                raise ManifestError(f"label key {key!r} is invalid")
            if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
                raise ManifestError(f"label {key}={value!r}: invalid value")
        annotations = meta.get("annotations", {})
        if sum(len(k) + len(v) for k, v in annotations.items()) > MAX_ANNOTATIONS_BYTES:
            raise ManifestError("annotations exceed 256 KiB")

    def _pod_template(self, template: dict[str, Any], where: str) -> None:
        self._metadata(template.get("metadata", {}), top=False)
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            self._core(wrapped)
        except ManifestError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        for container in template["spec"].get("containers", []):
            for env in container.get("env", []):
                if not ENV_NAME.fullmatch(env["name"]):
                    raise ManifestError(f"{where}: env name {env['name']!r} is invalid")

    # ---- operator rules (webhooks / controllers, not in the CRDs) -----------------------------
    def _rayjob(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if len(name) > 47 or not DNS1035_LABEL.fullmatch(name):
            raise ManifestError("KubeRay: a RayJob name must be a DNS-1035 label of at most 47 characters")
        cluster = obj["spec"]["rayClusterSpec"]
        groups = [("head", cluster["headGroupSpec"])] + [
            (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs", []))
        ]
        for where, group in groups:
            containers = group["template"]["spec"].get("containers", [])
            if not containers or not containers[0].get("image"):
                raise ManifestError(f"KubeRay: {where}: the Ray container (containers[0]) needs an image")
            if "labels" in group.get("rayStartParams", {}):
                raise ManifestError(f"KubeRay: {where}: rayStartParams.labels is rejected")
            self._pod_template(group["template"], where)
        for group in cluster.get("workerGroupSpecs", []):
            if not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
                raise ManifestError("KubeRay: replicas outside [minReplicas, maxReplicas]")
        if obj["spec"].get("ttlSecondsAfterFinished") and not obj["spec"].get("shutdownAfterJobFinishes"):
            raise ManifestError("KubeRay: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")

    def _pytorchjob(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if not DNS1035_LABEL.fullmatch(name):
            raise ManifestError("PyTorchJob webhook: the name must be a DNS-1035 label")
        specs = obj["spec"]["pytorchReplicaSpecs"]
        if set(specs) - {"Master", "Worker"}:
            raise ManifestError(
                f"PyTorchJob webhook: unknown replica types {sorted(set(specs) - {'Master', 'Worker'})}"
            )
        if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
            raise ManifestError("PyTorchJob webhook: Master.replicas must be 1")
        if "Worker" in specs and specs["Worker"].get("replicas", 1) < 1:
            raise ManifestError("PyTorchJob webhook: Worker.replicas must be >= 1")
        for role, spec in specs.items():
            containers = spec["template"]["spec"]["containers"]
            pytorch = [c for c in containers if c.get("name") == "pytorch"]
            if not pytorch or not pytorch[0].get("image"):
                raise ManifestError(
                    f"PyTorchJob webhook: {role} needs a container named 'pytorch' with an image"
                )
            last = spec.get("replicas", 1) - 1
            pod = f"{name}-{role.lower()}-{last}"
            if len(pod) > 63:
                raise ManifestError(f"PyTorchJob: pod and Service name {pod!r} exceeds 63 characters")
            self._pod_template(spec["template"], role)

    def _trainjob(self, obj: dict[str, Any]) -> None:
        spec = obj["spec"]
        trainer = spec.get("trainer", {})
        for env in trainer.get("env", []):
            if env["name"] in TRAINER_RESERVED_ENV or env["name"].startswith("OMPI_MCA_"):
                raise ManifestError(
                    f"Trainer webhook: trainer.env must not have reserved envs ({env['name']})"
                )
        runtime_name = spec["runtimeRef"]["name"]
        runtime = self.runtime(runtime_name) if runtime_name in RUNTIME_EXAMPLES else None
        num_nodes = trainer.get("numNodes", 1)
        jobs = {"node": num_nodes}
        if runtime is not None and "mpi" in runtime["spec"]["mlPolicy"]:
            jobs = {"node": max(num_nodes - 1, 1), "launcher": 1}
        for job, pods in jobs.items():
            pod = f"{obj['metadata']['name']}-{job}-0-{pods - 1}-xxxxx"
            if len(pod) > 63:
                raise ManifestError(f"JobSet: pod name {pod!r} would exceed 63 characters")
        for patch in spec.get("runtimePatches", []):
            prefix, slash, _ = patch["manager"].partition("/")
            if not slash or not DNS1123_SUBDOMAIN.fullmatch(prefix) or "." not in prefix:
                raise ManifestError(
                    f"Trainer: runtimePatches manager {patch['manager']!r} must be domain-prefixed"
                )
            replicated = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
            for job in replicated.get("replicatedJobs", []):
                pod_spec = job.get("template", {}).get("spec", {}).get("template", {})
                self._metadata(pod_spec.get("metadata", {}), top=False)
                for container in pod_spec.get("spec", {}).get("containers", []):
                    if (
                        container["name"] == "node"
                        and job["name"] in ("node", "launcher")
                        and "env" in container
                    ):
                        raise ManifestError(
                            "Trainer: env patches of the node container are rejected; use trainer.env"
                        )
                if runtime is not None:
                    self._matches_runtime(runtime, job, pod_spec)

    def _matches_runtime(self, runtime: dict[str, Any], job: dict[str, Any], pod: dict[str, Any]) -> None:
        """A patch must name a replicated job and containers the runtime has, or it patches nothing."""
        jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        if job["name"] not in jobs:
            raise ManifestError(
                f"runtimePatches: runtime {runtime['metadata']['name']} has no job {job['name']!r}"
            )
        target = jobs[job["name"]]["template"]["spec"]["template"]["spec"]
        names = {c["name"] for c in target["containers"]}
        for container in pod.get("spec", {}).get("containers", []):
            if container["name"] not in names:
                raise ManifestError(
                    f"runtimePatches: job {job['name']!r} has no container {container['name']!r}"
                )
        runtime_volumes = {v["name"] for v in target.get("volumes", [])}
        for volume in pod.get("spec", {}).get("volumes", []):
            if volume["name"] in runtime_volumes:
                raise ManifestError(f"runtimePatches: volume {volume['name']!r} clashes with the runtime's")


# ---- helpers ---------------------------------------------------------------------------------
def _roundtrips(obj: Any) -> None:
    """Only JSON types: what kubectl would send is what we checked."""
    try:
        if json.loads(json.dumps(obj, allow_nan=False)) != obj:
            raise ManifestError("does not survive a JSON round trip")
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"not plain JSON: {exc}") from None


@functools.cache
def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def _crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = _load_yaml(path)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return strict(entry["schema"]["openAPIV3Schema"])  # type: ignore[no-any-return]
    raise ManifestError(f"{path.name} has no version {version}")


@functools.cache
def _core_validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema for ``kind``, as its ``validate()`` builds it, built once.

    (``kubernetes_validate.validate`` re-reads the JSON schema files on every call: too slow for
    the property tests.)
    """
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    schema_version = [v for v in utils.all_versions() if utils.major_minor(v) <= version][-1]
    folder = f"kubernetes-json-schema/v{schema_version}-local-strict"
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{folder}/{kind.lower()}-{api}.json", version)
    except FileNotFoundError:
        raise ManifestError(f"Kubernetes {version}: no schema for {api_version} {kind}") from None
    definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _body_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    """The strict schema without ``metadata`` (a bare object there; ``_metadata`` checks it)."""
    schema = _crd_schema(path, version)
    props = {k: v for k, v in schema["properties"].items() if k != "metadata"}
    return jsonschema.Draft7Validator({**schema, "properties": props})


def _cel_targets(schema: dict[str, Any], value: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(path, rule, self) for every CEL rule on a present value; transition rules (oldSelf) skipped."""
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"]:
            yield path, rule["rule"], value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            if sub_schema is not None:
                yield from _cel_targets(sub_schema, sub, f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _cel_targets(schema["items"], item, f"{path}/{i}")
