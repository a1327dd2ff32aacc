"""``accelerate config`` files as input, checked against Accelerate's own launcher.

The reference is what ``accelerate launch --config_file F`` hands its processes: Accelerate's
argument parser, ``_validate_launch_command`` (``commands/launch.py:1202-1388``) and
``prepare_multi_gpu_env`` / ``prepare_deepspeed_cmd_env`` (``utils/launch.py:201-400``,
``:430-591``), run through ``accelerate_env`` of ``bench/gpu/ray_bare.py``. Both that environment
and the plan's are read back into Accelerate's plugins (``FullyShardedDataParallelPlugin``,
``DeepSpeedPlugin``, ``ParallelismConfig``, ``TorchDynamoPlugin``, ``AcceleratorState``'s mixed
precision) by ``_accelerate_probe.py --batch``, in one fresh process, and the two must agree.
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
import yaml

from optimenv.config import load_config
from optimenv.plan import plan

pytestmark = pytest.mark.slow

PROBE = Path(__file__).with_name("_accelerate_probe.py")
ZERO3_FILE = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": True},
}
MACHINE = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "main_training_function": "main"}


@dataclass(frozen=True)
class Scenario:
    """An accelerate config file; ``differs`` names the plugin fields where optimenv repairs the launcher."""

    file: dict[str, Any]
    differs: dict[str, tuple[Any, Any]] | None = None


SCENARIOS: dict[str, Scenario] = {
    # prepare_multi_gpu_env's FSDP block (utils/launch.py:304-333) with an explicit FSDP1 strategy.
    "fsdp1-strategy-offload-prefetch": Scenario(
        {
            **MACHINE,
            "distributed_type": "FSDP",
            "mixed_precision": "bf16",
            "num_machines": 2,
            "num_processes": 16,
            "fsdp_config": {
                "fsdp_version": 1,
                "fsdp_sharding_strategy": "SHARD_GRAD_OP",
                "fsdp_offload_params": True,
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer,MistralDecoderLayer",
                "fsdp_backward_prefetch": "BACKWARD_PRE",
                "fsdp_forward_prefetch": True,
                "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_activation_checkpointing": True,
            },
        }
    ),
    # The launcher's defaults (launch.py:514-598): use_orig_params, cpu_ram_efficient_loading and
    # sync_module_states on, FULL_SHARD, min_num_params 1e8 for a size-based policy; prefix-free keys.
    "fsdp1-launcher-defaults-size-wrap": Scenario(
        {
            **MACHINE,
            "distributed_type": "FSDP",
            "num_processes": 4,
            "fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"},
        }
    ),
    "fsdp2-no-reshard-ac-offload-fp16": Scenario(
        {
            **MACHINE,
            "distributed_type": "FSDP",
            "mixed_precision": "fp16",
            "num_processes": 8,
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_reshard_after_forward": False,
                "fsdp_offload_params": True,
                "fsdp_cpu_ram_efficient_loading": False,
                "fsdp_sync_module_states": False,
                "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP",
                "fsdp_min_num_params": 2000,
                "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                "fsdp_activation_checkpointing": True,
                "fsdp_activation_checkpointing_offload": True,
                "fsdp_ignored_modules": "lm_head",
            },
        }
    ),
    # prepare_deepspeed_cmd_env (utils/launch.py:430-591) with a JSON file: only zero3_init_flag may
    # sit beside it (DeepSpeedPlugin._deepspeed_config_checks).
    "deepspeed-file-zero3-init-off": Scenario(
        {
            **MACHINE,
            "distributed_type": "DEEPSPEED",
            "num_processes": 2,
            "deepspeed_config": {"deepspeed_config_file": "ds_zero3.json", "zero3_init_flag": False},
        }
    ),
    # DeepSpeedPlugin builds the JSON from the launcher's variables (utils/dataclasses.py:1301-1324).
    "deepspeed-inline-zero2-offload": Scenario(
        {
            **MACHINE,
            "distributed_type": "DEEPSPEED",
            "mixed_precision": "bf16",
            "num_processes": 8,
            "deepspeed_config": {
                "zero_stage": 2,
                "offload_optimizer_device": "cpu",
                "offload_param_device": "none",
                "gradient_accumulation_steps": 4,
                "gradient_clipping": 1.0,
                "zero3_init_flag": False,
            },
        }
    ),
    "deepspeed-inline-zero3-defaults": Scenario(
        {
            **MACHINE,
            "distributed_type": "DEEPSPEED",
            "mixed_precision": "fp16",
            "num_processes": 4,
            "deepspeed_config": {
                "zero_stage": 3,
                "offload_param_device": "cpu",
                "zero3_save_16bit_model": True,
            },
        }
    ),
    # TorchDynamoPlugin reads the dynamo block prepare_multi_gpu_env writes (utils/launch.py:298-302).
    "multi-gpu-dynamo": Scenario(
        {
            **MACHINE,
            "distributed_type": "MULTI_GPU",
            "mixed_precision": "fp16",
            "num_processes": 2,
            "dynamo_config": {
                "dynamo_backend": "INDUCTOR",
                "dynamo_mode": "max-autotune",
                "dynamo_use_fullgraph": True,
                "dynamo_use_dynamic": True,
            },
        }
    ),
    # prepare_extend_env_parallelism_config (utils/launch.py:403-427): HSDP x TP.
    "fsdp2-parallelism-hsdp-tp": Scenario(
        {
            **MACHINE,
            "distributed_type": "FSDP",
            "mixed_precision": "bf16",
            "num_processes": 8,
            "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"},
            "parallelism_config": {
                "parallelism_config_dp_replicate_size": 2,
                "parallelism_config_dp_shard_size": 2,
                "parallelism_config_tp_size": 2,
            },
        }
    ),
    "fsdp2-parallelism-cp-alltoall": Scenario(
        {
            **MACHINE,
            "distributed_type": "FSDP",
            "mixed_precision": "bf16",
            "num_processes": 4,
            "fsdp_config": {"fsdp_version": 2},
            "parallelism_config": {
                "parallelism_config_dp_shard_size": 2,
                "parallelism_config_cp_size": 2,
                "parallelism_config_cp_comm_strategy": "alltoall",
            },
        }
    ),
    # BaseConfig.process_config's legacy keys: fp16: true and a top-level dynamo_backend.
    "legacy-fp16-dynamo-backend": Scenario(
        {
            **MACHINE,
            "distributed_type": "MULTI_GPU",
            "num_processes": 2,
            "fp16": True,
            "dynamo_backend": "EAGER",
        }
    ),
    # C32: `accelerate config` writes FSDP1's strategy as fsdp_reshard_after_forward, and the launcher
    # then exports its default FSDP_SHARDING_STRATEGY=FULL_SHARD, which FSDP1 reads instead
    # (utils/launch.py:313-315, utils/dataclasses.py:1844-1856). optimenv trains what the file says.
    "fsdp1-strategy-written-as-reshard-C32": Scenario(
        {
            **MACHINE,
            "distributed_type": "FSDP",
            "num_processes": 2,
            "fsdp_config": {"fsdp_version": 1, "fsdp_reshard_after_forward": "SHARD_GRAD_OP"},
        },
        differs={"fsdp.sharding_strategy": ("SHARD_GRAD_OP", "FULL_SHARD")},
    ),
    # The DeepSpeed launcher writes no ACCELERATE_DYNAMO_* (utils/launch.py:430-591): no compile.
    "deepspeed-drops-dynamo": Scenario(
        {
            **MACHINE,
            "distributed_type": "DEEPSPEED",
            "num_processes": 2,
            "deepspeed_config": {"zero_stage": 1},
            "dynamo_config": {"dynamo_backend": "INDUCTOR"},
        }
    ),
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every scenario's plan and launcher environment, probed in one process."""
    work = tmp_path_factory.mktemp("accelerate-config")
    (work / "ds_zero3.json").write_text(json.dumps(ZERO3_FILE))
    (work / "train.py").write_text("")
    items = []
    for name, scenario in SCENARIOS.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(scenario.file))
        result = plan(load_config(path), deepspeed_path=str(work / f"{name}.json"))
        if result.deepspeed is not None:
            Path(str(result.deepspeed_path)).write_text(json.dumps(result.deepspeed))
        items.append({"name": f"ours/{name}", "cwd": str(work), "env": result.env_dict})
        items.append(
            {"name": f"theirs/{name}", "cwd": str(work), "launch": ["--config_file", str(path), "train.py"]}
        )
    batch = work / "batch.json"
    batch.write_text(json.dumps(items))
    env = {"PATH": os.environ["PATH"], "HOME": str(work)}
    proc = subprocess.run(
        [sys.executable, str(PROBE), "--batch", str(batch)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _flat(seen: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in seen.items():
        if isinstance(value, dict) and key != "config":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_accelerate_builds_what_accelerate_launch_builds(
    name: str, probed: dict[str, dict[str, Any]]
) -> None:
    ours, theirs = _flat(probed[f"ours/{name}"]["seen"]), _flat(probed[f"theirs/{name}"]["seen"])
    assert set(ours) == set(theirs), name
    differs = {key: (ours[key], theirs[key]) for key in ours if ours[key] != theirs[key]}
    assert differs == (SCENARIOS[name].differs or {})


@pytest.mark.timeout(300)
def test_the_probe_saw_each_plugin(probed: dict[str, dict[str, Any]]) -> None:
    """The comparison above is not vacuous: each kind of file built the plugins it names."""
    sections = {name: set(probed[f"theirs/{name}"]["seen"]) for name in SCENARIOS}
    assert "fsdp" in sections["fsdp1-strategy-offload-prefetch"]
    assert "fsdp" in sections["fsdp2-no-reshard-ac-offload-fp16"]
    assert {"fsdp", "parallelism"} <= sections["fsdp2-parallelism-hsdp-tp"]
    assert "deepspeed" in sections["deepspeed-file-zero3-init-off"]
    assert "dynamo" in sections["multi-gpu-dynamo"]
    assert "dynamo" not in sections["deepspeed-drops-dynamo"]
    seen = probed["theirs/fsdp2-parallelism-cp-alltoall"]["seen"]["parallelism"]
    assert (seen["cp_size"], seen["cp_comm_strategy"]) == (2, "alltoall")
    inline = probed["theirs/deepspeed-inline-zero2-offload"]["seen"]["deepspeed"]
    assert (inline["gradient_accumulation_steps"], inline["offload_optimizer_device"]) == (4, "cpu")
