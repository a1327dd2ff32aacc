"""The real Accelerate contract: a process that sees exactly a plan's env gets what the config asked for.

Each scenario is planned here, then a fresh interpreter is started with only the planned variables
(plus PATH and HOME) and the DeepSpeed JSON written where ``ACCELERATE_DEEPSPEED_CONFIG_FILE``
points. ``_accelerate_probe.py`` builds Accelerate's plugins and ``AcceleratorState`` from that
environment (and transformers' ZeRO-3 config for the deferred step) and reports what they parsed.
The expected values below are written from the configs, not from the plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from optimenv.config import parse_config
from optimenv.plan import Hardware, Plan, plan

pytestmark = pytest.mark.slow

PROBE = Path(__file__).with_name("_accelerate_probe.py")
BIG = Hardware(nodes=2, gpus_per_node=8, bf16_supported=True)

ZERO2_FILE = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}


@dataclass(frozen=True)
class Scenario:
    config: dict[str, Any]
    hardware: Hardware
    expected: dict[str, dict[str, Any]]


SCENARIOS: dict[str, Scenario] = {
    "fsdp1_transformer_wrap_bf16": Scenario(
        config={
            "base_model": "meta-llama/Llama-3.2-1B",
            "bf16": True,
            "fsdp_version": 1,
            # The prefixed spelling Axolotl's own examples use.
            "fsdp_config": {
                "fsdp_sharding_strategy": "SHARD_GRAD_OP",
                "fsdp_offload_params": True,
                "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer, MistralDecoderLayer",
                "fsdp_activation_checkpointing": True,
                "fsdp_use_orig_params": True,
                "fsdp_sync_module_states": True,
                "fsdp_cpu_ram_efficient_loading": True,
                "fsdp_backward_prefetch": "BACKWARD_PRE",
                "fsdp_forward_prefetch": True,
            },
        },
        hardware=BIG,
        expected={
            "fsdp": {
                "fsdp_version": 1,
                "sharding_strategy": "SHARD_GRAD_OP",
                "auto_wrap_policy": "transformer_auto_wrap_policy",
                "transformer_cls_names_to_wrap": ["LlamaDecoderLayer", "MistralDecoderLayer"],
                "state_dict_type": "FULL_STATE_DICT",
                "offload_params": True,
                "activation_checkpointing": True,
                "use_orig_params": True,
                "sync_module_states": True,
                "cpu_ram_efficient_loading": True,
                "backward_prefetch": "BACKWARD_PRE",
                "forward_prefetch": True,
                "param_dtype": "torch.bfloat16",
            },
            "state": {"mixed_precision": "bf16", "dynamo_backend": "NO"},
        },
    ),
    "fsdp2_no_reshard_offload_bf16": Scenario(
        config={
            "bf16": True,
            "torch_compile": True,
            "fsdp_version": 2,
            "fsdp_config": {
                # Axolotl drops a false reshard_after_forward; Accelerate's FSDP2 default is true.
                "reshard_after_forward": False,
                "offload_params": True,
                "cpu_offload_pin_memory": False,
                "state_dict_type": "FULL_STATE_DICT",
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"],
                "activation_checkpointing": True,
                "cpu_ram_efficient_loading": True,
            },
        },
        hardware=BIG,
        expected={
            "fsdp": {
                "fsdp_version": 2,
                "reshard_after_forward": False,
                "auto_wrap_policy": "transformer_auto_wrap_policy",
                "transformer_cls_names_to_wrap": ["Qwen3DecoderLayer"],
                "state_dict_type": "FULL_STATE_DICT",
                "offload_params": True,
                "activation_checkpointing": True,
                "cpu_ram_efficient_loading": True,
                "param_dtype": "torch.bfloat16",
            },
            "state": {"mixed_precision": "bf16", "dynamo_backend": "INDUCTOR"},
        },
    ),
    "fsdp2_size_wrap_hsdp_fp16": Scenario(
        config={
            "bf16": "auto",
            "fp16": True,
            "dp_replicate_size": 2,
            "dp_shard_size": 2,
            "fsdp_config": {
                "version": 2,
                "sharding_strategy": "SHARD_GRAD_OP",
                "auto_wrap_policy": "size_based_wrap",
                "min_num_params": 100_000,
            },
        },
        hardware=Hardware(nodes=1, gpus_per_node=4, bf16_supported=False),
        expected={
            "fsdp": {
                "fsdp_version": 2,
                "reshard_after_forward": False,
                "auto_wrap_policy": "size_based_auto_wrap_policy",
                "min_num_params": 100_000,
                "offload_params": False,
                "activation_checkpointing": False,
                "param_dtype": "torch.float16",
            },
            "parallelism": {"dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 1, "total_size": 4},
            "state": {"mixed_precision": "fp16", "dynamo_backend": "NO"},
        },
    ),
    "zero2_file_offload_optimizer": Scenario(
        config={"deepspeed": "zero2_user.json", "gradient_accumulation_steps": 4, "bf16": True},
        hardware=BIG,
        expected={
            "deepspeed": {
                "zero_stage": 2,
                "config_stage": 2,
                "is_zero3": False,
                "zero3_init_flag": False,
                "gradient_accumulation_steps": 4,
                "config_gradient_accumulation_steps": 4,
                "offload_optimizer_device": "cpu",
                "offload_param_device": "none",
                "bf16_enabled": True,
                "fp16_enabled": False,
                "zero3_enabled_after_select": False,
            },
            "state": {"mixed_precision": "bf16", "dynamo_backend": "NO"},
        },
    ),
    "zero3_preset_offload_fp16_batch_size": Scenario(
        config={
            "deepspeed": "zero3_offload_params",
            "bf16": False,
            "fp16": True,
            "micro_batch_size": 2,
            "batch_size": 16,
        },
        hardware=BIG,
        expected={
            "deepspeed": {
                "zero_stage": 3,
                "config_stage": 3,
                "is_zero3": True,
                "zero3_init_flag": True,
                "is_zero3_init_enabled": True,
                "gradient_accumulation_steps": 8,
                "config_gradient_accumulation_steps": 8,
                "offload_param_device": "cpu",
                "offload_optimizer_device": "none",
                "bf16_enabled": False,
                "fp16_enabled": True,
                "zero3_enabled_after_select": True,
            },
            "zero3_weakref": {"before": False, "alive": True, "stage": 3, "after_release": False},
            "state": {"mixed_precision": "fp16", "dynamo_backend": "NO"},
        },
    ),
    "zero3_inline_string_stage_bf16_auto": Scenario(
        config={
            "bf16": "auto",
            # A string stage: Axolotl exports it but leaves ZeRO-3 init off (defect D4).
            "deepspeed": {
                "zero_optimization": {"stage": "3", "stage3_gather_16bit_weights_on_model_save": True},
                "bf16": {"enabled": True},
                "gradient_accumulation_steps": "auto",
                "train_micro_batch_size_per_gpu": "auto",
            },
        },
        hardware=BIG,
        expected={
            "deepspeed": {
                "zero_stage": 3,
                "config_stage": 3,
                "is_zero3": True,
                "zero3_init_flag": True,
                "gradient_accumulation_steps": 1,
                "config_gradient_accumulation_steps": 1,
                "bf16_enabled": True,
                "fp16_enabled": False,
                "zero3_enabled_after_select": True,
            },
            "zero3_weakref": {"before": False, "alive": True, "stage": 3, "after_release": False},
            "state": {"mixed_precision": "bf16", "dynamo_backend": "NO"},
        },
    ),
}


def _plan(name: str, scenario: Scenario, workdir: Path) -> Plan:
    (workdir / "zero2_user.json").write_text(json.dumps(ZERO2_FILE))
    config = parse_config(scenario.config, base_dirs=(workdir,))
    return plan(config, scenario.hardware, deepspeed_path=str(workdir / "deepspeed.json"))


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Plan, dict[str, Any]]]:
    """Plan every scenario and probe them all in parallel processes (imports dominate the cost)."""
    started = {}
    for name, scenario in SCENARIOS.items():
        workdir = tmp_path_factory.mktemp(name)
        result = _plan(name, scenario, workdir)
        if result.deepspeed is not None:
            assert result.deepspeed_path == str(workdir / "deepspeed.json")
            Path(result.deepspeed_path).write_text(json.dumps(result.deepspeed))
        env = {**result.env_dict, "PATH": os.environ["PATH"], "HOME": str(workdir)}
        deferred = json.dumps(result.spec_steps())
        proc = subprocess.Popen(
            [sys.executable, str(PROBE), deferred],
            env=env,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[name] = (result, proc)
    out = {}
    try:
        for name, (result, proc) in started.items():
            stdout, stderr = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"{name}: probe failed:\n{stderr[-3000:]}"
            out[name] = (result, json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_accelerate_parses_what_the_config_asked_for(
    name: str, probed: dict[str, tuple[Plan, dict[str, Any]]]
) -> None:
    _, seen = probed[name]
    expected = SCENARIOS[name].expected
    seen["state"] = {
        "mixed_precision": seen.pop("mixed_precision"),
        "dynamo_backend": seen.pop("dynamo_backend"),
    }
    for section, fields in expected.items():
        assert section in seen, f"Accelerate built no {section} from the planned env: {sorted(seen)}"
        assert {key: seen[section].get(key) for key in fields} == fields, section
    # Nothing switched on that the config did not ask for.
    assert {"fsdp", "deepspeed", "parallelism"} & set(seen) == {"fsdp", "deepspeed", "parallelism"} & set(
        expected
    )


@pytest.mark.timeout(300)
def test_zero3_deferred_step_comes_with_the_planned_file(
    probed: dict[str, tuple[Plan, dict[str, Any]]],
) -> None:
    for name, (result, _) in probed.items():
        steps = [d for d in result.deferred if d.kind == "deepspeed_zero3_config"]
        if result.zero_stage == 3:
            assert len(steps) == 1, name
            assert result.env_dict["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == result.deepspeed_path
        else:
            assert steps == [], name
