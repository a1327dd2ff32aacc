"""Pieces every target shares: options, names, labels, the three ConfigMaps, volumes and mounts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import Plan, check_process_count
from optimenv.spec import (
    POLICIES,
    SPEC_PATH,
    Policy,
    build_spec,
    content_hash,
    deepspeed_text,
    spec_text,
)

TARGETS = ("rayjob", "pytorchjob", "trainjob", "configmaps")
CONTENT_HASH_ANNOTATION = "optimenv.dev/content-hash"
BOOTSTRAP = ("optimenv-bootstrap", "--spec", SPEC_PATH, "--")
GPU_RESOURCE = "nvidia.com/gpu"
# ValidateConfigMap sums the bytes of data + binaryData values (kubernetes pkg/apis/core).
MAX_CONFIGMAP_BYTES = 1024 * 1024

VOLUME_SPEC = "optimenv-spec"
VOLUME_DEEPSPEED = "optimenv-deepspeed"
VOLUME_SHM = "optimenv-shm"

# Variables the operators or the launchers own; the plan must never carry them.
RENDEZVOUS = frozenset(
    {
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
    }
)
RESERVED_PREFIXES = ("PET_", "OMPI_", "TORCHELASTIC_")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class JobOptions:
    """Everything about the job that is not in the training config.

    ``ray_workers`` is the number of Ray Train workers (the config's ``ray_num_workers``); by
    default one per GPU of the RayJob's worker group.
    """

    name: str
    namespace: str = "default"
    image: str | None = None
    command: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int = 1
    service_account: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    tolerations: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    runtime: str | None = None
    spec_policy: Policy = "plan-wins"
    ray_workers: int | None = None

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so callers may pass dicts and lists.
        if isinstance(self.command, str):
            raise ConfigError(
                "command", "must be a list of arguments, not one string", "split it: ['python', 'x.py']"
            )
        for key in ("node_selector", "labels"):
            if not isinstance(getattr(self, key), Mapping):
                raise ConfigError(
                    key, f"must be a mapping of strings, got {type(getattr(self, key)).__name__}"
                )
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(
            self, "tolerations", tuple(_toleration(i, t) for i, t in enumerate(self.tolerations))
        )
        object.__setattr__(self, "node_selector", _frozen_map(self.node_selector))
        object.__setattr__(self, "labels", _frozen_map(self.labels))
        for key in ("nodes", "gpus_per_node"):
            _positive(key, getattr(self, key))
        if self.ray_workers is not None:
            _positive("ray_workers", self.ray_workers)
        if self.spec_policy not in POLICIES:
            raise ConfigError(
                "spec_policy", f"must be one of {', '.join(POLICIES)}, got {self.spec_policy!r}"
            )
        if not isinstance(self.namespace, str) or not _is_label(self.namespace, _DNS1123_LABEL):
            raise ConfigError(
                "namespace",
                f"{self.namespace!r} is not a DNS-1123 label",
                "lowercase letters, digits and '-', at most 63 characters",
            )
        if self.image is not None and (not self.image or self.image != self.image.strip()):
            raise ConfigError("image", f"{self.image!r} is not an image reference")
        if self.service_account is not None and not _is_subdomain(self.service_account):
            raise ConfigError("service_account", f"{self.service_account!r} is not a DNS-1123 subdomain")
        if not all(isinstance(arg, str) for arg in self.command):
            raise ConfigError("command", "every argument must be a string")
        for key, value in self.node_selector.items():
            _check_label("node_selector", key, value)
        for key, value in self.labels.items():
            _check_label("labels", key, value)
        if self.runtime is not None and not _is_subdomain(self.runtime):
            raise ConfigError("runtime", f"{self.runtime!r} is not a ClusterTrainingRuntime name")


_TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})


def _toleration(index: int, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"tolerations[{index}]", f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in _TOLERATION_KEYS)
    if unknown:
        raise ConfigError(
            f"tolerations[{index}]",
            f"unknown field(s) {', '.join(unknown)}",
            f"use {', '.join(sorted(_TOLERATION_KEYS))}",
        )
    return _frozen_map(value)


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a whole number >= 1, got {value!r}")


def _is_label(value: str, pattern: re.Pattern[str]) -> bool:
    return len(value) <= 63 and bool(pattern.match(value))


def _is_subdomain(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.match(value))


def _check_label(where: str, key: Any, value: Any) -> None:
    if not isinstance(key, str) or not isinstance(value, str):
        raise ConfigError(f"{where}", f"keys and values must be strings, got {key!r}: {value!r}")
    prefix, _, name = key.rpartition("/")
    if (prefix and not _is_subdomain(prefix)) or len(name) > 63 or not _LABEL_NAME.match(name):
        raise ConfigError(
            f"{where}.{key}", "is not a valid label key", "[prefix/]name, name at most 63 of [-A-Za-z0-9_.]"
        )
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ConfigError(
            f"{where}.{key}", f"{value!r} is not a valid label value", "at most 63 of [-A-Za-z0-9_.]"
        )


def object_name(options: JobOptions, suffix: str) -> str:
    """The name of a rendered object: ``<name>-<suffix>`` (``env``, ``spec``, ``deepspeed``)."""
    return f"{options.name}-{suffix}"


def check_name(target: str, options: JobOptions, limit: int, why: str) -> None:
    """Job targets need a DNS-1035 label (starts with a letter); ``configmaps`` a DNS-1123 label."""
    name = options.name
    dns1035 = target != "configmaps"
    pattern = _DNS1035_LABEL if dns1035 else _DNS1123_LABEL
    kind = "DNS-1035" if dns1035 else "DNS-1123"
    if not isinstance(name, str) or not pattern.match(name):
        start = "start with a lowercase letter, " if dns1035 else ""
        raise ConfigError(
            "name",
            f"{name!r} is not a {kind} label",
            f"{start}use lowercase letters, digits and '-', end with a letter or digit",
        )
    if len(name) > limit:
        raise ConfigError(
            "name",
            f"{name!r} is {len(name)} characters; a {target} name may have at most {limit} ({why})",
            "choose a shorter --name",
        )


def labels(options: JobOptions, component: str) -> dict[str, str]:
    ours = {
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": options.name,
        "app.kubernetes.io/managed-by": "optimenv",
        "app.kubernetes.io/part-of": "optimenv",
    }
    return dict(sorted({**ours, **options.labels}.items()))


def metadata(
    options: JobOptions, name: str, component: str, annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": options.namespace,
        "labels": labels(options, component),
    }
    if annotations:
        meta["annotations"] = dict(sorted(annotations.items()))
    return meta


def check_plan_env(plan: Plan) -> None:
    """The plan carries Accelerate's variables only; rendezvous belongs to the operators."""
    for var in plan.env:
        if var.name in RENDEZVOUS or var.name.startswith(RESERVED_PREFIXES):
            raise OptimEnvError(
                f"plan: {var.name} is a rendezvous variable the operator or launcher sets; "
                "it must not be planned"
            )
        if not _CONFIGMAP_KEY.match(var.name):
            raise OptimEnvError(f"plan: {var.name!r} cannot be a ConfigMap key or an environment variable")


def check_parallelism(plan: Plan, world: int, what: str) -> None:
    """The parallel sizes must fit the processes the job starts, as for known hardware (C28, C29)."""
    check_process_count(plan, world, what)


@dataclass(frozen=True)
class ConfigMaps:
    """The rendered ConfigMaps and what pods need to consume them."""

    objects: tuple[dict[str, Any], ...]
    env_name: str
    spec_name: str
    deepspeed_name: str | None
    deepspeed_path: str | None
    planned: tuple[str, ...]
    combined_hash: str


def configmaps(plan: Plan, options: JobOptions) -> ConfigMaps:
    check_plan_env(plan)
    ds_path = plan.deepspeed_path
    if ds_path is not None and (
        ds_path.endswith("/")
        or ds_path in (SPEC_PATH, "/dev/shm")
        or SPEC_PATH.startswith(ds_path + "/")
        or ds_path.startswith((SPEC_PATH + "/", "/dev/shm/"))
    ):
        # Both files are mounted one by one (subPath): neither may sit inside the other, nor in
        # the memory-backed /dev/shm volume.
        raise ConfigError(
            "deepspeed_path",
            f"{ds_path!r} collides with the spec file {SPEC_PATH} or /dev/shm",
            "give a file path such as /etc/optimenv/deepspeed.json",
        )
    objects: list[dict[str, Any]] = []
    env_data = {v.name: v.value for v in sorted(plan.env, key=lambda v: v.name)}
    objects.append(_configmap(options, "env", env_data))
    ds_name = None
    if plan.deepspeed is not None:
        ds_name = object_name(options, "deepspeed")
        objects.append(_configmap(options, "deepspeed", {"deepspeed.json": deepspeed_text(plan.deepspeed)}))
    spec = build_spec(plan, policy=options.spec_policy)
    objects.append(_configmap(options, "spec", {"spec.json": spec_text(spec)}))
    hashes = {o["metadata"]["name"]: o["metadata"]["annotations"][CONTENT_HASH_ANNOTATION] for o in objects}
    return ConfigMaps(
        objects=tuple(objects),
        env_name=object_name(options, "env"),
        spec_name=object_name(options, "spec"),
        deepspeed_name=ds_name,
        deepspeed_path=plan.deepspeed_path if ds_name else None,
        planned=tuple(env_data),
        combined_hash=content_hash(hashes),
    )


def _configmap(options: JobOptions, suffix: str, data: dict[str, str]) -> dict[str, Any]:
    name = object_name(options, suffix)
    size = sum(len(value.encode("utf-8")) for value in data.values())
    if size > MAX_CONFIGMAP_BYTES:
        raise ConfigError(
            f"configmap {name}",
            f"data is {size} bytes, over the ConfigMap limit of 1 MiB ({MAX_CONFIGMAP_BYTES} bytes)",
            "shrink the DeepSpeed JSON; keep datasets and large files out of the config",
        )
    # Not immutable: names are stable, so a changed config updates them in place and the
    # hash annotation on the pod templates rolls the pods.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(options, name, "config", {CONTENT_HASH_ANNOTATION: content_hash(data)}),
        "data": data,
    }


def volumes(cms: ConfigMaps, *, shm: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": VOLUME_SPEC, "configMap": {"name": cms.spec_name}}]
    if cms.deepspeed_name:
        out.append({"name": VOLUME_DEEPSPEED, "configMap": {"name": cms.deepspeed_name}})
    if shm:
        # NCCL needs more than the runtime's 64 MiB /dev/shm; the Kubeflow operators add none.
        out.append({"name": VOLUME_SHM, "emptyDir": {"medium": "Memory"}})
    return out


def volume_mounts(cms: ConfigMaps, *, shm: bool) -> list[dict[str, Any]]:
    # Single files by subPath: mounting a directory would hide what the image has there.
    out: list[dict[str, Any]] = [
        {"name": VOLUME_SPEC, "mountPath": SPEC_PATH, "subPath": "spec.json", "readOnly": True}
    ]
    if cms.deepspeed_name and cms.deepspeed_path:
        out.append(
            {
                "name": VOLUME_DEEPSPEED,
                "mountPath": cms.deepspeed_path,
                "subPath": "deepspeed.json",
                "readOnly": True,
            }
        )
    if shm:
        out.append({"name": VOLUME_SHM, "mountPath": "/dev/shm"})
    return out


def pod_spec_extras(options: JobOptions) -> dict[str, Any]:
    """Service account, node selector and tolerations, passed through as given."""
    extra: dict[str, Any] = {}
    if options.service_account:
        extra["serviceAccountName"] = options.service_account
    if options.node_selector:
        extra["nodeSelector"] = dict(sorted(options.node_selector.items()))
    if options.tolerations:
        extra["tolerations"] = [dict(t) for t in options.tolerations]
    return extra


def pod_metadata(options: JobOptions, cms: ConfigMaps, component: str) -> dict[str, Any]:
    return {
        "labels": labels(options, component),
        "annotations": {CONTENT_HASH_ANNOTATION: cms.combined_hash},
    }


def gpu_resources(gpus: int) -> dict[str, Any]:
    return {"limits": {GPU_RESOURCE: gpus}}


def require_image(options: JobOptions, target: str) -> str:
    if not options.image:
        raise ConfigError("image", f"is required for the {target} target", "pass --image REGISTRY/IMAGE:TAG")
    return options.image


_LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "mpirun", "mpiexec", "ray")


def require_command(options: JobOptions, target: str) -> tuple[str, ...]:
    command = options.command
    if not command or not command[0]:
        raise ConfigError(
            "command",
            f"the training command is required for the {target} target",
            "add it after --, e.g. -- python train.py",
        )
    first = command[0].rsplit("/", 1)[-1]
    module = command[2] if len(command) > 2 and command[1] == "-m" else ""
    if first in _LAUNCHERS or module.split(".")[0] == "accelerate" or module.startswith("torch.distributed."):
        raise ConfigError(
            "command",
            f"starts with the launcher {command[0]!r}; optimenv adds the launcher for {target} itself",
            "give the per-process command, e.g. -- python train.py",
        )
    return command
