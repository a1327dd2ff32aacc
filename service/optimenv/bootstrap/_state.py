"""A JSON snapshot of what Accelerate decided in this process, for reports; never creates the state.

Read from Accelerate's shared state dicts (``PartialState`` / ``AcceleratorState``) rather than
through their properties: those raise or build objects when the state is only half set up. Each
keeps its own ``distributed_type``: on GPUs ``AcceleratorState`` says FSDP or DEEPSPEED where
``PartialState`` still says MULTI_GPU, and the former is what Accelerate trains with. The
shapes follow ``accelerate/state.py``: ``deepspeed_plugins`` is a single ``DeepSpeedPlugin`` or a
dict of named ones, ``fsdp_plugin`` and ``parallelism_config`` may be ``None``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def accelerate_state() -> dict[str, Any] | None:
    """Accelerate's state in this process, or ``None`` if nothing created it.

    A snapshot must never fail a run that trained: a field that cannot be read is reported under
    ``snapshot_error`` instead of raising.
    """
    module = sys.modules.get("accelerate.state")
    if module is None:
        return None
    partial = dict(module.PartialState._shared_state)
    if not partial:
        return None
    out: dict[str, Any] = {}
    try:
        out.update(_partial(partial))
        full = dict(module.AcceleratorState._shared_state)
        out["accelerator_state"] = "_mixed_precision" in full
        if out["accelerator_state"]:
            out.update(_accelerator(full))
            # AcceleratorState decides FSDP/DeepSpeed in its own copy; PartialState keeps MULTI_GPU.
            out["distributed_type"] = _name(full.get("distributed_type")) or out["distributed_type"]
    except Exception as exc:  # a report of state, not a check of it: say what broke, keep going
        out["snapshot_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _name(value: Any) -> Any:
    """An enum's value (``DistributedType.FSDP`` -> ``"FSDP"``), else the value as a string."""
    if value is None:
        return None
    return getattr(value, "value", None) or str(value)


def _partial(partial: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "distributed_type": _name(partial.get("distributed_type")),
        "num_processes": partial.get("num_processes"),
        "process_index": partial.get("process_index"),
        "local_process_index": partial.get("local_process_index"),
        "device": str(partial.get("device")),
        "backend": partial.get("backend"),
    }


def _accelerator(full: Mapping[str, Any]) -> dict[str, Any]:
    fsdp = full.get("fsdp_plugin")
    dynamo = full.get("dynamo_plugin")
    return {
        "mixed_precision": _mixed_precision(full),
        "dynamo_backend": _name(getattr(dynamo, "backend", None)),
        "deepspeed": deepspeed_plugins(full.get("deepspeed_plugins")),
        "fsdp_version": getattr(fsdp, "fsdp_version", None),
        "fsdp": None if fsdp is None else _fsdp(fsdp),
        "parallelism": _parallelism(full.get("parallelism_config")),
    }


def _mixed_precision(full: Mapping[str, Any]) -> Any:
    """As ``AcceleratorState.mixed_precision`` answers: under DeepSpeed (fp8 aside) the active
    plugin's JSON decides (``bf16.enabled`` / ``fp16.enabled``), not ``_mixed_precision``."""
    chosen = full.get("_mixed_precision")
    if _name(full.get("distributed_type")) != "DEEPSPEED" or chosen == "fp8":
        return chosen
    value = full.get("deepspeed_plugins")
    plugins = list(value.values()) if isinstance(value, Mapping) else [value]
    active = next((p for p in plugins if getattr(p, "selected", False)), plugins[0])
    config = getattr(active, "deepspeed_config", None) or {}
    for precision in ("fp16", "bf16"):
        if (config.get(precision) or {}).get("enabled", False) is True:
            return precision
    return "no"


def deepspeed_plugins(value: Any) -> dict[str, dict[str, Any]]:
    """The DeepSpeed plugins by name; a single plugin (the usual case) is named ``default``."""
    if value is None:
        return {}
    plugins = value if isinstance(value, Mapping) else {"default": value}
    return {
        str(key): {
            "zero_stage": getattr(plugin, "zero_stage", None),
            "zero3_init": getattr(plugin, "zero3_init_flag", None),
            "offload_param": getattr(plugin, "offload_param_device", None),
            "offload_optimizer": getattr(plugin, "offload_optimizer_device", None),
            "gradient_accumulation_steps": getattr(plugin, "gradient_accumulation_steps", None),
            "selected": getattr(plugin, "selected", None),
        }
        for key, plugin in plugins.items()
    }


def _fsdp(plugin: Any) -> dict[str, Any]:
    fields = (
        "reshard_after_forward",
        "state_dict_type",
        "auto_wrap_policy",
        "activation_checkpointing",
        "cpu_ram_efficient_loading",
        "sharding_strategy",
    )
    return {key: _plain(getattr(plugin, key, None)) for key in fields}


def _parallelism(config: Any) -> dict[str, int] | None:
    if config is None:
        return None
    keys = ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size")
    return {key: int(getattr(config, key, None) or 1) for key in keys}


def _plain(value: Any) -> Any:
    """JSON-able: enums by name, callables (the wrap policy) by qualified name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "name") and hasattr(value, "value"):  # an enum
        return str(value.name)
    name = getattr(value, "__qualname__", None) or getattr(getattr(value, "func", None), "__qualname__", None)
    return str(name) if name else type(value).__name__
