"""Renderers: a Plan into Kubernetes objects (RayJob, PyTorchJob, TrainJob, ConfigMaps).

Pure and deterministic: the same plan and request give the same objects, key order included.
No Kubernetes client is imported; the caller applies the objects (``kubectl apply --server-side``
or the controller). :func:`optimenv.compile` is the way in: it checks the request and derives the
plan, the spec and the sizes once; :func:`render` is the step it ends with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from optimenv.plan import Plan
from optimenv.render._common import (
    CONFIGMAP_SUFFIXES,
    CONTENT_HASH_ANNOTATION,
    ConfigMaps,
    Request,
    check_name,
    configmaps,
    object_name,
)
from optimenv.render._objects import ConfigMap, JobObject, KubeObject, ObjectMeta
from optimenv.render._targets import pytorchjob, rayjob, trainjob
from optimenv.render._yaml import to_json, to_yaml
from optimenv.workload import JobTarget

__all__ = [
    "CONFIGMAP_SUFFIXES",
    "CONTENT_HASH_ANNOTATION",
    "ConfigMap",
    "JobObject",
    "KubeObject",
    "ObjectMeta",
    "Rendered",
    "Request",
    "object_name",
    "render",
    "to_json",
    "to_yaml",
]

_JOBS: Mapping[JobTarget, Callable[[Plan, Request, ConfigMaps], JobObject]] = {
    "rayjob": rayjob,
    "pytorchjob": pytorchjob,
    "trainjob": trainjob,
}


@dataclass(frozen=True)
class Rendered:
    """The objects to apply, ConfigMaps first, and the ConfigMaps among them (their names)."""

    objects: tuple[KubeObject, ...]
    configmaps: ConfigMaps


def render(plan: Plan, request: Request) -> Rendered:
    """The objects to apply for ``request.target``: the ConfigMaps first, then the job (if any)."""
    if request.target == "configmaps":
        # Longest object name is <name>-deepspeed; the name is also a label value (<= 63).
        check_name("configmaps", request.name, 63, "it is also the app.kubernetes.io/instance label")
        cms = configmaps(plan, request)
        objects: Sequence[KubeObject] = cms.objects
    else:
        cms = configmaps(plan, request)
        objects = [*cms.objects, _JOBS[request.target](plan, request, cms)]
    return Rendered(tuple(objects), cms)
