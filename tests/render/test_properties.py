"""Property: for random valid configs and options, rendering is valid and byte-for-byte repeatable."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from optimenv.config import parse_config
from optimenv.errors import ConfigError
from optimenv.plan import Hardware, plan
from optimenv.render import TARGETS, JobOptions, render
from optimenv.render.cli import to_json, to_yaml
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
def options(draw: st.DrawFn) -> JobOptions:
    return JobOptions(
        name=draw(NAME),
        namespace=draw(st.sampled_from(["default", "ml", "team-a"])),
        image=draw(st.sampled_from(["img:1", "registry.example.com/org/train@sha256:" + "a" * 64])),
        command=(
            "python",
            "train.py",
            *draw(st.lists(st.text("abc-=./ $'\"()", min_size=1, max_size=8), max_size=3)),
        ),
        nodes=draw(st.integers(1, 4)),
        gpus_per_node=draw(st.sampled_from([1, 2, 4, 8])),
        service_account=draw(st.sampled_from([None, "trainer"])),
        node_selector=draw(
            st.dictionaries(st.sampled_from(["pool", "example.com/gpu"]), LABEL_VALUE, max_size=2)
        ),
        tolerations=draw(
            st.sampled_from([(), ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)])
        ),
        labels=draw(st.dictionaries(st.sampled_from(["team", "example.com/owner"]), LABEL_VALUE, max_size=2)),
        spec_policy=draw(st.sampled_from(["plan-wins", "user-wins"])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), opts=options(), target=st.sampled_from(TARGETS), bf16=st.sampled_from([None, True]))
def test_random_renders_are_valid_and_deterministic(
    validator: Validator, cfg: dict[str, Any], opts: JobOptions, target: str, bf16: bool | None
) -> None:
    try:
        planned = plan(parse_config(cfg), Hardware(opts.nodes, opts.gpus_per_node, bf16_supported=bf16))
        objects = render(planned, target, opts)
    except ConfigError as exc:
        # Only the refusals the strategies can provoke: sizes that don't fit, names too long.
        assert str(exc).startswith(("dp_shard_size:", "tensor_parallel_size:", "name:")), str(exc)
        assume(False)
        return
    validator.validate_all(objects)
    again = render(
        plan(parse_config(cfg), Hardware(opts.nodes, opts.gpus_per_node, bf16_supported=bf16)), target, opts
    )
    assert to_yaml(objects) == to_yaml(again)
    assert to_json(objects) == to_json(again)
