"""Property: for random valid configs and options, rendering is valid and byte-for-byte repeatable."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from optimenv.compiler import compile
from optimenv.config import parse_config
from optimenv.errors import ConfigError
from optimenv.workload import TARGETS, JobSpec, Target, Topology
from tests.render.validators import Validator

NAME = st.from_regex(r"\A[a-z][a-z0-9-]{0,30}[a-z0-9]\Z")
LABEL_VALUE = st.from_regex(r"\A[a-z0-9]([a-z0-9._-]{0,10}[a-z0-9])?\Z")


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "micro_batch_size": draw(st.integers(1, 8)),
        "gradient_accumulation_steps": draw(st.integers(1, 8)),
        "bf16": draw(st.sampled_from([True, False, "auto"])),
    }
    if draw(st.booleans()):
        cfg["ddp_timeout"] = draw(st.integers(60, 7200))
    engine = draw(st.sampled_from(["none", "fsdp1", "fsdp2", "zero1", "zero2", "zero3", "zero3_offload_all"]))
    if engine.startswith("fsdp"):
        cfg["fsdp_version"] = 2 if engine == "fsdp2" else 1
        cfg["fsdp_config"] = {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": draw(
                st.sampled_from(["LlamaDecoderLayer", "Qwen2DecoderLayer"])
            ),
            "state_dict_type": draw(st.sampled_from(["SHARDED_STATE_DICT", "FULL_STATE_DICT"])),
            "activation_checkpointing": draw(st.booleans()),
            "reshard_after_forward": draw(st.booleans()),
        }
        if engine == "fsdp2":
            cfg["dp_shard_size"] = draw(st.sampled_from([None, 1, 2, 4]))
            cfg["tensor_parallel_size"] = draw(st.sampled_from([None, 1, 2]))
    elif engine != "none":
        cfg["deepspeed"] = engine
    return {k: v for k, v in cfg.items() if v is not None}


@st.composite
def options(draw: st.DrawFn) -> dict[str, Any]:
    """compile()'s keyword arguments, the job's fields under "job" and the topology's under "topology"."""
    return {
        "name": draw(NAME),
        "namespace": draw(st.sampled_from(["default", "ml", "team-a"])),
        "labels": draw(
            st.dictionaries(st.sampled_from(["team", "example.com/owner"]), LABEL_VALUE, max_size=2)
        ),
        "policy": draw(st.sampled_from(["plan-wins", "user-wins"])),
        "topology": {"nodes": draw(st.integers(1, 4)), "gpus_per_node": draw(st.sampled_from([1, 2, 4, 8]))},
        "job": {
            "image": draw(st.sampled_from(["img:1", "registry.example.com/org/train@sha256:" + "a" * 64])),
            "command": [
                "python",
                "train.py",
                *draw(st.lists(st.text("abc-=./ $'\"()", min_size=1, max_size=8), max_size=3)),
            ],
            "service_account": draw(st.sampled_from([None, "trainer"])),
            "node_selector": draw(
                st.dictionaries(st.sampled_from(["pool", "example.com/gpu"]), LABEL_VALUE, max_size=2)
            ),
            "tolerations": draw(
                st.sampled_from(
                    [[], [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]]
                )
            ),
        },
    }


def _compile(cfg: dict[str, Any], opts: dict[str, Any], target: Target, bf16: bool | None) -> tuple[str, str]:
    job: Target | JobSpec = target if target == "configmaps" else JobSpec(target=target, **opts["job"])
    rest = {k: v for k, v in opts.items() if k not in ("job", "topology")}
    done = compile(parse_config(cfg), Topology(**opts["topology"], bf16_supported=bf16), job, **rest)
    return done.to_yaml(), done.to_json()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), opts=options(), target=st.sampled_from(TARGETS), bf16=st.sampled_from([None, True]))
def test_random_renders_are_valid_and_deterministic(
    validator: Validator, cfg: dict[str, Any], opts: dict[str, Any], target: Target, bf16: bool | None
) -> None:
    try:
        first = _compile(cfg, opts, target, bf16)
    except ConfigError as exc:
        # Only the refusals the strategies can provoke: sizes that don't fit, names too long.
        assert str(exc).startswith(("dp_shard_size:", "tensor_parallel_size:", "name:")), str(exc)
        assume(False)
        return
    validator.validate_all(json.loads(first[1])["items"])
    assert _compile(cfg, opts, target, bf16) == first
