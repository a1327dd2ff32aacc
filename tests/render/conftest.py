"""Fixtures for the renderer tests: one strict validator and the planned examples, per session."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from optimenv.config import load_config
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware, Plan, plan
from optimenv.render import JobOptions, render
from tests.conftest import require_shared
from tests.render.validators import Validator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


@functools.cache
def _cached_validator(shared: Path) -> Validator:
    return Validator(shared)


def _validator() -> Validator:
    """The upstream CRDs are reference material: without them the calling test skips."""
    return _cached_validator(require_shared())


@pytest.fixture(scope="session")
def validator() -> Validator:
    return _validator()


def render_checked(plan: Plan, target: str, options: JobOptions) -> list[dict[str, Any]]:
    """``render()``, with every object it returns put through the strict validator."""
    objects = render(plan, target, options)
    _validator().validate_all(objects)
    return objects


def plan_example(name: str, nodes: int, gpus: int, deepspeed_path: str = DEFAULT_DEEPSPEED_PATH) -> Plan:
    """``examples/<name>.yaml`` planned for ``nodes`` x ``gpus``."""
    hardware = Hardware(nodes=nodes, gpus_per_node=gpus)
    return plan(load_config(EXAMPLES / f"{name}.yaml"), hardware, deepspeed_path=deepspeed_path)
