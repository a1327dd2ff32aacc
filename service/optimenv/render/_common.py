"""Pieces every target shares: the request, names, labels, the three ConfigMaps, volumes and mounts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optimenv.errors import ConfigError, OptimEnvError, shown
from optimenv.names import DNS1035_LABEL, DNS1123_LABEL
from optimenv.plan import Plan, check_process_count
from optimenv.render._objects import ConfigMap, ObjectMeta, PodMeta
from optimenv.spec import SPEC_PATH, WorkerSpec, content_hash, deepspeed_text, set_by_launcher, spec_text
from optimenv.workload import JobSpec, Launch, Target

CONTENT_HASH_ANNOTATION = "optimenv.dev/content-hash"
BOOTSTRAP = ("optimenv-bootstrap", "--spec", SPEC_PATH, "--")
GPU_RESOURCE = "nvidia.com/gpu"
# ValidateConfigMap sums the bytes of data + binaryData values (kubernetes pkg/apis/core).
MAX_CONFIGMAP_BYTES = 1024 * 1024

VOLUME_SPEC = "optimenv-spec"
VOLUME_DEEPSPEED = "optimenv-deepspeed"
VOLUME_SHM = "optimenv-shm"

#: The ConfigMaps of a job, by the suffix their names get: ``<name>-env``, ``<name>-spec`` ...
CONFIGMAP_SUFFIXES = ("env", "spec", "deepspeed")

_CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")


@dataclass(frozen=True)
class Request:
    """What the renderers take besides the plan, each piece already checked and derived once.

    ``labels`` go on every object (the job's own and the caller's, merged); ``job`` is ``None`` for
    the ConfigMaps alone; ``launch`` is the job's size (``None``: unknown, ConfigMaps only).
    """

    target: Target
    name: str
    namespace: str
    labels: Mapping[str, str]
    job: JobSpec | None
    launch: Launch | None
    spec: WorkerSpec


def object_name(name: str, suffix: str) -> str:
    """The name of a rendered ConfigMap: ``<name>-<suffix>`` (``env``, ``spec``, ``deepspeed``)."""
    return f"{name}-{suffix}"


def check_name(target: Target, name: Any, limit: int, why: str) -> None:
    """Job targets need a DNS-1035 label (starts with a letter); ``configmaps`` a DNS-1123 label."""
    dns1035 = target != "configmaps"
    pattern = DNS1035_LABEL if dns1035 else DNS1123_LABEL
    kind = "DNS-1035" if dns1035 else "DNS-1123"
    if not isinstance(name, str) or not pattern.fullmatch(name):
        start = "start with a lowercase letter, " if dns1035 else ""
        raise ConfigError(
            "name",
            f"{shown(name)} is not a {kind} label",
            f"{start}use lowercase letters, digits and '-', end with a letter or digit",
        )
    if len(name) > limit:
        raise ConfigError(
            "name",
            f"{shown(name)} is {len(name)} characters; a {target} name may have at most {limit} ({why})",
            "choose a shorter --name",
        )


def labels(request: Request, component: str) -> dict[str, str]:
    ours = {
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": request.name,
        "app.kubernetes.io/managed-by": "optimenv",
        "app.kubernetes.io/part-of": "optimenv",
    }
    return dict(sorted({**ours, **request.labels}.items()))


def metadata(
    request: Request, name: str, component: str, annotations: Mapping[str, str] | None = None
) -> ObjectMeta:
    meta: ObjectMeta = {
        "name": name,
        "namespace": request.namespace,
        "labels": labels(request, component),
    }
    if annotations:
        meta["annotations"] = dict(sorted(annotations.items()))
    return meta


def check_plan_env(plan: Plan) -> None:
    """The plan carries Accelerate's variables only; rendezvous belongs to the operators."""
    for var in plan.env:
        if set_by_launcher(var.name):
            raise OptimEnvError(
                f"plan: {var.name} is a rendezvous variable the operator or launcher sets; "
                "it must not be planned"
            )
        if not _CONFIGMAP_KEY.fullmatch(var.name):
            raise OptimEnvError(
                f"plan: {shown(var.name)} cannot be a ConfigMap key or an environment variable"
            )


def check_parallelism(plan: Plan, world: int, what: str) -> None:
    """The parallel sizes must fit the processes the job starts, as for known hardware (C28, C29)."""
    check_process_count(plan, world, what)


@dataclass(frozen=True)
class ConfigMaps:
    """The rendered ConfigMaps and what pods need to consume them."""

    objects: tuple[ConfigMap, ...]
    env_name: str
    spec_name: str
    deepspeed_name: str | None
    deepspeed_path: str | None
    planned: tuple[str, ...]
    combined_hash: str


def configmaps(plan: Plan, request: Request) -> ConfigMaps:
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
            f"{shown(ds_path)} collides with the spec file {SPEC_PATH} or /dev/shm",
            "give a file path such as /etc/optimenv/deepspeed.json",
        )
    env_data = {v.name: v.value for v in sorted(plan.env, key=lambda v: v.name)}
    objects = [_configmap(request, "env", env_data)]
    ds_name = None
    if plan.deepspeed is not None:
        ds_name = object_name(request.name, "deepspeed")
        objects.append(_configmap(request, "deepspeed", {"deepspeed.json": deepspeed_text(plan.deepspeed)}))
    objects.append(_configmap(request, "spec", {"spec.json": spec_text(request.spec)}))
    hashes = {o["metadata"]["name"]: o["metadata"]["annotations"][CONTENT_HASH_ANNOTATION] for o in objects}
    return ConfigMaps(
        objects=tuple(objects),
        env_name=object_name(request.name, "env"),
        spec_name=object_name(request.name, "spec"),
        deepspeed_name=ds_name,
        deepspeed_path=plan.deepspeed_path if ds_name else None,
        planned=tuple(env_data),
        combined_hash=content_hash(hashes),
    )


def _configmap(request: Request, suffix: str, data: dict[str, str]) -> ConfigMap:
    name = object_name(request.name, suffix)
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
        "metadata": metadata(request, name, "config", {CONTENT_HASH_ANNOTATION: content_hash(data)}),
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


def pod_spec_extras(job: JobSpec) -> dict[str, Any]:
    """Service account, node selector and tolerations, passed through as given."""
    extra: dict[str, Any] = {}
    if job.service_account:
        extra["serviceAccountName"] = job.service_account
    if job.node_selector:
        extra["nodeSelector"] = dict(sorted(job.node_selector.items()))
    if job.tolerations:
        extra["tolerations"] = [dict(t) for t in job.tolerations]
    return extra


def pod_metadata(request: Request, cms: ConfigMaps, component: str) -> PodMeta:
    return {
        "labels": labels(request, component),
        "annotations": {CONTENT_HASH_ANNOTATION: cms.combined_hash},
    }


def gpu_resources(gpus: int) -> dict[str, Any]:
    return {"limits": {GPU_RESOURCE: gpus}}


def require_job(request: Request, target: Target) -> JobSpec:
    """The job to render; a job target without a :class:`JobSpec` has no image to run."""
    if request.job is None:
        raise ConfigError("image", f"is required for the {target} target", "pass --image REGISTRY/IMAGE:TAG")
    return request.job


def job_size(request: Request) -> Launch:
    """The size of a job target: always known (:meth:`Topology.launch` takes 1 for an unknown size)."""
    if request.launch is None:
        raise ValueError(f"{request.target}: rendered without a size; use optimenv.compile()")
    return request.launch


_LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "mpirun", "mpiexec", "ray")


def require_command(job: JobSpec, target: Target) -> tuple[str, ...]:
    command = tuple(job.command)
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
            f"starts with the launcher {shown(command[0])}; optimenv adds the launcher for {target} itself",
            "give the per-process command, e.g. -- python train.py",
        )
    return command
