"""The worker spec: a plan as the JSON document shipped to every worker, with a content hash.

Renderers put it in the ``<name>-spec`` ConfigMap; the bootstrap reads it, checks the hash and
applies it. Canonical JSON (sorted keys, no spaces) makes the hash independent of formatting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from optimenv.errors import OptimEnvError, shown
from optimenv.limits import check_data

if TYPE_CHECKING:  # the bootstrap reads specs without importing the planner (pydantic, yaml)
    from optimenv.plan import Plan

API_VERSION = "optimenv.dev/v1alpha1"
KIND = "WorkerSpec"
# Where the rendered spec ConfigMap is mounted, and the variable naming it: the renderers write both,
# the bootstrap reads them (the mount path is its default).
SPEC_PATH = "/etc/optimenv/spec.json"
SPEC_ENV = "OPTIMENV_SPEC"
Policy = Literal["plan-wins", "user-wins"]
POLICIES: tuple[Policy, ...] = ("plan-wins", "user-wins")
# The steps only a worker can decide: one typed definition of each in optimenv.steps.
DeferredKind = Literal[
    "nccl_p2p_check",
    "bf16_auto",
    "torch_compile_auto",
    "require_fp8",
    "single_gpu_rendezvous_defaults",
    "deepspeed_zero3_config",
    "parallel_sizes",
]

#: Variables the launchers own: torchrun, the operators (PyTorchJob, TrainJob), mpirun and Ray Train
#: set them in every process. A plan never carries one (the renderers refuse it) and the bootstrap
#: never writes one, except a deferred step's single-GPU DeepSpeed defaults where nothing is set.
LAUNCHER_VARIABLES = frozenset(
    {
        # torch.distributed rendezvous and ranks (torchrun sets all of them for each child)
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_NAME",
        "ROLE_WORLD_SIZE",
        # Ray Train pins each worker to its GPU with these
        "ACCELERATE_TORCH_DEVICE",
        "CUDA_VISIBLE_DEVICES",
    }
)
#: Families of launcher variables: the operators' torchrun arguments, OpenMPI's ranks, torchelastic's.
LAUNCHER_PREFIXES = ("PET_", "OMPI_", "TORCHELASTIC_")


def set_by_launcher(name: str) -> bool:
    """Whether ``name`` is a variable a launcher sets, which neither a plan nor the bootstrap may."""
    return name in LAUNCHER_VARIABLES or name.startswith(LAUNCHER_PREFIXES)


class SpecVariable(TypedDict):
    """One planned variable of a worker spec (``mode`` ``default``: only where nothing is set)."""

    name: str
    value: str
    source: str
    mode: Literal["set", "default"]


class SpecStep(TypedDict):
    """One deferred step of a worker spec: what only the worker can decide."""

    kind: DeferredKind
    variable: str | None
    source: str
    detail: dict[str, Any]


class WorkerSpec(TypedDict):
    """The worker spec document (JSON on the wire), ``apiVersion`` and ``kind`` as below; keys in the
    order it is built, ``hash`` the content hash of the rest."""

    apiVersion: str
    kind: str
    policy: Policy
    env: list[SpecVariable]
    deferred: list[SpecStep]
    deepspeed: dict[str, Any] | None
    deepspeedPath: str | None
    zeroStage: int | None
    fsdpVersion: int | None
    warnings: list[str]
    hash: str


class SpecError(OptimEnvError):
    """A worker spec that cannot be trusted (bad JSON, wrong kind, hash mismatch)."""


class BootstrapError(OptimEnvError):
    """The bootstrap refuses to start the worker (the message says why and what to do)."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def deepspeed_text(deepspeed: dict[str, Any]) -> str:
    """The DeepSpeed JSON file as written to workers (stable, readable)."""
    return json.dumps(deepspeed, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_spec(plan: Plan, *, policy: Policy = "plan-wins") -> WorkerSpec:
    """The spec document for ``plan``; ``policy`` says who wins when a variable is already set."""
    if policy not in POLICIES:
        raise SpecError(f"policy: must be one of {', '.join(POLICIES)}, got {shown(policy)}")
    env: list[SpecVariable] = [
        {"name": v.name, "value": v.value, "source": v.source, "mode": v.mode} for v in plan.env
    ]
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "policy": policy,
        "env": env,
        "deferred": plan.spec_steps(),
        "deepspeed": plan.deepspeed,
        "deepspeedPath": plan.deepspeed_path,
        "zeroStage": plan.zero_stage,
        "fsdpVersion": plan.fsdp_version,
        "warnings": list(plan.warnings),
    }
    # The hash covers every key before it, so it is added last (and the key order is the document's).
    return cast(WorkerSpec, {**body, "hash": content_hash(body)})


def spec_text(spec: Mapping[str, object]) -> str:
    """The spec file as written to workers."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def verify_spec(data: Any) -> dict[str, Any]:
    """Check kind, version and content hash; returns the spec or raises :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError("spec: must be a JSON object")
    try:
        check_data(data, "spec")
    except OptimEnvError as exc:
        raise SpecError(str(exc)) from None
    if data.get("apiVersion") != API_VERSION or data.get("kind") != KIND:
        raise SpecError(
            f"spec: expected apiVersion {API_VERSION} kind {KIND}, "
            f"got {shown(data.get('apiVersion'))} {shown(data.get('kind'))}"
        )
    body = {k: v for k, v in data.items() if k != "hash"}
    try:
        expected = content_hash(body)
    except (TypeError, ValueError) as exc:  # a mapping passed in by a caller, not parsed JSON
        raise SpecError(f"spec: not JSON data ({shown(str(exc))})") from None
    if data.get("hash") != expected:
        raise SpecError(
            f"spec: content hash mismatch (file says {shown(data.get('hash'))}, content is {expected}); "
            "the spec was edited or truncated: render it again with optimenv"
        )
    if data.get("policy") not in POLICIES:
        raise SpecError(f"spec: policy must be one of {', '.join(POLICIES)}")
    return data
