"""Properties of the planner over random configs.

Random mixtures of the keys we own (and some Axolotl keys our validators read), each with a
plausible value most of the time and anything at all otherwise, plus random ``fsdp_config`` keys
with and without the ``fsdp_`` prefix. Whatever the input, parsing and planning either succeed or
raise our own error type; a plan that succeeds is deterministic and well-formed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimenv.config import parse_config, parse_yaml
from optimenv.deepspeed import PRESETS
from optimenv.errors import OptimEnvError
from optimenv.plan import Hardware, Plan, plan

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Base folder for relative DeepSpeed paths: holds one valid file and one that is not JSON.
DS_DIR = Path(__file__).resolve().parent / "_property_files"

WORDS = st.sampled_from(
    [
        "auto", "true", "false", "FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "full_shard",
        "TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "transformer_based_wrap", "NO_WRAP",
        "FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT", "BACKWARD_PRE", "NO_PREFETCH",
        "LlamaDecoderLayer", "A, B", "inductor", "eager", "zero3", "3", "1", "", " ", "\x00", "None",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.dates(),  # YAML turns 2024-01-01 into a date, which JSON cannot hold
    WORDS,
)
ANYTHING = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
SIZES = st.integers(min_value=1, max_value=8)
BOOL = st.booleans()

FSDP_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "version": st.sampled_from([1, 2]),
    "fsdp_version": st.sampled_from([1, 2, "2"]),
    "activation_checkpointing": BOOL,
    "offload_params": BOOL,
    "sync_module_states": BOOL,
    "cpu_ram_efficient_loading": BOOL,
    "cpu_offload_pin_memory": BOOL,
    "use_orig_params": BOOL,
    "state_dict_type": st.sampled_from(["FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"]),
    "final_state_dict_type": st.sampled_from(["FULL_STATE_DICT", "SHARDED_STATE_DICT"]),
    "auto_wrap_policy": st.sampled_from(["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "size_based_wrap"]),
    "transformer_layer_cls_to_wrap": st.sampled_from(["LlamaDecoderLayer", "A,B", ["A", "B"], "A, B"]),
    "min_num_params": st.integers(min_value=1, max_value=10**9),
    "reshard_after_forward": BOOL,
    "mixed_precision_policy": st.sampled_from(["bf16", "fp32"]),
    "sharding_strategy": st.sampled_from(["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", 1, "2"]),
    "backward_prefetch": st.sampled_from(["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"]),
    "forward_prefetch": BOOL,
    "limit_all_gathers": BOOL,
}

DEEPSPEED = st.one_of(
    st.sampled_from(sorted(PRESETS)),
    st.sampled_from(
        ["valid_ds.json", "broken_ds.json", "missing.json", "/nonexistent/ds.json", "", "d" * 300]
    ),
    st.text(max_size=20),
    st.fixed_dictionaries(
        {
            "zero_optimization": st.fixed_dictionaries(
                {"stage": st.sampled_from([0, 1, 2, 3, "3", "auto", 7])}
            )
        },
        optional={
            "bf16": st.fixed_dictionaries({"enabled": st.sampled_from([True, False, "auto"])}),
            "fp16": st.fixed_dictionaries({"enabled": st.sampled_from([True, False, "auto"])}),
            "gradient_accumulation_steps": st.sampled_from(["auto", 2]),
        },
    ),
)

TOP_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "fsdp": st.lists(
        st.sampled_from(["full_shard", "shard_grad_op", "hybrid_shard", "offload", "auto_wrap"]), max_size=3
    ),
    "fsdp_version": st.sampled_from([1, 2]),
    "deepspeed": DEEPSPEED,
    "deepcompile": BOOL,
    "bf16": st.sampled_from([True, False, "auto"]),
    "fp16": BOOL,
    "fp8": BOOL,
    "fp8_enable_fsdp_float8_all_gather": BOOL,
    "tf32": st.sampled_from([True, False, "auto"]),
    "torch_compile": st.sampled_from([True, False, "auto"]),
    "torch_compile_backend": st.sampled_from(["inductor", "eager", "cudagraphs"]),
    "tensor_parallel_size": SIZES,
    "dp_shard_size": SIZES,
    "dp_replicate_size": SIZES,
    "context_parallel_size": SIZES,
    "sequence_parallel_degree": SIZES,
    "expert_parallel_size": SIZES,
    "gradient_accumulation_steps": SIZES,
    "micro_batch_size": SIZES,
    "batch_size": st.integers(min_value=1, max_value=64),
    "ddp_timeout": st.integers(min_value=1, max_value=10**5),
    "use_ray": BOOL,
    "ray_num_workers": SIZES,
    "resources_per_worker": st.fixed_dictionaries({"GPU": st.sampled_from([1, 1.0, 0.5])}),
    # Keys we do not own but whose values Axolotl's validators read.
    "optimizer": st.sampled_from(["adamw_torch", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"]),
    "load_in_4bit": BOOL,
    "sample_packing": BOOL,
    "adapter": st.sampled_from(["lora", "qlora"]),
    "lora_mlp_kernel": BOOL,
    "gradient_checkpointing_kwargs": st.fixed_dictionaries({"use_reentrant": BOOL}),
    "base_model": st.just("meta-llama/Llama-3.2-1B"),
}


def _value(draw: st.DrawFn, plausible: st.SearchStrategy[Any]) -> Any:
    # Mostly plausible values, so that a good share of the examples plan successfully.
    return draw(plausible) if draw(st.integers(0, 9)) < 8 else draw(ANYTHING)


@st.composite
def fsdp_configs(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(ANYTHING)
    keys = draw(st.lists(st.sampled_from(sorted(FSDP_VALUES)), max_size=6, unique=True))
    out: dict[Any, Any] = {}
    for key in keys:
        spelled = f"fsdp_{key}" if key != "fsdp_version" and draw(st.booleans()) else key
        out[spelled] = _value(draw, FSDP_VALUES[key])
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=12))] = draw(SCALARS)  # an unknown (often misspelt) key
    return out


@st.composite
def configs(draw: st.DrawFn) -> dict[Any, Any]:
    keys = draw(st.lists(st.sampled_from([*TOP_VALUES, "fsdp_config"]), max_size=8, unique=True))
    out: dict[Any, Any] = {}
    for key in keys:
        out[key] = draw(fsdp_configs()) if key == "fsdp_config" else _value(draw, TOP_VALUES[key])
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(max_size=8))] = draw(ANYTHING)  # keys we do not own are kept as they are
    return out


HARDWARE = st.builds(
    Hardware,
    nodes=st.none() | st.integers(1, 4),
    gpus_per_node=st.none() | st.integers(1, 8),
    bf16_supported=st.none() | st.booleans(),
    fp8_supported=st.none() | st.booleans(),
    torch_version=st.none() | st.sampled_from(["2.4.0", "2.5.1", "2.7.0+cu126", "2.13.0"]),
)

ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def _plan(data: Any, hardware: Hardware) -> Plan | None:
    """Parse and plan; None when refused with our error. Anything else propagates and fails the test."""
    try:
        return plan(parse_config(data, base_dirs=(DS_DIR,)), hardware, deepspeed_path="/etc/ds/ds.json")
    except OptimEnvError as exc:
        assert "\n" not in str(exc)
        return None


def _check_well_formed(result: Plan) -> None:
    names = [v.name for v in result.env]
    assert len(names) == len(set(names))
    for var in result.env:
        assert ENV_NAME.fullmatch(var.name), var
        assert isinstance(var.value, str), var
        assert isinstance(var.source, str) and var.source, var
    for step in result.deferred:
        assert step.source, step
    document = json.loads(result.to_json())
    assert list(document) == ["env", "sources", "deferred", "deepspeed", "warnings"]
    assert list(document["sources"]) == list(document["env"])
    if result.deepspeed is not None:
        assert result.env_dict["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "/etc/ds/ds.json"


# Counted across examples, so the run also shows that both branches were exercised.
OUTCOMES = {"planned": 0, "refused": 0}


@SETTINGS
@given(data=configs(), hardware=HARDWARE)
def test_random_configs_plan_or_raise_our_error(data: dict[Any, Any], hardware: Hardware) -> None:
    first = _plan(data, hardware)
    if first is None:
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["planned"] += 1
    _check_well_formed(first)
    again = _plan(data, hardware)
    assert again is not None
    assert again.to_json() == first.to_json()
    assert again == first


def test_both_outcomes_were_exercised() -> None:
    # Runs after the property in file order; without it, a generator that only ever produced
    # refused configs would make the determinism checks vacuous.
    if OUTCOMES["planned"] + OUTCOMES["refused"] == 0:
        test_random_configs_plan_or_raise_our_error()
    assert OUTCOMES["planned"] >= 20, OUTCOMES
    assert OUTCOMES["refused"] >= 20, OUTCOMES


@SETTINGS
@given(data=configs())
def test_yaml_text_of_random_configs(data: dict[Any, Any]) -> None:
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    try:
        parsed = parse_yaml(text)
    except OptimEnvError:
        return
    _plan(parsed, Hardware())


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text_is_yaml_or_our_error(text: str) -> None:
    try:
        parsed = parse_yaml(text)
    except OptimEnvError as exc:
        assert str(exc).startswith("config: ")
        return
    _plan(parsed, Hardware())


@SETTINGS
@given(
    value=st.one_of(
        st.text(max_size=40),
        st.text(alphabet="ab/.", min_size=250, max_size=600),  # longer than a file name may be
        DEEPSPEED,
        ANYTHING,
    )
)
def test_random_deepspeed_values(value: Any) -> None:
    result = _plan({"deepspeed": value}, Hardware())
    if result is not None:
        _check_well_formed(result)
        # Axolotl tests `cfg.deepspeed` for truth (trainer.py:667): "" and {} are no DeepSpeed.
        assert (result.deepspeed is None) == (value in (None, "", {}))
