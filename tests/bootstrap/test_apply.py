"""``optimenv.bootstrap.apply()`` on an environment mapping: what it sets, keeps, decides and refuses.

These run in the test process on plain dicts (the real code, no patches); the deferred steps are
decided on this machine, which has no GPU. ZeRO-3 (which imports transformers and holds a config
for the life of the process) is tested in child processes, in test_in_process.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from optimenv.bootstrap import Applied, BootstrapError, _probe, apply
from optimenv.errors import OptimEnvError
from optimenv.plan import Hardware
from optimenv.spec import SpecError, content_hash
from tests.bootstrap.support import FSDP2, ZERO2_COMPILE, MakeSpec


def _rehash(doc: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in doc.items() if k != "hash"}
    return {**body, "hash": content_hash(body)}


def test_sets_every_planned_variable_with_its_source(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    env: dict[str, str] = {"PATH": "/bin"}
    applied = apply(files.spec, environ=env)
    planned = {e["name"]: (e["value"], e["source"]) for e in files.doc["env"]}
    assert {v.name: (v.value, v.source) for v in applied.assigned} == planned
    assert applied.kept == ()
    assert env == {"PATH": "/bin", **{k: v for k, (v, _) in planned.items()}}
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert applied.spec_path == str(files.spec)
    assert applied.spec_hash == files.doc["hash"]
    assert applied.zero3_config is None
    assert [d.kind for d in applied.decisions] == ["nccl_p2p_check"]
    assert applied.decisions[0].value is None and "no GPU" in applied.decisions[0].reason


def test_second_apply_is_a_no_op_with_the_same_result(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO2_COMPILE)
    env: dict[str, str] = {}
    first = apply(files.spec, environ=env)
    snapshot = dict(env)
    second = apply(files.spec, environ=env)
    assert second is first
    assert env == snapshot
    # A fresh process (here: a fresh mapping holding the applied values) finds them all in place.
    again = apply(files.spec, environ=dict(snapshot))
    assert again.assigned == ()
    assert {v.name for v in again.kept} == {v.name for v in first.assigned}


def test_deferred_steps_decided_on_this_worker(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO2_COMPILE)
    env: dict[str, str] = {}
    applied = apply(files.spec, environ=env)
    decisions = {d.kind: d for d in applied.decisions}
    # torch 2.13 is installed: torch_compile "auto" turns on (Axolotl's threshold is 2.5.1).
    assert decisions["torch_compile_auto"].value == "INDUCTOR"
    assert env["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"
    # No GPU here: bf16 "auto" falls back to "no".
    assert decisions["bf16_auto"].value == "no" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    # Not a single-GPU machine: no rendezvous defaults.
    assert decisions["single_gpu_rendezvous_defaults"].value is None
    assert "not a single-GPU run" in decisions["single_gpu_rendezvous_defaults"].reason
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert "NCCL_P2P_DISABLE" not in env


def test_launcher_rendezvous_is_left_alone(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO2_COMPILE)
    launcher = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    env = dict(launcher)
    applied = apply(files.spec, environ=env)
    assert {k: env[k] for k in launcher} == launcher
    decision = next(d for d in applied.decisions if d.kind == "single_gpu_rendezvous_defaults")
    assert decision.reason == "WORLD_SIZE=2 set by the launcher"


def test_p2p_variable_set_by_the_operator_is_kept(make_spec: MakeSpec) -> None:
    env = {"NCCL_P2P_DISABLE": "0"}
    applied = apply(make_spec(FSDP2).spec, environ=env)
    assert env["NCCL_P2P_DISABLE"] == "0"
    assert applied.decisions[0].reason == "NCCL_P2P_DISABLE already set by the environment"


def test_conflict_refuses_and_leaves_the_environment_untouched(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    env = {"FSDP_VERSION": "1", "ACCELERATE_MIXED_PRECISION": "fp16"}
    with pytest.raises(BootstrapError) as info:
        apply(files.spec, environ=env)
    assert env == {"FSDP_VERSION": "1", "ACCELERATE_MIXED_PRECISION": "fp16"}
    message = str(info.value)
    assert "FSDP_VERSION='1' from the environment, the plan sets '2' from fsdp_version" in message
    assert "ACCELERATE_MIXED_PRECISION='fp16' from the environment, the plan sets 'bf16' from bf16" in message
    assert "\n" not in message


def test_user_wins_records_what_it_kept(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2, policy="user-wins")
    env = {"ACCELERATE_MIXED_PRECISION": "fp16", "FSDP_VERSION": "2"}
    applied = apply(files.spec, environ=env)
    kept = {v.name: v for v in applied.kept}
    assert env["ACCELERATE_MIXED_PRECISION"] == "fp16"
    assert kept["ACCELERATE_MIXED_PRECISION"].planned == "bf16"
    assert kept["ACCELERATE_MIXED_PRECISION"].source == "environment"
    assert kept["ACCELERATE_MIXED_PRECISION"].reason == "policy user-wins"
    assert kept["FSDP_VERSION"].reason == "already set to the planned value"
    assert env["ACCELERATE_USE_FSDP"] == "true"


def test_spec_mapping_and_spec_variable(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    from_mapping = apply(files.doc, environ={})
    assert from_mapping.spec_path is None
    env = {"OPTIMENV_SPEC": str(files.spec)}
    from_variable = apply(environ=env)
    assert from_variable.spec_path == str(files.spec)
    assert from_mapping.env == from_variable.env


def test_fp8_needs_a_capable_gpu(make_spec: MakeSpec) -> None:
    files = make_spec({"base_model": "m", "fp8": True})
    with pytest.raises(BootstrapError, match=r"fp8: requested, but this worker cannot run it \(no GPU"):
        apply(files.spec, environ={})


def test_deepspeed_json_that_hard_codes_bf16_on_a_worker_without_bf16(make_spec: MakeSpec) -> None:
    config = {"base_model": "m", "deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}}
    files = make_spec(config)
    env: dict[str, str] = {}
    with pytest.raises(
        BootstrapError, match=r"bf16: auto resolves to 'no' on this worker .* bf16.enabled: true"
    ):
        apply(files.spec, environ=env)
    assert env == {}
    # Planned for bf16 hardware, the same config needs no worker decision and applies.
    applied = apply(
        make_spec(config, hardware=Hardware(bf16_supported=True), name="b.json").spec, environ=env
    )
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and isinstance(applied, Applied)


FSDP2_TP = {**FSDP2, "dp_shard_size": 2, "tensor_parallel_size": 2}


def test_fsdp2_tensor_parallel_is_refused_where_accelerate_cannot_prepare_it(make_spec: MakeSpec) -> None:
    """The pinned pair (Accelerate 1.15.0, transformers 5.24.0) fails in Accelerator._prepare_tp.

    docs/gpu.md: Accelerate imports ReplicateParallel, which transformers dropped after 5.0.0; on
    the GPUs both launch paths stopped there, after loading the model.
    """
    files = make_spec(FSDP2_TP, hardware=Hardware(nodes=1, gpus_per_node=4))
    env: dict[str, str] = {"PATH": "/bin"}
    with pytest.raises(BootstrapError) as info:
        apply(files.spec, environ=env)
    message = str(info.value)
    assert message.startswith("tensor_parallel_size: 2 with FSDP2 cannot train on this worker")
    assert "accelerate 1.15.0 imports ReplicateParallel" in message
    assert "transformers 5.24.0 does not have" in message and "transformers==5.0.0" in message
    assert env == {"PATH": "/bin"}
    # Training on CPUs (optimenv run, Ray mode) never takes Accelerate's FSDP2 path.
    on_cpu = {"ACCELERATE_USE_CPU": "true"}
    apply(files.spec, environ=on_cpu)
    assert on_cpu["PARALLELISM_CONFIG_TP_SIZE"] == "2"
    # Data parallelism alone (HSDP) never reaches that import.
    hsdp = {**FSDP2, "dp_replicate_size": 2, "dp_shard_size": 2}
    applied = apply(
        make_spec(hsdp, hardware=Hardware(nodes=1, gpus_per_node=4), name="h.json").spec, environ=env
    )
    assert env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"] == "2" and isinstance(applied, Applied)


def test_tensor_parallel_source_gap_reads_both_packages(tmp_path: Path) -> None:
    accelerate, transformers = tmp_path / "accelerate", tmp_path / "transformers"
    (transformers / "integrations").mkdir(parents=True)
    accelerate.mkdir()
    importing = "from transformers.integrations.tensor_parallel import ReplicateParallel\n"
    (accelerate / "accelerator.py").write_text(importing)
    provider = transformers / "integrations" / "tensor_parallel.py"
    provider.write_text("class ColwiseParallel: ...\n")
    gap = _probe.tensor_parallel_source_gap(accelerate, transformers)
    assert gap == "imports ReplicateParallel from transformers.integrations.tensor_parallel"
    provider.write_text("class ReplicateParallel: ...\n")  # transformers 5.0.0
    assert _probe.tensor_parallel_source_gap(accelerate, transformers) is None
    provider.unlink()  # no tensor_parallel module at all: the import fails too
    assert _probe.tensor_parallel_source_gap(accelerate, transformers) is not None
    (accelerate / "accelerator.py").write_text("def _prepare_tp(self): ...\n")  # a fixed Accelerate
    assert _probe.tensor_parallel_source_gap(accelerate, transformers) is None


def test_spec_naming_a_rendezvous_variable_is_refused(make_spec: MakeSpec) -> None:
    doc = copy.deepcopy(make_spec(FSDP2).doc)
    doc["env"].append({"name": "MASTER_ADDR", "value": "1.2.3.4", "source": "x", "mode": "set"})
    with pytest.raises(SpecError, match=r"MASTER_ADDR is a rendezvous variable that only the launcher sets"):
        apply(_rehash(doc), environ={})


def test_unknown_deferred_kind_is_refused(make_spec: MakeSpec) -> None:
    doc = copy.deepcopy(make_spec(FSDP2).doc)
    doc["deferred"].append({"kind": "warp_drive", "variable": None, "source": "x", "detail": {}})
    with pytest.raises(SpecError, match=r"'warp_drive' is unknown to this bootstrap"):
        apply(_rehash(doc), environ={})


def test_deferred_step_without_its_detail_is_refused(make_spec: MakeSpec) -> None:
    doc = copy.deepcopy(make_spec(ZERO2_COMPILE).doc)
    step = next(d for d in doc["deferred"] if d["kind"] == "bf16_auto")
    del step["detail"]["otherwise"]
    with pytest.raises(SpecError, match=r"spec.deferred\[\d\].detail: bf16_auto needs 'otherwise'"):
        apply(_rehash(doc), environ={})


def test_refusals_are_optimenv_errors(make_spec: MakeSpec) -> None:
    doc = copy.deepcopy(make_spec(FSDP2).doc)
    doc["policy"] = "whoever"
    with pytest.raises(OptimEnvError, match="content hash mismatch"):
        apply(doc, environ={})
    with pytest.raises(OptimEnvError, match="policy must be one of plan-wins, user-wins"):
        apply(_rehash(doc), environ={})
