"""Fixtures of the controller tests: kmock as an API server (ApiServer), OptimEnv objects."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.controller.apiserver import ApiServer

NS = "ml"


@pytest.fixture()
def kmock_options() -> dict[str, Any]:
    """kmock's own fixture, serving the emulator with API-server metadata (see apiserver.py)."""
    return {"cls": ApiServer, "strict": False}


INLINE_CONFIG: dict[str, Any] = {
    "base_model": "meta-llama/Llama-3.2-1B",
    "deepspeed": "zero3",
    "bf16": True,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 4,
}


def optimenv(name: str = "demo", *, spec: dict[str, Any] | None = None, **spec_fields: Any) -> dict[str, Any]:
    body_spec = copy.deepcopy(spec) if spec is not None else {"config": copy.deepcopy(INLINE_CONFIG)}
    body_spec.setdefault("topology", {"nodes": 2, "gpusPerNode": 8, "bf16Supported": True})
    body_spec.update(spec_fields)
    return {
        "apiVersion": "optimenv.dev/v1alpha1",
        "kind": "OptimEnv",
        "metadata": {"name": name, "namespace": NS},
        "spec": body_spec,
    }
