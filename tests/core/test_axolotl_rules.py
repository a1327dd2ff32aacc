"""Axolotl's own rules for the fields the planner reads, each test citing the source it follows.

Citations are files of ``axolotl-ai-cloud/axolotl`` at 067b021c unless marked 0.19.0:
``validation.py`` = ``src/axolotl/utils/schemas/validation.py``, ``schemas/config.py``,
``utils/config/__init__.py``, ``distributed.py`` = ``src/axolotl/utils/distributed.py``,
``loaders/model.py``, ``plugin.py`` = ``src/axolotl/integrations/expert_parallel/plugin.py``,
``trainer.py`` = ``src/axolotl/utils/trainer.py``. ``C<n>`` are sections of docs/compatibility.md.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from optimenv import parallel
from optimenv.config import parse_config
from optimenv.errors import ConfigError
from optimenv.parallel import Layout, Sizes
from optimenv.plan import Hardware, Plan, check_process_count, plan
from optimenv.steps import ParallelSizes, read_step, to_spec

FSDP2 = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}


def hw(gpus: int, nodes: int = 1) -> Hardware:
    return Hardware(nodes=nodes, gpus_per_node=gpus, bf16_supported=True, torch_version="2.13.0")


def planned(config: dict[str, Any], hardware: Hardware | None = None) -> Plan:
    return plan(parse_config(config), hardware or hw(8))


def refused(config: dict[str, Any], hardware: Hardware | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        planned(config, hardware)
    return info.value


# ---- batch sizes: 0.19.0 check_batch_size_fields (validation.py:222-229), check_gas_bsz (:272-279) ----


def test_batch_size_alone_is_refused_as_axolotl_refuses_it() -> None:
    """0.19.0 validation.py:222-229: batch_size needs micro_batch_size or GAS written beside it."""
    error = refused({"batch_size": 32, "deepspeed": "zero2"})
    assert error.field == "micro_batch_size" and "derives the third" in error.reason


def test_batch_size_with_micro_batch_size_derives_gas() -> None:
    """utils/config/__init__.py:201-207: GAS = batch_size // micro_batch_size (C13)."""
    env = planned({"batch_size": 32, "micro_batch_size": 2, "deepspeed": "zero2"})
    assert env.env_dict["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "16"
    assert env.sources["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "batch_size"


def test_batch_size_with_gas_is_refused() -> None:
    """validation.py:272-279 check_gas_bsz."""
    assert refused({"batch_size": 32, "gradient_accumulation_steps": 2}).field == "batch_size"


# ---- deepspeed: "" is no DeepSpeed (trainer.py:667 tests it for truth) -------------------------------


@pytest.mark.parametrize("value", ["", {}])
def test_empty_deepspeed_means_no_deepspeed(value: Any) -> None:
    """trainer.py:667 `elif cfg.deepspeed:`; validation.py:1226-1229 tests it for truth too."""
    result = planned({"deepspeed": value, "fsdp": ["full_shard"], "fsdp_version": 2})
    assert result.deepspeed is None and "ACCELERATE_USE_DEEPSPEED" not in result.env_dict
    assert result.env_dict["ACCELERATE_USE_FSDP"] == "true"


def test_blank_deepspeed_is_still_refused() -> None:
    """'  ' is truthy in Axolotl and names no file (D11): refused at plan time."""
    assert refused({"deepspeed": "  "}).field == "deepspeed"


# ---- torch_compile_options (schemas/config.py:1617-1656, :2057-2062; enums.py:162-175) -------------


def test_unknown_inductor_option_is_refused_with_a_suggestion() -> None:
    """schemas/config.py:1617-1629: keys outside INDUCTOR_COMPILE_OPTIONS_ALLOWLIST (enums.py:162-175)."""
    error = refused({"torch_compile": True, "torch_compile_options": {"shape_pading": True}})
    assert error.field == "torch_compile_options"
    assert "'shape_pading' not allowed" in error.reason and "did you mean 'shape_padding'?" in error.reason


@pytest.mark.parametrize("compile_", [None, False])
def test_options_need_torch_compile(compile_: bool | None) -> None:
    """schemas/config.py:1631-1640: options without torch_compile, or with torch_compile: false."""
    config: dict[str, Any] = {"torch_compile_options": {"shape_padding": True}}
    if compile_ is not None:
        config["torch_compile"] = compile_
    error = refused(config)
    assert error.field == "torch_compile_options" and "torch_compile is not enabled" in error.reason


def test_allowed_options_plan_and_warn_as_axolotl_warns() -> None:
    """schemas/config.py:1641-1656 (cudagraphs + sample_packing) and :2057-2062 (auto stays off)."""
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    on = planned({"torch_compile": True, "torch_compile_options": options, "sample_packing": True})
    assert on.env_dict["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"
    assert [w for w in on.warnings if w.startswith("torch_compile_options: triton.cudagraphs")]
    off = planned(
        {"torch_compile": "auto", "torch_compile_options": options},
        Hardware(nodes=1, gpus_per_node=8, bf16_supported=True, torch_version="2.4.0"),
    )
    assert "ACCELERATE_DYNAMO_BACKEND" not in off.env_dict
    assert any(w.startswith("torch_compile_options: ignored") for w in off.warnings)


# ---- parallel sizes: Axolotl's loader (distributed.py:320-378) -------------------------------------

# Axolotl's own table (tests/test_loaders.py:181-191 at 067b021c): world, tp, cp, dp_shard,
# dp_replicate -> tp, cp, dp_shard, dp_replicate (0 or 1: not set), all with FSDP.
LOADER_TABLE = [
    (16, 2, 2, 2, 2, (2, 2, 2, 2)),
    (16, 1, 1, None, None, (0, 0, 16, 1)),
    (16, 2, 2, 2, None, (2, 2, 2, 2)),
    (16, 2, 2, None, 2, (2, 2, 2, 2)),
    (16, 1, 1, None, 2, (0, 0, 8, 2)),
    (2, 1, 1, None, None, (0, 0, 2, 1)),
]


@pytest.mark.parametrize(("world", "tp", "cp", "shard", "replicate", "expected"), LOADER_TABLE)
def test_sizes_as_axolotls_loader_infers_them(
    world: int, tp: int, cp: int, shard: int | None, replicate: int | None, expected: tuple[int, ...]
) -> None:
    """distributed.py:320-378 on Axolotl's own test table (C29)."""
    written = Sizes(tp=tp, cp=cp, dp_shard=shard, dp_replicate=replicate)
    layout = Layout(fsdp=True, fsdp_version=2, deepspeed=False, infer=True)
    settled = parallel.settle(written, world, layout, "test")
    got = tuple(settled.sizes[a] for a in ("tp", "cp", "dp_shard", "dp_replicate"))
    if not layout.builds_config(written):
        # Nothing above 1 written: Accelerate builds no ParallelismConfig and FSDP2 shards over every
        # process, which is what the loader's dp_shard_size = world amounts to.
        assert got == (1, 1, 1, 1) and expected[2] == world
        return
    assert got == tuple(max(e, 1) for e in expected)


def test_tensor_parallel_on_four_gpus_infers_dp_shard() -> None:
    """distributed.py:350-353: tp 2 on 4 processes fills dp_shard_size 2 (issue 16's first case)."""
    result = planned({**FSDP2, "tensor_parallel_size": 2}, hw(4))
    assert result.env_dict["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "2"
    assert result.sources["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "dp_shard_size (inferred)"
    assert any(
        w.startswith("dp_shard_size: not set; 2 inferred from the 4 processes") for w in result.warnings
    )


def test_a_written_dp_shard_stands_and_the_rest_is_replicated() -> None:
    """distributed.py:359-369: 16 processes, tp 2, cp 2, dp_shard 2 written: dp_replicate 2, never
    dp_shard 4 (issue 16's second case)."""
    config = {**FSDP2, "tensor_parallel_size": 2, "context_parallel_size": 2, "dp_shard_size": 2}
    env = planned(config, hw(8, nodes=2)).env_dict
    assert (env["PARALLELISM_CONFIG_DP_SHARD_SIZE"], env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"]) == (
        "2",
        "2",
    )


def test_hints_never_propose_a_value_for_a_written_size() -> None:
    """Both data-parallel sizes written and 4 != 8: the hint asks to change them, with no value."""
    error = refused({**FSDP2, "dp_shard_size": 2, "dp_replicate_size": 2})
    assert error.field == "dp_shard_size" and "set dp_shard_size" not in str(error)
    assert "change the sizes you wrote (dp_shard_size 2 x dp_replicate_size 2)" in str(error)
    # A size not written may be proposed: DeepSpeed builds no loader mesh without TP / CP
    # (loaders/model.py:207-219), so dp_shard_size 2 alone needs its replicas written.
    error = refused({"deepspeed": "zero2", "dp_shard_size": 2})
    assert "(set dp_replicate_size to 4 so the sizes multiply to the 8 processes)" in str(error)


def test_fsdp1_builds_no_mesh_and_accelerate_refuses_its_sizes() -> None:
    """loaders/model.py:216-217 (FSDP1: no loader mesh); accelerate parallelism_config.py:390-397."""
    error = refused({"fsdp_version": 1, "fsdp_config": {"offload_params": True}, "dp_shard_size": 4}, hw(4))
    assert error.field == "dp_shard_size" and error.hint == "set fsdp_version: 2"


def test_context_parallelism_may_stand_alone_on_fsdp1() -> None:
    """Axolotl's patched _validate_accelerator allows CP without dp_shard (parallelism_config.py:117-125 of
    src/axolotl/monkeypatch/accelerate) when ACCELERATE_ALLOW_CP_STANDALONE is set (trainer.py:636-642)."""
    result = planned(
        {"fsdp_version": 1, "fsdp_config": {"offload_params": True}, "context_parallel_size": 2}, hw(2)
    )
    assert result.env_dict["PARALLELISM_CONFIG_CP_SIZE"] == "2"


@pytest.mark.parametrize(
    ("config", "gpus", "field"),
    [
        ({"expert_parallel_size": 2}, 4, "expert_parallel_size"),  # plugin.py:282-290, issue 16
        (
            {"expert_parallel_size": 2, "dp_shard_size": 2, "tensor_parallel_size": 2},
            8,
            "expert_parallel_size",
        ),
    ],
    ids=["ep-alone-below-world", "ep-with-tp"],
)
def test_expert_parallelism_as_the_plugin_checks_it(config: dict[str, Any], gpus: int, field: str) -> None:
    """plugin.py:272-340 (C30): product, unfilled ranks, and EP x TP."""
    assert refused({**FSDP2, **config}, hw(gpus)).field == field


def test_expert_parallelism_that_fits_plans() -> None:
    """plugin.py:292-293 (pure EP: ep == world) and :301-320 (EP x dp_shard)."""
    pure = planned({**FSDP2, "expert_parallel_size": 4}, hw(4)).env_dict
    assert pure["PARALLELISM_CONFIG_EP_SIZE"] == "4" and "ACCELERATE_USE_PARALLELISM_CONFIG" not in pure
    composed = planned({**FSDP2, "expert_parallel_size": 2, "dp_shard_size": 2}, hw(4)).env_dict
    assert composed["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    assert "PARALLELISM_CONFIG_DP_REPLICATE_SIZE" not in composed
    # One process: the plugin returns before its checks (plugin.py:465-466).
    assert "PARALLELISM_CONFIG_EP_SIZE" in planned({**FSDP2, "expert_parallel_size": 2}, hw(1)).env_dict


def test_unknown_process_count_defers_the_inference_to_the_worker() -> None:
    """C29, C17: the parallel_sizes step carries what the worker needs; settled for a process count,
    it decides as planning with that count does."""
    config = {**FSDP2, "tensor_parallel_size": 2}
    result = plan(parse_config(config), Hardware())
    [step] = [d for d in result.deferred if isinstance(d, ParallelSizes)]
    detail = to_spec(step)["detail"]
    assert detail["written"] == {"tp": 2, "cp": 1, "dp_shard": None, "dp_replicate": None, "ep": 1}
    assert detail["layout"]["infer"] is True and detail["layout"]["fsdp_version"] == 2
    # What the worker reads back from the spec is the step the planner made.
    assert read_step(json.loads(json.dumps(to_spec(step))), 0) == step
    assert parallel.settle(step.written, 4, step.layout, "4").inferred == {"dp_shard": 2}
    check_process_count(result, 4, "a job of 4")
    with pytest.raises(ConfigError, match="which does not divide the 3 processes"):
        check_process_count(result, 3, "a job of 3")


def test_a_plan_for_one_process_count_is_refused_for_another() -> None:
    """Rendering checks the job's process count (C28): sizes inferred for 4 do not fit 8."""
    result = planned({**FSDP2, "tensor_parallel_size": 2}, hw(4))
    check_process_count(result, 4, "a job of 4")
    with pytest.raises(ConfigError, match="inferred sizes for another process count"):
        check_process_count(result, 8, "a job of 8")


def test_sizes_that_do_not_divide_the_processes_are_named() -> None:
    """distributed.py divides without checking (:342-347); no inferred size can fit 16 / 3."""
    error = refused({"tensor_parallel_size": 3}, hw(8, nodes=2))
    assert (
        error.field == "tensor_parallel_size"
        and "multiply to 3, which does not divide the 16" in error.reason
    )


# ---- AutoTP and DeepCompile: only what the JSON lacks (validation.py:1156-1206, C23) ------------------


def test_autotp_keeps_what_the_json_says() -> None:
    """validation.py:1163-1176: tensor_parallel added only without a section, gather only if missing."""
    json_ = {"zero_optimization": {"stage": 2, "gather_16bit_weights_on_model_save": False}}
    result = planned({"deepspeed": json_, "tensor_parallel_size": 2}, hw(2))
    assert result.deepspeed is not None
    assert result.deepspeed["tensor_parallel"] == {"autotp_size": 2}
    assert result.deepspeed["zero_optimization"]["gather_16bit_weights_on_model_save"] is False


def test_autotp_size_contradicting_tensor_parallel_size_is_refused() -> None:
    json_ = {"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 4}}
    assert (
        refused({"deepspeed": json_, "tensor_parallel_size": 2}, hw(2)).field
        == "deepspeed.tensor_parallel.autotp_size"
    )


def test_deepcompile_fills_a_compile_section_and_refuses_a_contradiction() -> None:
    """validation.py:1195-1198 adds compile only without one; a section without deepcompile gets it."""
    json_ = {"zero_optimization": {"stage": 2}, "compile": {"backend": "inductor"}}
    result = planned({"deepspeed": json_, "deepcompile": True})
    assert result.deepspeed is not None
    assert result.deepspeed["compile"] == {"backend": "inductor", "deepcompile": True}
    json_["compile"] = {"deepcompile": False}
    assert refused({"deepspeed": json_, "deepcompile": True}).field == "deepspeed.compile.deepcompile"


# ---- FSDP keys Accelerate reads and Axolotl's schema drops (schemas/fsdp.py:10-90, C2) -----------------


def test_activation_checkpointing_offload_and_ignored_modules_are_exported() -> None:
    keys = {
        "activation_checkpointing": True,
        "activation_checkpointing_offload": True,
        "ignored_modules": "lm_head",
    }
    env = planned({"fsdp_version": 2, "fsdp_config": keys}).env_dict
    assert env["FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"] == "true" and env["FSDP_IGNORED_MODULES"] == "lm_head"


@pytest.mark.parametrize(
    ("version", "keys"),
    [
        (2, {"activation_checkpointing_offload": True}),
        (1, {"activation_checkpointing": True, "activation_checkpointing_offload": True}),
    ],
    ids=["without-activation-checkpointing", "fsdp1"],
)
def test_activation_checkpointing_offload_needs_what_accelerate_needs(
    version: int, keys: dict[str, Any]
) -> None:
    """Accelerate's FullyShardedDataParallelPlugin refuses both (utils/dataclasses.py:1963-1970)."""
    error = refused({"fsdp_version": version, "fsdp_config": keys})
    assert error.field == "fsdp_config.activation_checkpointing_offload"


def test_fp8_with_fsdp_activation_checkpointing_warns() -> None:
    """validation.py:426-452 check_fp8_config (the warning at :434-441)."""
    config = {
        "fp8": True,
        "torch_compile": True,
        "fsdp_version": 2,
        "fsdp_config": {"activation_checkpointing": True},
    }
    hardware = Hardware(
        nodes=1, gpus_per_node=8, bf16_supported=True, fp8_supported=True, torch_version="2.13.0"
    )
    assert any(
        w.startswith("fp8: with FSDP activation checkpointing") for w in planned(config, hardware).warnings
    )
