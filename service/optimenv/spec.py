"""The worker spec: a plan as the JSON document shipped to every worker, with a content hash.

Renderers put it in the ``<name>-spec`` ConfigMap; the bootstrap reads it, checks the hash and
applies it. Canonical JSON (sorted keys, no spaces) makes the hash independent of formatting.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal, get_args

from optimenv.errors import OptimEnvError

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
# The steps only a worker can decide: the planner writes them, the bootstrap dispatches on them.
DeferredKind = Literal[
    "nccl_p2p_check",
    "bf16_auto",
    "torch_compile_auto",
    "require_fp8",
    "single_gpu_rendezvous_defaults",
    "deepspeed_zero3_config",
    "parallel_sizes",
]
DEFERRED_KINDS: frozenset[str] = frozenset(get_args(DeferredKind))


class SpecError(OptimEnvError):
    """A worker spec that cannot be trusted (bad JSON, wrong kind, hash mismatch)."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def deepspeed_text(deepspeed: dict[str, Any]) -> str:
    """The DeepSpeed JSON file as written to workers (stable, readable)."""
    return json.dumps(deepspeed, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_spec(plan: Plan, *, policy: Policy = "plan-wins") -> dict[str, Any]:
    """The spec document for ``plan``; ``policy`` says who wins when a variable is already set."""
    if policy not in POLICIES:
        raise SpecError(f"policy: must be one of {', '.join(POLICIES)}, got {policy!r}")
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "policy": policy,
        "env": [{"name": v.name, "value": v.value, "source": v.source, "mode": v.mode} for v in plan.env],
        "deferred": [d.to_dict() for d in plan.deferred],
        "deepspeed": plan.deepspeed,
        "deepspeedPath": plan.deepspeed_path,
        "zeroStage": plan.zero_stage,
        "fsdpVersion": plan.fsdp_version,
        "warnings": list(plan.warnings),
    }
    return {**body, "hash": content_hash(body)}


def spec_text(spec: dict[str, Any]) -> str:
    """The spec file as written to workers."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def verify_spec(data: Any) -> dict[str, Any]:
    """Check kind, version and content hash; returns the spec or raises :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError("spec: must be a JSON object")
    if data.get("apiVersion") != API_VERSION or data.get("kind") != KIND:
        raise SpecError(
            f"spec: expected apiVersion {API_VERSION} kind {KIND}, "
            f"got {data.get('apiVersion')!r} {data.get('kind')!r}"
        )
    body = {k: v for k, v in data.items() if k != "hash"}
    expected = content_hash(body)
    if data.get("hash") != expected:
        raise SpecError(
            f"spec: content hash mismatch (file says {data.get('hash')!r}, content is {expected}); "
            "the spec was edited or truncated: render it again with optimenv"
        )
    if data.get("policy") not in POLICIES:
        raise SpecError(f"spec: policy must be one of {', '.join(POLICIES)}")
    return data
