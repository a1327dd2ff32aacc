"""Fixtures for the renderer tests: one strict validator, and examples compiled for a target."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from optimenv.compiler import Job, compile
from optimenv.config import TrainingConfig, load_config, parse_config
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware, Plan, plan
from optimenv.workload import JobSpec, Target, Topology
from tests.conftest import require_shared
from tests.render.validators import Validator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
# What a job runs unless a test says otherwise.
JOB_DEFAULTS: dict[str, Any] = {"image": "img:1", "command": ["python", "train.py"]}


@functools.cache
def _cached_validator(shared: Path) -> Validator:
    return Validator(shared)


def _validator() -> Validator:
    """The upstream CRDs are reference material: without them the calling test skips."""
    return _cached_validator(require_shared())


@pytest.fixture(scope="session")
def validator() -> Validator:
    return _validator()


def config_of(source: str | dict[str, Any] | TrainingConfig) -> TrainingConfig:
    """An example's name, a config mapping, or a loaded config."""
    if isinstance(source, str):
        return load_config(EXAMPLES / f"{source}.yaml")
    return parse_config(source) if isinstance(source, dict) else source


def target_of(target: str, **job: Any) -> Target | JobSpec:
    """``target`` with a :class:`JobSpec` of :data:`JOB_DEFAULTS` and ``job``; ``image=None``: none."""
    fields = {**JOB_DEFAULTS, **job}
    if target == "configmaps" or fields["image"] is None:
        return target  # a test may pass an unknown target on purpose
    return JobSpec.model_validate({"target": target, **fields})


def compiled(
    source: str | dict[str, Any] | TrainingConfig,
    target: str,
    *,
    nodes: int | None = 2,
    gpus: int | None = 4,
    bf16: bool | None = None,
    name: str = "ft",
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    policy: Any = "plan-wins",
    deepspeed_path: str = DEFAULT_DEEPSPEED_PATH,
    **job: Any,
) -> Job:
    """:func:`optimenv.compile` of ``source`` for ``target`` on ``nodes`` x ``gpus``, objects validated."""
    result = compile(
        config_of(source),
        Topology(nodes=nodes, gpus_per_node=gpus, bf16_supported=bf16),
        target_of(target, **job),
        name=name,
        namespace=namespace,
        labels=labels,
        policy=policy,
        deepspeed_path=deepspeed_path,
    )
    _validator().validate_all(result.manifests())
    return result


def plan_example(name: str, nodes: int, gpus: int, deepspeed_path: str = DEFAULT_DEEPSPEED_PATH) -> Plan:
    """``examples/<name>.yaml`` planned for ``nodes`` x ``gpus``."""
    hardware = Hardware(nodes=nodes, gpus_per_node=gpus)
    return plan(load_config(EXAMPLES / f"{name}.yaml"), hardware, deepspeed_path=deepspeed_path)
