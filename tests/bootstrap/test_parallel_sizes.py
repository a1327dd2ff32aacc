"""The ``parallel_sizes`` deferred step: Axolotl's loader inference (``utils/distributed.py:320-378``)
and Accelerate's checks, decided with the worker's process count (docs/compatibility.md C29, C30).

And the ``bf16_auto`` step's fallbacks (C14): Axolotl's ``resolve_dtype``
(``utils/config/__init__.py:157-167``) trains fp16 on a GPU without bf16, but no worker trains fp16
without a GPU (this machine has none).
"""

from __future__ import annotations

from typing import Any

import pytest

from optimenv.bootstrap import BootstrapError, apply
from optimenv.spec import SpecError, content_hash
from tests.bootstrap.support import MakeSpec

# Context parallelism, not tensor parallelism: FSDP2 + TP is refused on this machine's library pair
# (test_apply.py), which would hide what the step decides.
FSDP2 = {"base_model": "m", "bf16": True, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}


def _step(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(d for d in doc["deferred"] if d["kind"] == kind)


def _rehash(doc: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in doc.items() if k != "hash"}
    return {**body, "hash": content_hash(body)}


@pytest.mark.parametrize(
    ("launcher", "how"),
    [
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4"),
        ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "WORLD_SIZE": "2"}, "PET_NNODES"),
    ],
    ids=["world-size", "kubeflow-pet-first"],
)
def test_the_worker_infers_what_axolotls_loader_infers(
    make_spec: MakeSpec, launcher: dict[str, str], how: str
) -> None:
    files = make_spec({**FSDP2, "context_parallel_size": 2})
    assert _step(files.doc, "parallel_sizes")["detail"]["written"]["dp_shard"] is None
    env = dict(launcher)
    applied = apply(files.spec, environ=env)
    assert env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "2"
    assert env["PARALLELISM_CONFIG_CP_SIZE"] == "2" and env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    [inferred] = [v for v in applied.assigned if v.name == "PARALLELISM_CONFIG_DP_SHARD_SIZE"]
    assert inferred.source == "dp_shard_size (inferred)"
    decision = next(d for d in applied.decisions if d.kind == "parallel_sizes")
    assert how in decision.reason and "PARALLELISM_CONFIG_DP_SHARD_SIZE=2" in decision.reason


def test_a_written_dp_shard_leaves_the_rest_to_replicas(make_spec: MakeSpec) -> None:
    files = make_spec({**FSDP2, "context_parallel_size": 2, "dp_shard_size": 2})
    env = {"WORLD_SIZE": "8"}
    apply(files.spec, environ=env)
    assert (env["PARALLELISM_CONFIG_DP_SHARD_SIZE"], env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"]) == (
        "2",
        "2",
    )


@pytest.mark.parametrize(
    ("config", "world", "says"),
    [
        ({**FSDP2, "context_parallel_size": 2}, "3", "which does not divide the 3 processes"),
        (
            {**FSDP2, "expert_parallel_size": 2},
            "4",
            "context_parallel_size to equal the 4 processes",
        ),
    ],
    ids=["sizes-do-not-fit", "expert-parallel-plugin"],
)
def test_the_worker_refuses_what_accelerate_would(
    make_spec: MakeSpec, config: dict[str, Any], world: str, says: str
) -> None:
    files = make_spec(config)
    env = {"WORLD_SIZE": world}
    with pytest.raises(BootstrapError, match=says):
        apply(files.spec, environ=env)
    assert env == {"WORLD_SIZE": world}  # a refusal writes nothing


def test_without_a_process_count_the_sizes_stay_as_written(make_spec: MakeSpec) -> None:
    files = make_spec({**FSDP2, "context_parallel_size": 2})
    env: dict[str, str] = {}
    applied = apply(files.spec, environ=env)
    decision = next(d for d in applied.decisions if d.kind == "parallel_sizes")
    assert "process count is unknown" in decision.reason and "PARALLELISM_CONFIG_DP_SHARD_SIZE" not in env


def test_a_malformed_step_is_a_spec_error(make_spec: MakeSpec) -> None:
    doc = make_spec({**FSDP2, "context_parallel_size": 2}).doc
    _step(doc, "parallel_sizes")["detail"]["written"]["cp"] = "two"
    with pytest.raises(SpecError, match=r"deferred\[\d\]\.detail\.written\.cp: must be a whole number"):
        apply(_rehash(doc), environ={"WORLD_SIZE": "4"})
    _step(doc, "parallel_sizes")["detail"]["written"]["cp"] = 2
    del _step(doc, "parallel_sizes")["detail"]["layout"]
    with pytest.raises(SpecError, match=r"parallel_sizes needs 'layout'"):
        apply(_rehash(doc), environ={"WORLD_SIZE": "4"})


def test_bf16_auto_without_a_gpu_trains_fp32(make_spec: MakeSpec) -> None:
    files = make_spec({"base_model": "m"})
    assert _step(files.doc, "bf16_auto")["detail"] == {
        "if_supported": "bf16",
        "otherwise": "fp16",
        "without_gpu": "no",
    }
    env: dict[str, str] = {}
    applied = apply(files.spec, environ=env)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert next(d for d in applied.decisions if d.kind == "bf16_auto").value == "no"
    # A spec without the key (rendered before it existed) keeps its "otherwise".
    doc = files.doc
    del _step(doc, "bf16_auto")["detail"]["without_gpu"]
    env = {}
    apply(_rehash(doc), environ=env)
    assert env["ACCELERATE_MIXED_PRECISION"] == "fp16"
