"""The deferred steps (:mod:`optimenv.steps`): one typed definition per kind, read back from a spec
field by field, and decided on a worker by the planner's own rules.

A :class:`~tests.machine.Machine` stands for a worker with GPUs (this machine has none), so every
branch of every decision is taken; ``tests/bootstrap`` applies real specs with the real probe.
"""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

import pytest

from optimenv.config import parse_config
from optimenv.errors import ConfigError
from optimenv.plan import Hardware, Plan, plan
from optimenv.spec import BootstrapError, DeferredKind, SpecError
from optimenv.steps import (
    BY_KIND,
    SINGLE_GPU_DEFAULTS,
    Bf16Auto,
    Decision,
    DeepSpeedZero3Config,
    NcclP2PCheck,
    ParallelSizes,
    RequireFp8,
    Setting,
    SingleGpuRendezvousDefaults,
    TorchCompileAuto,
    Worker,
    read_step,
    to_spec,
)
from tests.machine import Machine

FSDP2_TP = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}, "tensor_parallel_size": 2}
# Between them, with the hardware unknown, the two plans defer a step of every kind.
CONFIGS = ({"deepspeed": "zero3", "torch_compile": "auto"}, {"fp8": True, **FSDP2_TP})
# Detail fields a spec may leave out: older planners did not write them.
OPTIONAL = {("bf16_auto", "without_gpu"), ("bf16_auto", "deepspeed_requires")}


def _planned() -> list[Plan]:
    return [plan(parse_config(config), Hardware()) for config in CONFIGS]


def _wire(step: Any) -> dict[str, Any]:
    """The step as a worker reads it: the spec's JSON."""
    return json.loads(json.dumps(to_spec(step)))  # type: ignore[no-any-return]


def test_every_kind_has_one_definition_and_the_planner_uses_each() -> None:
    assert set(BY_KIND) == set(get_args(DeferredKind))
    assert {step.kind for result in _planned() for step in result.deferred} == set(BY_KIND)
    for kind, definition in BY_KIND.items():
        assert definition._field_defaults["kind"] == kind


def test_what_the_planner_wrote_is_what_the_worker_reads() -> None:
    for result in _planned():
        for index, step in enumerate(result.deferred):
            assert read_step(_wire(step), index) == step, step.kind


def test_every_detail_field_has_a_reader() -> None:
    """Leaving out a field is refused (unless older specs lacked it), and so is a field no one reads."""
    for result in _planned():
        for step in result.deferred:
            wire = _wire(step)
            for key in wire["detail"]:
                without = copy.deepcopy(wire)
                del without["detail"][key]
                if (step.kind, key) in OPTIONAL:
                    assert read_step(without, 0) == step._replace(**{key: None}), key
                else:
                    needs = rf"spec\.deferred\[0\]\.detail: {step.kind} needs '{key}'"
                    with pytest.raises(SpecError, match=needs):
                        read_step(without, 0)
            extra = {**wire, "detail": {**wire["detail"], "zz_new": 1}}
            with pytest.raises(SpecError, match=r"detail\.zz_new: unknown to this bootstrap's"):
                read_step(extra, 0)


def test_a_zero3_step_rendered_with_its_path_is_still_read() -> None:
    """Specs of optimenv.dev/v1alpha1 rendered before the step lost ``path`` (the spec's deepspeedPath)."""
    old = {"kind": "deepspeed_zero3_config", "variable": None, "source": "deepspeed.zero_optimization.stage"}
    step = read_step({**old, "detail": {"path": "/etc/optimenv/deepspeed.json"}}, 3)
    assert step == DeepSpeedZero3Config()
    assert to_spec(step)["detail"] == {}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"kind": "bf16_auto", "detail": {"otherwise": 1, "if_supported": "bf16"}},
            r"detail\.otherwise: must be a string",
        ),
        (
            {"kind": "single_gpu_rendezvous_defaults", "detail": {"defaults": {"HOME": "/"}}},
            "rendezvous variables only",
        ),
        ({"kind": "deepspeed_zero3_config", "variable": "X", "detail": {}}, "sets no single variable"),
        ({"kind": ["bf16_auto"], "detail": {}}, r"kind: \['bf16_auto'\] is unknown"),
        ({"kind": "nccl_p2p_check", "source": 1, "detail": {}}, "source a string"),
    ],
    ids=["wrong-type", "not-rendezvous", "variable-of-none", "unhashable-kind", "source"],
)
def test_malformed_steps_are_one_line(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        read_step(entry, 0)
    assert "\n" not in str(info.value)


def _decide(step: Any, machine: Machine, **environ: str) -> tuple[Decision, tuple[Setting, ...]]:
    decided: tuple[Decision, tuple[Setting, ...]] = step.decide(Worker(environ, machine))
    return decided


@pytest.mark.parametrize(
    ("machine", "value"),
    [(Machine(bf16=True), "bf16"), (Machine(bf16=False), "fp16"), (Machine(gpus=0), "no")],
    ids=["bf16-gpu", "older-gpu", "no-gpu"],
)
def test_bf16_auto_resolves_as_the_planner_would(machine: Machine, value: str) -> None:
    """The worker's answer is the planner's, told the same GPU (C14); without a GPU, fp32."""
    config = parse_config({"bf16": "auto"})
    (step,) = [d for d in plan(config, Hardware()).deferred if isinstance(d, Bf16Auto)]
    decision, sets = _decide(step, machine)
    assert (decision.value, sets) == (value, (Setting("ACCELERATE_MIXED_PRECISION", value, "bf16"),))
    if machine.gpus:
        known = plan(config, Hardware(bf16_supported=machine.bf16)).env_dict
        assert known["ACCELERATE_MIXED_PRECISION"] == value


def test_bf16_auto_refuses_what_the_deepspeed_json_hard_codes() -> None:
    step = Bf16Auto("fp16", without_gpu="no", deepspeed_requires="bf16")
    assert _decide(step, Machine(bf16=True))[0].value == "bf16"
    with pytest.raises(BootstrapError, match=r"bf16: auto resolves to 'fp16' on this worker .* bf16.enabled"):
        _decide(step, Machine(bf16=False))


def test_the_planner_refuses_a_json_that_hard_codes_both_precisions() -> None:
    """No worker could match both: refused when planned, not on every worker."""
    both = {"bf16": "auto", "deepspeed": {"bf16": {"enabled": True}, "fp16": {"enabled": True}}}
    with pytest.raises(
        ConfigError, match=r"deepspeed\.fp16\.enabled: is true in the DeepSpeed JSON together"
    ):
        plan(parse_config(both), Hardware())


@pytest.mark.parametrize("torch", ["2.5.1", "2.5.1+cu124", "2.5.1rc1", "2.4.1"])
def test_torch_compile_auto_reads_versions_as_the_planner(torch: str) -> None:
    config = parse_config({"torch_compile": "auto"})
    (step,) = [d for d in plan(config, Hardware()).deferred if isinstance(d, TorchCompileAuto)]
    decision, sets = _decide(step, Machine(torch=torch))
    known = plan(config, Hardware(torch_version=torch)).env_dict.get("ACCELERATE_DYNAMO_BACKEND")
    assert decision.value == known and [s.value for s in sets] == ([known] if known else [])


def test_require_fp8_needs_compute_capability_8_9() -> None:
    assert _decide(RequireFp8(), Machine(capability=(8, 9)))[1] == ()
    for machine in (Machine(capability=(8, 0)), Machine(gpus=0)):
        with pytest.raises(BootstrapError, match="fp8: requested, but this worker cannot run it"):
            _decide(RequireFp8(), machine)


def test_nccl_p2p_check() -> None:
    step = NcclP2PCheck()
    assert _decide(step, Machine(p2p=False))[1] == (Setting("NCCL_P2P_DISABLE", "1", "default"),)
    assert _decide(step, Machine(p2p=True))[1] == ()
    assert _decide(step, Machine(p2p=False), LOCAL_WORLD_SIZE="1")[1] == ()  # one local process
    decision, sets = _decide(step, Machine(p2p=False), NCCL_P2P_DISABLE="0")  # the operator's value stands
    assert sets == () and decision.reason == "NCCL_P2P_DISABLE already set by the environment"


def test_single_gpu_defaults_only_on_one_gpu_without_a_launcher() -> None:
    step = SingleGpuRendezvousDefaults()
    _, sets = _decide(step, Machine(gpus=1))
    expected = {name: (value, "default") for name, value in SINGLE_GPU_DEFAULTS.items()}
    assert {s.name: (s.value, s.mode) for s in sets} == expected
    assert _decide(step, Machine(gpus=2))[1] == ()
    assert _decide(step, Machine(gpus=1), WORLD_SIZE="2")[1] == ()


def test_zero3_config_is_held_only_by_a_process_that_trains() -> None:
    step = DeepSpeedZero3Config()
    assert step.holds_config(Worker({}, Machine(), True, "/ds.json"))
    assert not step.holds_config(Worker({}, Machine(), False, "/ds.json"))
    assert "exec mode" in step.decide(Worker({}, Machine(), False, "/ds.json"))[0].reason
    with pytest.raises(
        SpecError, match=r"spec\.deepspeed: deepspeed_zero3_config needs the spec's DeepSpeed"
    ):
        step.decide(Worker({}, Machine(), True, None))


@pytest.mark.parametrize("world", [2, 4, 8, 3])
def test_parallel_sizes_settle_as_planning_with_the_process_count(world: int) -> None:
    config = parse_config(FSDP2_TP)
    (step,) = [d for d in plan(config, Hardware()).deferred if isinstance(d, ParallelSizes)]
    try:
        known = plan(config, Hardware(nodes=1, gpus_per_node=world)).env_dict
    except ConfigError as refused:
        with pytest.raises(BootstrapError) as info:
            _decide(step, Machine(), WORLD_SIZE=str(world))
        assert str(info.value) == str(refused).replace(f"1 node(s) x {world}", f"WORLD_SIZE={world}")
        return
    _, sets = _decide(step, Machine(), WORLD_SIZE=str(world))
    written = plan(config).env_dict
    inferred = {
        name: value for name, value in known.items() if name.endswith("_SIZE") and name not in written
    }
    assert {s.name: s.value for s in sets} == inferred
