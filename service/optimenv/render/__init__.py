"""Renderers: a Plan into Kubernetes objects (RayJob, PyTorchJob, TrainJob, ConfigMaps).

Pure and deterministic: the same plan and options give the same objects, key order included.
No Kubernetes client is imported; the caller applies the objects (``kubectl apply --server-side``
or the controller).
"""

from __future__ import annotations

from typing import Any

from optimenv.errors import ConfigError
from optimenv.plan import Plan
from optimenv.render._common import (
    CONTENT_HASH_ANNOTATION,
    TARGETS,
    JobOptions,
    check_name,
    configmaps,
    object_name,
)
from optimenv.render._targets import pytorchjob, rayjob, trainjob

__all__ = ["CONTENT_HASH_ANNOTATION", "TARGETS", "JobOptions", "object_name", "render"]

_JOBS = {"rayjob": rayjob, "pytorchjob": pytorchjob, "trainjob": trainjob}


def render(plan: Plan, target: str, options: JobOptions) -> list[dict[str, Any]]:
    """The objects to apply for ``target``: the ConfigMaps first, then the job (if any)."""
    if target not in TARGETS:
        raise ConfigError("target", f"unknown target {target!r}", f"choose one of {', '.join(TARGETS)}")
    if target == "configmaps":
        # Longest object name is <name>-deepspeed; the name is also a label value (<= 63).
        check_name(target, options, 63, "it is also the app.kubernetes.io/instance label")
        return list(configmaps(plan, options).objects)
    job = _JOBS[target]
    cms = configmaps(plan, options)
    return [*cms.objects, job(plan, options, cms)]
