"""Run in a fresh process whose environment is exactly a plan's ``env``; print what Accelerate parsed.

This does what ``Accelerator.__init__`` does with the environment (build the FSDP / DeepSpeed /
parallelism objects from it, then ``AcceleratorState``'s mixed-precision choice), and for a
``deepspeed_zero3_config`` deferred step what the bootstrap does: hold transformers'
``HfTrainerDeepSpeedConfig`` while asking ``is_deepspeed_zero3_enabled()``. On a CPU-only host
these constructors are the part of Accelerate's env contract that can run (see machine-notes.md).

argv[1]: JSON list of the plan's deferred steps. stdout: one JSON document.

``--batch FILE``: many environments in one process (imports dominate the cost). FILE holds a JSON
list of ``{"name", "cwd", "env"}`` or ``{"name", "cwd", "launch"}``; ``launch`` is an ``accelerate
launch`` argument list whose environment Accelerate's own launcher computes (``accelerate_env`` of
``bench/gpu/ray_bare.py``). Each is probed alone: the variables of the one before are removed and
Accelerate's state is reset. stdout: ``{name: {"env": ..., "seen": ...}}``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any
from unittest import mock


def _name(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str | list):
        return value
    return getattr(value, "name", None) or getattr(value, "__name__", None) or repr(value)


def _fsdp() -> dict[str, Any]:
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    # With sync_module_states the plugin asks the GPU runtime for the current device, only to
    # build ``param_init_fn``; every variable has been parsed by then. Answer "device 0".
    with (
        mock.patch("accelerate.utils.dataclasses.is_cuda_available", return_value=True),
        mock.patch.object(torch.cuda, "current_device", return_value=0),
    ):
        plugin = FullyShardedDataParallelPlugin()
    offload = plugin.cpu_offload
    return {
        "plugin": plugin,
        "fsdp_version": plugin.fsdp_version,
        "sharding_strategy": _name(plugin.sharding_strategy),
        "reshard_after_forward": _name(plugin.reshard_after_forward),
        "auto_wrap_policy": _name(plugin.auto_wrap_policy),
        "transformer_cls_names_to_wrap": plugin.transformer_cls_names_to_wrap,
        "min_num_params": plugin.min_num_params,
        "state_dict_type": _name(plugin.state_dict_type),
        # FSDP1: CPUOffload(offload_params=...); FSDP2: CPUOffloadPolicy vs plain OffloadPolicy.
        "offload_params": bool(
            getattr(offload, "offload_params", type(offload).__name__ == "CPUOffloadPolicy")
        ),
        "activation_checkpointing": plugin.activation_checkpointing,
        "use_orig_params": plugin.use_orig_params,
        "sync_module_states": plugin.sync_module_states,
        "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
        "backward_prefetch": _name(plugin.backward_prefetch),
        "forward_prefetch": plugin.forward_prefetch,
        "activation_checkpointing_offload": plugin.activation_checkpointing_offload,
        "ignored_modules": plugin.ignored_modules,
    }


def _deepspeed() -> dict[str, Any]:
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    return {
        "plugin": plugin,
        "zero_stage": plugin.zero_stage,
        "is_zero3": plugin.hf_ds_config.is_zero3(),
        "zero3_init_flag": plugin.zero3_init_flag,
        "is_zero3_init_enabled": plugin.is_zero3_init_enabled(),
        "gradient_accumulation_steps": plugin.gradient_accumulation_steps,
        "config_gradient_accumulation_steps": plugin.deepspeed_config["gradient_accumulation_steps"],
        "offload_param_device": plugin.offload_param_device,
        "offload_optimizer_device": plugin.offload_optimizer_device,
        "config_stage": zero["stage"],
        "gradient_clipping": plugin.gradient_clipping,
        "zero3_save_16bit_model": plugin.zero3_save_16bit_model,
    }


def _zero3_weakref(path: str) -> dict[str, Any]:
    from transformers.integrations import HfTrainerDeepSpeedConfig, is_deepspeed_zero3_enabled

    before = is_deepspeed_zero3_enabled()
    held = HfTrainerDeepSpeedConfig(path)
    alive = is_deepspeed_zero3_enabled()
    out = {"before": before, "alive": alive, "stage": held.get_value("zero_optimization.stage")}
    del held
    gc.collect()
    out["after_release"] = is_deepspeed_zero3_enabled()
    return out


def probe(deferred: list[dict[str, Any]]) -> dict[str, Any]:
    """What Accelerate builds from this process's environment (and the deferred ZeRO-3 step)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import ParallelismConfig, TorchDynamoPlugin

    result: dict[str, Any] = {}
    # Taken first: AcceleratorState below selects the DeepSpeed plugin, which registers its own.
    for step in deferred:
        if step["kind"] == "deepspeed_zero3_config":
            # The file the bootstrap builds it from: the planned one, which the environment names.
            result["zero3_weakref"] = _zero3_weakref(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])

    plugins: dict[str, Any] = {}
    # The same switches, compared the same way, as Accelerator.__init__.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        result["deepspeed"] = _deepspeed()
        plugins["deepspeed_plugin"] = result["deepspeed"].pop("plugin")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        result["fsdp"] = _fsdp()
        plugins["fsdp_plugin"] = result["fsdp"].pop("plugin")
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        pc = ParallelismConfig()
        result["parallelism"] = {
            "dp_replicate_size": pc.dp_replicate_size,
            "dp_shard_size": pc.dp_shard_size,
            "tp_size": pc.tp_size,
            "cp_size": pc.cp_size,
            "total_size": pc.total_size,
            "cp_backend": pc.cp_backend,
            "cp_comm_strategy": getattr(pc.cp_handler, "cp_comm_strategy", None),
        }

    dynamo = TorchDynamoPlugin()
    result["dynamo_backend"] = _name(dynamo.backend)
    if result["dynamo_backend"] != "NO":  # Accelerator compiles with the plugin only then
        result["dynamo"] = {
            "mode": dynamo.mode,
            "fullgraph": dynamo.fullgraph,
            "dynamic": dynamo.dynamic,
            "use_regional_compilation": dynamo.use_regional_compilation,
        }
    state = AcceleratorState(_from_accelerator=True, dynamo_plugin=dynamo, **plugins)
    result["mixed_precision"] = state.mixed_precision
    if "fsdp_plugin" in plugins and state.mixed_precision != "no":
        # What AcceleratorState does for an FSDP run on GPUs (state.py: set_mixed_precision).
        plugins["fsdp_plugin"].set_mixed_precision(state.mixed_precision)
        result["fsdp"]["param_dtype"] = str(plugins["fsdp_plugin"].mixed_precision_policy.param_dtype)
    if "deepspeed_plugin" in plugins:
        config = plugins["deepspeed_plugin"].deepspeed_config
        result["deepspeed"]["bf16_enabled"] = config["bf16"]["enabled"]
        result["deepspeed"]["fp16_enabled"] = config["fp16"]["enabled"]
        result["deepspeed"]["config"] = json.loads(json.dumps(config, default=str))
        from transformers.integrations import is_deepspeed_zero3_enabled

        result["deepspeed"]["zero3_enabled_after_select"] = is_deepspeed_zero3_enabled()
    return result


_PREFIXES = ("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")


def _clean() -> None:
    """Forget the environment and Accelerate state of the previous probe in this process."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()
    for name in [n for n in os.environ if n.startswith(_PREFIXES)]:
        del os.environ[name]


def batch(path: str) -> dict[str, Any]:
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    bare = runpy.run_path(os.path.join(here, "..", "..", "bench", "gpu", "ray_bare.py"))
    out: dict[str, Any] = {}
    with open(path, encoding="utf-8") as handle:
        items = json.load(handle)
    for item in items:
        _clean()
        os.chdir(item["cwd"])
        env = item.get("env")
        if env is None:
            env = bare["accelerate_env"](item["launch"])
        os.environ.update(env)
        out[item["name"]] = {"env": env, "seen": probe([])}
    _clean()
    return out


def main() -> None:
    if sys.argv[1] == "--batch":
        print(json.dumps(batch(sys.argv[2]), sort_keys=True))
        return
    print(json.dumps(probe(json.loads(sys.argv[1])), sort_keys=True))


if __name__ == "__main__":
    main()
