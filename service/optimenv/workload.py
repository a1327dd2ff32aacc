"""The job as its user describes it: the targets, where it runs (:class:`Topology`) and what it runs
(:class:`JobSpec`). One definition each, shared by the Python API, the CLI and the ``OptimEnv`` CRD.

Python code uses the field names (``gpus_per_node``); a Kubernetes object uses the aliases
(``gpusPerNode``), which are also what the CRD's schema shows. Both validate the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
)

from optimenv import names
from optimenv.errors import ConfigError, shown
from optimenv.plan import Hardware
from optimenv.versions import parse_version

if TYPE_CHECKING:
    from optimenv.config import TrainingConfig

#: The job operators optimenv renders for; ``configmaps`` renders the ConfigMaps alone.
JobTarget = Literal["rayjob", "pytorchjob", "trainjob"]
Target = Literal[JobTarget, "configmaps"]
JOB_TARGETS: tuple[JobTarget, ...] = get_args(JobTarget)
TARGETS: tuple[Target, ...] = get_args(Target)


@dataclass(frozen=True)
class JobKind:
    """The Kubernetes resource a job target creates."""

    group: str
    version: str
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


JOB_KINDS: Mapping[JobTarget, JobKind] = {
    "rayjob": JobKind("ray.io", "v1", "RayJob", "rayjobs"),  # KubeRay 1.7
    "pytorchjob": JobKind("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs"),  # Training Operator 1.9
    "trainjob": JobKind("trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs"),  # Trainer 2.3
}

_MODEL = ConfigDict(
    extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
)


def check_target(target: Any, field: str = "target") -> Target:
    if target not in TARGETS:
        raise ConfigError(field, f"unknown target {shown(target)}", f"choose one of {', '.join(TARGETS)}")
    found: Target = target
    return found


# ---------------------------------------------------------------------------------------------
# Topology


@dataclass(frozen=True)
class Launch:
    """What a job starts: its pods (``nodes``), GPUs per pod, and its training processes in all."""

    nodes: int
    gpus_per_node: int
    processes: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def ray_workers_asked(config: TrainingConfig) -> int | None:
    """The config's ``ray_num_workers`` when it sets one (its default of 1 asks for nothing)."""
    return config.ray_num_workers if "ray_num_workers" in config.model_fields_set else None


def _torch_version(value: str | None) -> str | None:
    if value is not None and parse_version(value) is None:
        # An unparsable version would compare below every minimum and silently drop settings.
        raise ValueError(f"must look like 2.6.0 (major.minor[.patch]), got {shown(value)}")
    return value


# None is "unknown" for the Python API and the CLI (the ConfigMaps alone, or a plan); the CRD always
# has a size (default 1), so its schema shows a plain integer and OptimEnvSpec refuses null.
_Size = Annotated[int | None, Field(ge=1, strict=True), WithJsonSchema({"type": "integer", "minimum": 1})]


class Topology(BaseModel):
    """The machines a job runs on: nodes, GPUs per node, and what is known of the GPUs and torch.

    ``None`` means unknown: the planner then leaves the decision to the worker. A job target needs
    sizes, and takes 1 for an unknown one. :meth:`launch` is the one rule for how many processes a
    target starts here; :meth:`hardware` what the planner is told.
    """

    model_config = _MODEL

    nodes: _Size = Field(1, description="Number of nodes (pods) of the job.")
    gpus_per_node: _Size = Field(
        1, alias="gpusPerNode", description="GPUs, and so training processes, per node."
    )
    bf16_supported: bool | None = Field(
        None,
        alias="bf16Supported",
        description="Whether the GPUs support bf16; leave out to let the worker detect it.",
    )
    fp8_supported: bool | None = Field(
        None, alias="fp8Supported", description="Whether the GPUs support fp8."
    )
    torch_version: Annotated[str | None, AfterValidator(_torch_version)] = Field(
        None,
        alias="torchVersion",
        description="torch version of the worker image (decides torch_compile: auto).",
    )

    def launch(self, target: Target, config: TrainingConfig) -> Launch | None:
        """How many pods, GPUs and training processes ``target`` starts on this topology.

        Every GPU runs one process, except in Ray mode (``rayjob``, ``optimenv run``): there the
        processes are the Ray Train workers, the config's ``ray_num_workers`` when it sets it (as
        Axolotl's Ray launch does), else one per GPU; each worker takes one GPU, so more workers than
        GPUs is refused. ``configmaps`` starts nothing: ``None`` unless both sizes are known.
        """
        if target == "configmaps":
            if self.nodes is None or self.gpus_per_node is None:
                return None
            return Launch(self.nodes, self.gpus_per_node, self.nodes * self.gpus_per_node)
        nodes, per_node = self.nodes or 1, self.gpus_per_node or 1
        gpus = nodes * per_node
        workers = ray_workers_asked(config) if target == "rayjob" else None
        if workers is None:
            return Launch(nodes, per_node, gpus)
        if workers > gpus:
            raise ConfigError(
                "ray_num_workers",
                f"{workers} Ray Train workers need {workers} GPUs (one each), the job has {gpus} "
                f"({nodes} node(s) x {per_node})",
                "raise the nodes or GPUs per node (--nodes, --gpus-per-node) or lower ray_num_workers",
            )
        return Launch(nodes, per_node, workers)

    def hardware(self, launch: Launch | None = None) -> Hardware:
        """The planner's view: these GPUs' capabilities, and the processes ``launch`` starts.

        The planner counts processes as nodes x GPUs per node; Ray Train workers that are fewer than
        the GPUs are told as one node of that many (C28: the sizes must multiply to the processes).
        """
        nodes, per_node = self.nodes, self.gpus_per_node
        if launch is not None:
            nodes, per_node = launch.nodes, launch.gpus_per_node
            if launch.processes != launch.gpus:
                nodes, per_node = 1, launch.processes
        return Hardware(
            nodes=nodes,
            gpus_per_node=per_node,
            bf16_supported=self.bf16_supported,
            fp8_supported=self.fp8_supported,
            torch_version=self.torch_version,
        )


#: Ray Train workers of ``optimenv run`` when neither --workers nor the config says.
DEFAULT_LOCAL_WORKERS = 2


def local_topology(config: TrainingConfig, workers: int | None = None) -> Topology:
    """This machine for a local Ray run: one node, a slot per Ray Train worker.

    The workers are ``workers`` (``--workers``) when given, else the config's ``ray_num_workers``
    when it sets one, else :data:`DEFAULT_LOCAL_WORKERS`; both given and different is refused. What
    the GPUs support and which torch the workers have is left to the bootstrap in each worker.
    """
    asked = ray_workers_asked(config)
    if workers is not None and asked is not None and workers != asked:
        raise ConfigError(
            "--workers",
            f"{workers} disagrees with the config's ray_num_workers: {asked}",
            "leave out --workers, or change ray_num_workers",
        )
    return Topology(nodes=1, gpus_per_node=workers or asked or DEFAULT_LOCAL_WORKERS)


# ---------------------------------------------------------------------------------------------
# JobSpec


def _label_key(key: str) -> str:
    if not names.is_label_key(key):
        raise ValueError(f"is not a valid label key ({names.LABEL_KEY_HINT})")
    return key


def _label_value(value: str) -> str:
    if not names.is_label_value(value):
        raise ValueError(f"{shown(value)} is not a valid label value ({names.LABEL_VALUE_HINT})")
    return value


def _subdomain(what: str) -> AfterValidator:
    def check(value: str | None) -> str | None:
        if value is not None and not names.is_subdomain(value):
            raise ValueError(f"{shown(value)} is not a {what}")
        return value

    return AfterValidator(check)


_TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})


def _toleration(value: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(str(k) for k in value if k not in _TOLERATION_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (use {', '.join(sorted(_TOLERATION_KEYS))})")
    return value


def _argument_list(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("must be a list of arguments, not one string (split it: ['python', 'x.py'])")
    return value


def _image(value: str) -> str:
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(f"{shown(value)} is not an image reference")
    return value


_Labels = dict[Annotated[str, AfterValidator(_label_key)], Annotated[str, AfterValidator(_label_value)]]


class JobSpec(BaseModel):
    """The training job to create: its target, image, per-process command and pod settings.

    ``command`` is what every training process runs (``python train.py``); optimenv adds the
    launcher (torchrun, mpirun, Ray Train) and the bootstrap in front of it.
    """

    model_config = _MODEL

    target: JobTarget = Field(description="Job operator to target.")
    image: Annotated[str, AfterValidator(_image)] = Field(
        min_length=1, description="Container image of the training workers."
    )
    command: Annotated[list[str], BeforeValidator(_argument_list)] = Field(
        default_factory=list, description="Training command run under the bootstrap on every worker."
    )
    service_account: Annotated[str | None, _subdomain("DNS-1123 subdomain")] = Field(
        None, alias="serviceAccount", description="Service account of the worker pods."
    )
    node_selector: _Labels = Field(
        default_factory=dict, alias="nodeSelector", description="Node selector of the workers."
    )
    tolerations: list[Annotated[dict[str, Any], AfterValidator(_toleration)]] = Field(
        default_factory=list, description="Tolerations of the worker pods (core/v1 Toleration)."
    )
    labels: _Labels = Field(default_factory=dict, description="Extra labels on the job and its pods.")
    runtime: Annotated[str | None, _subdomain("ClusterTrainingRuntime name")] = Field(
        None, description="TrainJob only: the ClusterTrainingRuntime to reference (default by config)."
    )
