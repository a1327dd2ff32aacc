"""``compile(config, topology, target) -> Job``: the one step from a training config to a job.

Every front end is an adapter over it: ``optimenv render`` prints ``Job.objects``, the controller
owns them, ``optimenv run`` launches ``Job.workers`` Ray Train workers with ``Job.spec``, and the
RayJob's ``optimenv ray-launch`` line carries the same spec and worker count. Sizes come from
:meth:`Topology.launch`, names from the renderers, hashes from :mod:`optimenv.spec`: none of the
front ends derives them again.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from optimenv.errors import ConfigError
from optimenv.names import check_labels, check_namespace
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Plan, ProcessCountError, plan
from optimenv.render import KubeObject, Rendered, Request, render, to_json, to_yaml
from optimenv.spec import POLICIES, Policy, WorkerSpec, build_spec, deepspeed_text, spec_text
from optimenv.workload import JobSpec, Launch, Target, Topology, check_target

if TYPE_CHECKING:
    from optimenv.config import TrainingConfig


@dataclass(frozen=True)
class Job:
    """Everything a training job needs, derived once from a config, a topology and a target.

    ``spec`` is the worker spec the bootstrap applies (its ``hash`` identifies the plan);
    ``launch`` the pods, GPUs and processes the job starts (``None``: the ConfigMaps alone, for an
    unknown size); ``objects`` the Kubernetes objects to apply, ConfigMaps first (empty when no name
    was given: a local run needs none).
    """

    target: Target
    topology: Topology
    plan: Plan
    spec: WorkerSpec
    launch: Launch | None
    objects: tuple[KubeObject, ...] = ()
    env_configmap: str | None = None
    spec_configmap: str | None = None
    deepspeed_configmap: str | None = None

    @property
    def hash(self) -> str:
        """The worker spec's content hash (``sha256:...``)."""
        return self.spec["hash"]

    @property
    def workers(self) -> int | None:
        """Training processes in all: the Ray Train workers in Ray mode, else nodes x GPUs per node."""
        return self.launch.processes if self.launch is not None else None

    @property
    def env(self) -> dict[str, str]:
        """The planned variables (the ``<name>-env`` ConfigMap's data)."""
        return self.plan.env_dict

    @property
    def deepspeed_json(self) -> str | None:
        """The DeepSpeed JSON file the workers read at ``plan.deepspeed_path`` (``None``: no DeepSpeed)."""
        return deepspeed_text(self.plan.deepspeed) if self.plan.deepspeed is not None else None

    @property
    def spec_json(self) -> str:
        """The worker spec file as the workers read it."""
        return spec_text(self.spec)

    def manifests(self) -> list[dict[str, Any]]:
        """``objects`` as plain, independent dicts, for a caller that adds to them (the controller)."""
        return [cast(dict[str, Any], copy.deepcopy(obj)) for obj in self.objects]

    def to_yaml(self) -> str:
        return to_yaml(self.objects)

    def to_json(self) -> str:
        return to_json(self.objects)


def compile(  # the public name (optimenv.compile); the builtin is of no use next to it
    config: TrainingConfig,
    topology: Topology,
    target: Target | JobSpec,
    *,
    name: str | None = None,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    policy: Policy = "plan-wins",
    deepspeed_path: str = DEFAULT_DEEPSPEED_PATH,
    config_path: str = "",
) -> Job:
    """Plan ``config`` for ``target`` on ``topology`` and render what the job needs.

    ``target``: a :class:`JobSpec` (a job, with its image and command), ``"configmaps"`` (the
    ConfigMaps alone), or a job target's name (the plan, spec and sizes of that target, e.g. for a
    local Ray run; rendering it needs a :class:`JobSpec`). ``name``: the objects' name; without it
    nothing is rendered. ``labels`` go on every object, after the job's own. ``policy``: whether
    the plan or a pre-set variable wins on the worker. ``deepspeed_path``: where the workers find
    the DeepSpeed JSON. ``config_path``: where ``config`` sits in the caller's document (the
    controller's ``spec.config.``), put in front of a refused config key.

    Raises :class:`~optimenv.errors.ConfigError` (one line, naming the field) for what cannot run.
    """
    job = target if isinstance(target, JobSpec) else None
    kind = check_target(job.target if job is not None else target)
    if policy not in POLICIES:
        raise ConfigError("policy", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
    with _config_errors(config_path):
        launch = topology.launch(kind, config)
        planned = plan(config, topology.hardware(launch), deepspeed_path=deepspeed_path)
    spec = build_spec(planned, policy=policy)
    done = Job(kind, topology, planned, spec, launch)
    if name is None:
        return done
    every = {**(job.labels if job is not None else {}), **check_labels("labels", labels or {})}
    request = Request(kind, name, check_namespace(namespace), every, job, launch, spec)
    rendered: Rendered = render(planned, request)
    return Job(
        kind,
        topology,
        planned,
        spec,
        launch,
        rendered.objects,
        rendered.configmaps.env_name,
        rendered.configmaps.spec_name,
        rendered.configmaps.deepspeed_name,
    )


@contextmanager
def _config_errors(path: str) -> Iterator[None]:
    """A refused config key named where the caller's document has the config."""
    try:
        yield
    except ProcessCountError as exc:
        if not path:
            raise
        sizes = {"product": exc.product, "world": exc.world}
        raise ProcessCountError(path + exc.field, exc.reason, exc.hint or "", **sizes) from None
    except ConfigError as exc:
        if not path:
            raise
        raise ConfigError(path + exc.field, exc.reason, exc.hint) from None
