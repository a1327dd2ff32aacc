"""``plan(config, hardware) -> Plan``: the environment Accelerate must see, decided ahead of time.

This is Axolotl's ``prepare_optim_env`` (0.19.0) as a pure function, variable by variable and in
the same write order, with the defects listed in ``docs/compatibility.md`` repaired. Whatever only
the worker can know is returned as ``deferred`` steps for the bootstrap, never guessed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from optimenv import deepspeed as ds
from optimenv import parallel
from optimenv.errors import ConfigError, shown
from optimenv.parallel import ProcessCountError as ProcessCountError  # its home before parallel.py
from optimenv.spec import SpecStep
from optimenv.steps import (
    TORCH_COMPILE_MIN,
    Bf16Auto,
    DeepSpeedZero3Config,
    Deferred,
    NcclP2PCheck,
    ParallelSizes,
    RequireFp8,
    SingleGpuRendezvousDefaults,
    TorchCompileAuto,
    to_spec,
)
from optimenv.versions import at_least, parse_version

if TYPE_CHECKING:
    from optimenv.config import FSDPConfig, TrainingConfig

DEFAULT_DEEPSPEED_PATH = "/etc/optimenv/deepspeed.json"
#: How the source of a size that Axolotl's loader inferred reads (``dp_shard_size (inferred)``).
INFERRED = "(inferred)"


@dataclass(frozen=True)
class Hardware:
    """What is known of the target; ``None`` means unknown, and the worker decides."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    bf16_supported: bool | None = None
    fp8_supported: bool | None = None
    torch_version: str | None = None

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"hardware.{name}", f"must be a whole number >= 1, got {value!r}")
        version = self.torch_version
        if version is not None and parse_version(version) is None:
            # An unparsable version would compare below every minimum and silently drop settings.
            raise ConfigError(
                "hardware.torch_version", f"must look like 2.6.0 (major.minor[.patch]), got {shown(version)}"
            )

    @property
    def world_size(self) -> int | None:
        """Processes in all (one per GPU), when both sizes are known."""
        if self.nodes is None or self.gpus_per_node is None:
            return None
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class EnvVar:
    """One planned variable. ``mode`` ``default`` means: set only where the launcher did not."""

    name: str
    value: str
    source: str
    mode: Literal["set", "default"] = "set"


@dataclass(frozen=True)
class Plan:
    """The planned environment. ``deepspeed`` is the JSON the workers will read; ``deferred`` the
    steps only the worker can decide (:mod:`optimenv.steps`)."""

    env: tuple[EnvVar, ...]
    deepspeed: dict[str, Any] | None
    deepspeed_path: str | None
    zero_stage: int | None
    deferred: tuple[Deferred, ...]
    warnings: tuple[str, ...]
    fsdp_version: int | None = None
    mixed_precision: str | None = None

    @property
    def env_dict(self) -> dict[str, str]:
        return {v.name: v.value for v in self.env}

    @property
    def sources(self) -> dict[str, str]:
        return {v.name: v.source for v in self.env}

    def spec_steps(self) -> list[SpecStep]:
        """The deferred steps as the worker spec carries them."""
        return [to_spec(step) for step in self.deferred]

    def to_dict(self) -> dict[str, Any]:
        """Exactly the ``optimenv plan -o json`` document."""
        return {
            "env": self.env_dict,
            "sources": self.sources,
            "deferred": self.spec_steps(),
            "deepspeed": ds.json_copy(self.deepspeed),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


class _Builder:
    def __init__(self) -> None:
        self.env: dict[str, EnvVar] = {}
        self.deferred: list[Deferred] = []
        self.warnings: list[str] = []

    def set(self, name: str, value: str, source: str, mode: Literal["set", "default"] = "set") -> None:
        self.env[name] = EnvVar(name, value, source, mode)

    def defer(self, step: Deferred) -> None:
        self.deferred.append(step)


def plan(
    config: TrainingConfig,
    hardware: Hardware | None = None,
    *,
    deepspeed_path: str = DEFAULT_DEEPSPEED_PATH,
) -> Plan:
    """Plan the environment for ``config`` on ``hardware``. Deterministic and side-effect free."""
    if not deepspeed_path.startswith("/"):
        raise ConfigError(
            "deepspeed_path", f"must be an absolute path on the workers, got {deepspeed_path!r}"
        )
    launch = config.launch
    try:
        result = _plan(config, with_topology(config, hardware or Hardware()), deepspeed_path)
    except ConfigError as exc:
        if launch is None or launch.field(exc.field) == exc.field:
            raise
        # An accelerate config file: name the key the file wrote (mixed_precision, not bf16).
        raise _renamed(exc, launch.field(exc.field)) from None
    if launch is None:
        return result
    env = tuple(EnvVar(v.name, v.value, launch.field(v.source), v.mode) for v in result.env)
    return dataclasses.replace(result, env=env, warnings=(*launch.warnings, *result.warnings))


def with_topology(config: TrainingConfig, hw: Hardware) -> Hardware:
    """``hw`` completed with the processes an ``accelerate config`` file names; a disagreement is refused.

    ``num_machines`` and ``num_processes`` (in all) are the file's topology (``prepare_multi_gpu_env``
    starts ``num_processes // num_machines`` per machine).
    """
    launch = config.launch
    if launch is None or launch.processes is None:
        return hw
    machines, per_machine = launch.machines, launch.processes // launch.machines
    nodes = machines if hw.nodes is None else hw.nodes
    gpus = per_machine if hw.gpus_per_node is None else hw.gpus_per_node
    if nodes * gpus != launch.processes or (
        hw.world_size is None and (nodes, gpus) != (machines, per_machine)
    ):
        given = f"{hw.nodes if hw.nodes is not None else '?'} node(s) x {hw.gpus_per_node or '?'} GPU(s)"
        raise ConfigError(
            "num_processes",
            f"the file asks for {launch.processes} processes on {machines} machine(s), but the target "
            f"is {given}",
            "make them agree: change num_processes / num_machines, or the topology you give "
            "(--nodes, --gpus-per-node, --workers, spec.topology)",
        )
    return dataclasses.replace(hw, nodes=nodes, gpus_per_node=gpus)


def _renamed(exc: ConfigError, field: str) -> ConfigError:
    if isinstance(exc, ProcessCountError):
        return ProcessCountError(field, exc.reason, exc.hint or "", product=exc.product, world=exc.world)
    return ConfigError(field, exc.reason, exc.hint)


def _plan(config: TrainingConfig, hw: Hardware, deepspeed_path: str) -> Plan:
    b = _Builder()
    if config.ddp_timeout:
        b.set("AXOLOTL_NCCL_TIMEOUT", str(config.ddp_timeout), "ddp_timeout", mode="default")
    b.defer(NcclP2PCheck())
    b.warnings.extend(
        f"{key}: not a key optimenv reads; did you mean {close!r}?" for key, close in config.near_misses
    )

    fsdp_version: int | None = None
    ds_json: dict[str, Any] | None = None
    stage: int | None = None
    if config.fsdp_enabled:
        fsdp_version = _fsdp(config, b)
        _check_lora_kernels(config, hw, fsdp_version)
    elif config.deepspeed is not None:
        ds_json, stage = _deepspeed(config, hw, b, deepspeed_path)
    elif config.fsdp_config is not None:
        # D6: Axolotl treats an empty mapping as "no FSDP"; we agree, but say so.
        b.warnings.append(
            "fsdp_config: empty, so FSDP stays off (as in Axolotl); add a key inside it "
            "(e.g. fsdp_config.fsdp_version: 2) to turn it on"
        )

    _parallelism(config, hw, b)
    _torch_compile(config, hw, b)
    precision = _mixed_precision(config, hw, b, ds_json)
    _launch_switches(config, b)

    if fsdp_version == 2 and hw.torch_version and not at_least(hw.torch_version, "2.7"):
        raise ConfigError("fsdp_version", f"FSDP2 needs torch >= 2.7.0, the workers have {hw.torch_version}")

    return Plan(
        env=tuple(b.env.values()),
        deepspeed=ds_json,
        deepspeed_path=deepspeed_path if ds_json is not None else None,
        zero_stage=stage,
        deferred=tuple(b.deferred),
        warnings=tuple(b.warnings),
        fsdp_version=fsdp_version,
        mixed_precision=precision,
    )


def _launch_switches(config: TrainingConfig, b: _Builder) -> None:
    """Debug mode and CPU affinity, which only an ``accelerate config`` file sets (``utils/launch.py``)."""
    launch = config.launch
    if launch is None:
        return
    if launch.debug:
        b.set("ACCELERATE_DEBUG_MODE", "true", "debug")
    if launch.cpu_affinity:
        b.set("ACCELERATE_CPU_AFFINITY", "1", "enable_cpu_affinity")


def _fsdp(config: TrainingConfig, b: _Builder) -> int:
    fc = config.fsdp_config
    version = config.effective_fsdp_version
    if fc is None or not fc.model_fields_set:
        _fsdp_legacy_list(config, version, b)
        return version
    b.set("ACCELERATE_USE_FSDP", "true", "fsdp_config")
    b.set("FSDP_VERSION", str(version), config.fsdp_version_source)
    if config.fsdp:
        b.warnings.append("fsdp: the legacy list is ignored because fsdp_config is set")
    _fsdp_settings(fc, version, b)
    if version == 2:
        _fsdp2_sharding(fc, b)
    else:
        _fsdp1_sharding(fc, b)
    if fc.limit_all_gathers is not None:
        b.warnings.append(
            "fsdp_config.limit_all_gathers: Accelerate has no variable for it; it only reaches "
            "TrainingArguments (FSDP1)"
        )
    return version


def _fsdp_legacy_list(config: TrainingConfig, version: int, b: _Builder) -> None:
    """The legacy ``fsdp:`` list alone: Axolotl crashes here (D2); translated as transformers does."""
    items = set(config.fsdp or ())
    strategy = next((s.upper() for s in config.fsdp or () if s not in ("offload", "auto_wrap")), None)
    b.warnings.append(
        f"fsdp: the legacy list is deprecated; use fsdp_config (translated to FSDP{version} here)"
    )
    b.set("ACCELERATE_USE_FSDP", "true", "fsdp")
    b.set("FSDP_VERSION", str(version), config.fsdp_version_source)
    if "offload" in items:
        b.set("FSDP_OFFLOAD_PARAMS", "true", "fsdp")
    if "auto_wrap" in items:
        b.set("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP", "fsdp")
    if strategy and version == 1:
        b.set("FSDP_SHARDING_STRATEGY", strategy, "fsdp")
    elif strategy:
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise ConfigError(
                "fsdp",
                f"{strategy.lower()} has no FSDP2 equivalent",
                "use full_shard or shard_grad_op; for HSDP set dp_replicate_size and dp_shard_size",
            )
        # Accelerate's FSDP2 default is to reshard; shard_grad_op must say false.
        b.set("FSDP_RESHARD_AFTER_FORWARD", str(strategy == "FULL_SHARD").lower(), "fsdp")


_FSDP_FLAGS = (
    ("FSDP_ACTIVATION_CHECKPOINTING", "activation_checkpointing"),
    ("FSDP_OFFLOAD_PARAMS", "offload_params"),
    ("FSDP_SYNC_MODULE_STATES", "sync_module_states"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "cpu_ram_efficient_loading"),
    ("FSDP_USE_ORIG_PARAMS", "use_orig_params"),
    # Read by Accelerate, dropped by Axolotl's schema (C2).
    ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "activation_checkpointing_offload"),
)
_FSDP_TEXTS = (
    ("FSDP_AUTO_WRAP_POLICY", "auto_wrap_policy"),
    ("FSDP_TRANSFORMER_CLS_TO_WRAP", "transformer_layer_cls_to_wrap"),
    ("FSDP_MIN_NUM_PARAMS", "min_num_params"),
    ("FSDP_IGNORED_MODULES", "ignored_modules"),
)


def _fsdp_settings(fc: FSDPConfig, version: int, b: _Builder) -> None:
    """The ``fsdp_config`` keys that mean the same in FSDP1 and FSDP2."""
    src = "fsdp_config."
    for name, key in _FSDP_FLAGS:
        if getattr(fc, key):
            b.set(name, "true", src + key)
    if fc.state_dict_type:
        if version == 2 and fc.state_dict_type == "LOCAL_STATE_DICT":
            raise ConfigError(
                src + "state_dict_type",
                "LOCAL_STATE_DICT is not supported by FSDP2",
                "use SHARDED_STATE_DICT or FULL_STATE_DICT",
            )
        b.set("FSDP_STATE_DICT_TYPE", fc.state_dict_type, src + "state_dict_type")
    if fc.cpu_offload_pin_memory is not None:
        pin = str(fc.cpu_offload_pin_memory).lower()
        b.set("FSDP_CPU_OFFLOAD_PIN_MEMORY", pin, src + "cpu_offload_pin_memory")
    for name, key in _FSDP_TEXTS:
        value = getattr(fc, key)
        if value:
            b.set(name, str(value), src + key)


def _fsdp2_sharding(fc: FSDPConfig, b: _Builder) -> None:
    reshard = fc.reshard_after_forward
    reshard_src = "fsdp_config.reshard_after_forward"
    if reshard is None and fc.sharding_strategy is not None:
        reshard = fc.sharding_strategy == "FULL_SHARD"
        reshard_src = "fsdp_config.sharding_strategy"
    elif fc.sharding_strategy is not None:
        b.warnings.append(
            "fsdp_config.sharding_strategy: an FSDP1 setting; FSDP2 follows reshard_after_forward "
            "(they agree here), so it can be removed"
        )
    if reshard is not None:
        # Exported when false too: Axolotl drops false and Accelerate's FSDP2 default is true.
        b.set("FSDP_RESHARD_AFTER_FORWARD", str(reshard).lower(), reshard_src)
    for key in ("backward_prefetch", "forward_prefetch"):
        if getattr(fc, key) not in (None, False, "NO_PREFETCH"):
            b.warnings.append(f"fsdp_config.{key}: FSDP1 only; FSDP2 ignores it")


def _fsdp1_sharding(fc: FSDPConfig, b: _Builder) -> None:
    src = "fsdp_config."
    strategy = fc.sharding_strategy
    strategy_src = src + "sharding_strategy"
    if strategy is None and fc.reshard_after_forward is not None:
        strategy = "FULL_SHARD" if fc.reshard_after_forward else "SHARD_GRAD_OP"
        strategy_src = src + "reshard_after_forward"
    if strategy is not None:
        b.set("FSDP_SHARDING_STRATEGY", strategy, strategy_src)
    if fc.backward_prefetch is not None:
        b.set("FSDP_BACKWARD_PREFETCH", fc.backward_prefetch, src + "backward_prefetch")
    if fc.forward_prefetch is not None:
        b.set("FSDP_FORWARD_PREFETCH", str(fc.forward_prefetch).lower(), src + "forward_prefetch")
    b.warnings.append("fsdp_version: FSDP1 is deprecated; consider fsdp_version: 2")


def _deepspeed(
    config: TrainingConfig, hw: Hardware, b: _Builder, path: str
) -> tuple[dict[str, Any], int | None]:
    loaded = config.deepspeed_json
    if loaded is None:  # pragma: no cover - the model validator always resolves it
        raise ConfigError("deepspeed", "was not resolved; load the config with optimenv.load_config")
    ds_json = ds.json_copy(loaded)
    stage = ds.zero_stage(ds_json)
    if config.launch is None:
        _axolotl_rewrites(config, ds_json, stage, b)

    b.set("ACCELERATE_USE_DEEPSPEED", "true", "deepspeed")
    b.set("ACCELERATE_DEEPSPEED_CONFIG_FILE", path, "deepspeed")
    launch = config.launch
    if launch is None or launch.gradient_accumulation_written:
        # accelerate launch exports it only when the file sets it; Axolotl always (trainer.py:554-556).
        gas, gas_src = _gradient_accumulation(config)
        b.set("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(gas), gas_src)
    if stage:
        b.set("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage), "deepspeed.zero_optimization.stage")
    if launch is not None and launch.zero3_init is not None:
        b.set(
            "ACCELERATE_DEEPSPEED_ZERO3_INIT",
            str(launch.zero3_init).lower(),
            "deepspeed_config.zero3_init_flag",
        )
    elif stage == 3:
        b.set("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", "deepspeed.zero_optimization.stage")
    if launch is not None and launch.moe_layer_cls_names is not None:
        b.set(
            "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES",
            launch.moe_layer_cls_names,
            "deepspeed_config.deepspeed_moe_layer_cls_names",
        )
    if hw.world_size in (None, 1):
        b.defer(SingleGpuRendezvousDefaults())
    reentrant = config.extra("gradient_checkpointing_kwargs")
    if (
        stage == 3
        and config.extra("adapter") == "qlora"
        and isinstance(reentrant, dict)
        and reentrant.get("use_reentrant") is False
    ):
        # Axolotl looks for "zero3" in the path, so it misses inline mappings and presets (D18).
        b.warnings.append(
            "gradient_checkpointing_kwargs.use_reentrant: false with qlora and ZeRO-3 may fail with "
            "a CheckpointError about recomputed values"
        )
    if stage == 3:
        b.defer(DeepSpeedZero3Config())
    return ds_json, stage


def _axolotl_rewrites(
    config: TrainingConfig, ds_json: dict[str, Any], stage: int | None, b: _Builder
) -> None:
    """The JSON as Axolotl's validators rewrite it: a numeric stage, AutoTP and DeepCompile (C12, C23)."""
    if stage is not None and isinstance(ds_json["zero_optimization"].get("stage"), str):
        ds_json["zero_optimization"]["stage"] = stage
        b.warnings.append("deepspeed: zero_optimization.stage was a string; written as a number")
    tp = config.tensor_parallel_size or 1
    if tp > 1:
        # check_tensor_parallel_size_update_ds_json (validation.py:1156-1186) adds what is missing.
        section = ds_json.setdefault("tensor_parallel", {})
        if not isinstance(section, dict) or section.setdefault("autotp_size", tp) != tp:
            raise ConfigError(
                "deepspeed.tensor_parallel.autotp_size",
                f"{section.get('autotp_size') if isinstance(section, dict) else section!r} contradicts "
                f"tensor_parallel_size {tp}",
                "remove it from the DeepSpeed JSON (tensor_parallel_size fills it) or make them equal",
            )
        ds_json.setdefault("zero_optimization", {}).setdefault("gather_16bit_weights_on_model_save", True)
    if config.deepcompile:
        # check_deepcompile (validation.py:1188-1206) adds {"deepcompile": true} only without "compile".
        section = ds_json.setdefault("compile", {})
        if not isinstance(section, dict) or section.setdefault("deepcompile", True) is not True:
            raise ConfigError(
                "deepspeed.compile.deepcompile",
                "contradicts deepcompile: true",
                "set it to true or remove it",
            )


def _gradient_accumulation(config: TrainingConfig) -> tuple[int, str]:
    if config.batch_size is not None and "batch_size" in config.model_fields_set:
        # Axolotl exports the schema default (or "None") here and derives GAS only later (D3).
        return config.batch_size // (config.micro_batch_size or 1), "batch_size"
    assert config.gradient_accumulation_steps is not None  # enforced by the model
    src = (
        "gradient_accumulation_steps"
        if "gradient_accumulation_steps" in config.model_fields_set
        else "default"
    )
    return config.gradient_accumulation_steps, src


def parallel_inputs(config: TrainingConfig) -> tuple[parallel.Sizes, parallel.Layout]:
    """The parallel sizes as written and what decides the rest (see :mod:`optimenv.parallel`)."""
    fc = config.fsdp_config
    fsdp_config = fc is not None and bool(fc.model_fields_set)
    version = config.effective_fsdp_version if config.fsdp_enabled else None
    tp, cp = config.tensor_parallel_size or 1, config.context_parallel_size or 1
    written = parallel.Sizes(
        tp=tp,
        cp=cp,
        dp_shard=config.dp_shard_size,
        dp_replicate=config.dp_replicate_size,
        ep=config.expert_parallel_size or 1,
    )
    launch = config.launch
    if launch is not None:
        layout = parallel.Layout(
            fsdp=config.fsdp_enabled,
            fsdp_version=version,
            deepspeed=config.deepspeed is not None,
            infer=False,
            axolotl=False,
            always_built=launch.parallelism_config,
            names=launch.size_names,
        )
        return written, layout
    # Axolotl's loader builds its mesh for FSDP2, or for TP / CP unless FSDP1 (loaders/model.py:207-219).
    infer = version == 2 if fsdp_config else (tp > 1 or cp > 1)
    layout = parallel.Layout(
        fsdp=config.fsdp_enabled, fsdp_version=version, deepspeed=config.deepspeed is not None, infer=infer
    )
    return written, layout


def _parallelism(config: TrainingConfig, hw: Hardware, b: _Builder) -> None:
    written, layout = parallel_inputs(config)
    names = layout.names
    for axis in ("tp", "dp_shard", "dp_replicate"):
        if written.value(axis) > 1:
            b.set(parallel.VARIABLES[axis], str(written.value(axis)), names[axis])
    # Validation copies the deprecated sequence_parallel_degree into context_parallel_size.
    cp_src = "sequence_parallel_degree" if config.sequence_parallel_degree is not None else names["cp"]
    if config.sequence_parallel_degree is not None:
        b.warnings.append("sequence_parallel_degree: deprecated; use context_parallel_size")
    if written.cp > 1:
        b.set(parallel.VARIABLES["cp"], str(written.cp), cp_src)
        if layout.axolotl:
            b.set("ACCELERATE_ALLOW_CP_STANDALONE", "true", cp_src)
    if written.ep > 1:
        b.set(parallel.VARIABLES["ep"], str(written.ep), names["ep"])
        if written.value("dp_shard") <= 1:
            b.warnings.append(
                "expert_parallel_size: without dp_shard_size > 1 Accelerate's ParallelismConfig "
                "stays off (as in Axolotl); only Axolotl's own patch reads PARALLELISM_CONFIG_EP_SIZE"
            )
    _launch_parallelism(config, b)
    world = hw.world_size
    if world is not None:
        settled = parallel.settle(written, world, layout, f"{hw.nodes} node(s) x {hw.gpus_per_node}")
        for axis, size in settled.inferred.items():
            b.set(parallel.VARIABLES[axis], str(size), f"{names[axis]} {INFERRED}")
        b.warnings.extend(settled.notes)
    else:
        parallel.check_static(written, layout)
        if written.ep > 1 or (layout.infer and layout.builds_config(written)):
            b.defer(ParallelSizes(written, layout, _first_parallel_source(b, names)))
    if layout.builds_config(written):
        b.set("ACCELERATE_USE_PARALLELISM_CONFIG", "true", _first_parallel_source(b, names))


def _launch_parallelism(config: TrainingConfig, b: _Builder) -> None:
    """What only an ``accelerate config`` file sets: the context-parallel communication strategy."""
    launch = config.launch
    if launch is not None and launch.cp_comm_strategy is not None and (config.context_parallel_size or 1) > 1:
        b.set("PARALLELISM_CONFIG_CP_COMM_STRATEGY", launch.cp_comm_strategy, launch.size_names["cp"])


def check_process_count(result: Plan, world: int, what: str) -> None:
    """The plan's parallel sizes fit ``world`` processes, as Accelerate checks them (C28, C29).

    A plan made without the process count still carries the sizes to infer: they are settled for
    ``world`` here exactly as the worker will settle them.
    """
    step = next((d for d in result.deferred if isinstance(d, ParallelSizes)), None)
    if step is not None:
        parallel.settle(step.written, world, step.layout, what)
        return
    check_world_size(result.env_dict, result.sources, world, what)


def check_world_size(env: Mapping[str, str], sources: Mapping[str, str], world: int, what: str) -> None:
    """With the flag set the planned sizes must multiply to exactly ``world`` processes (C28).

    Accelerate checks this when it builds ``ParallelismConfig`` (``parallelism_config.py:370-377``);
    EP counts because Axolotl's patch, the only reader of ``PARALLELISM_CONFIG_EP_SIZE``, multiplies
    it into the total. The hint never proposes a value for a size the user wrote.
    """
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG") != "true":
        return
    sizes = {axis: int(env.get(var, "1")) for axis, var in parallel.VARIABLES.items()}

    def as_written(axis: str) -> int | None:
        return sizes[axis] if _written(sources.get(parallel.VARIABLES[axis])) else None

    written = parallel.Sizes(
        tp=sizes["tp"],
        cp=sizes["cp"],
        dp_shard=as_written("dp_shard"),
        dp_replicate=as_written("dp_replicate"),
        ep=sizes["ep"],
    )
    product = math.prod(sizes[a] for a in ("tp", "dp_shard", "dp_replicate", "cp"))
    if sizes["dp_shard"] > 1:
        product *= sizes["ep"]
    if product == world or product == 1:
        return
    names = {
        axis: sources.get(var, parallel.AXOLOTL_FIELDS[axis]) for axis, var in parallel.VARIABLES.items()
    }
    names = {axis: name.removesuffix(f" {INFERRED}") for axis, name in names.items()}
    layout = parallel.Layout(fsdp=False, fsdp_version=None, deepspeed=False, infer=False, names=names)
    inferred = any(sizes[a] > 1 and getattr(written, a) is None for a in ("dp_shard", "dp_replicate"))
    raise ProcessCountError(
        next(names[a] for a in ("tp", "dp_shard", "dp_replicate", "cp", "ep") if sizes[a] > 1),
        f"the parallelism sizes multiply to {product}, but Accelerate needs them to equal the {world} "
        f"processes ({what})",
        "the plan inferred sizes for another process count: plan again for this one"
        if inferred
        else parallel.hint(written, world, layout, product),
        product=product,
        world=world,
    )


def _written(source: str | None) -> bool:
    return source is not None and not source.endswith(INFERRED)


def _first_parallel_source(b: _Builder, names: Mapping[str, str]) -> str:
    return next(
        (v.source for v in b.env.values() if v.name.startswith("PARALLELISM_CONFIG_")),
        names.get("config", "parallelism_config"),
    )


def _torch_compile(config: TrainingConfig, hw: Hardware, b: _Builder) -> None:
    _compile_option_warnings(config, hw, b)
    if not config.torch_compile:
        return
    backend = (config.torch_compile_backend or "inductor").upper()
    src = "torch_compile_backend" if config.torch_compile_backend else "torch_compile"
    if config.torch_compile == "auto":
        if hw.torch_version is None:
            b.defer(TorchCompileAuto(backend))
            return
        if not at_least(hw.torch_version, TORCH_COMPILE_MIN):
            return
    b.set("ACCELERATE_DYNAMO_BACKEND", backend, src)
    launch = config.launch
    if launch is not None:
        # What prepare_multi_gpu_env writes next to the backend (utils/launch.py:298-302).
        b.set("ACCELERATE_DYNAMO_MODE", launch.dynamo_mode or "default", "dynamo_config.dynamo_mode")
        for var, value, key in (
            ("USE_FULLGRAPH", launch.dynamo_fullgraph, "dynamo_use_fullgraph"),
            ("USE_DYNAMIC", launch.dynamo_dynamic, "dynamo_use_dynamic"),
            ("USE_REGIONAL_COMPILATION", launch.dynamo_regional, "dynamo_use_regional_compilation"),
        ):
            b.set(f"ACCELERATE_DYNAMO_{var}", str(value).lower(), f"dynamo_config.{key}")


def _compile_option_warnings(config: TrainingConfig, hw: Hardware, b: _Builder) -> None:
    """Axolotl's warnings about ``torch_compile_options`` (schemas/config.py:1641-1656, :2057-2062)."""
    options = config.torch_compile_options
    if not options:
        return
    if (
        config.torch_compile == "auto"
        and hw.torch_version is not None
        and not at_least(hw.torch_version, TORCH_COMPILE_MIN)
    ):
        b.warnings.append(
            f"torch_compile_options: ignored, torch_compile: auto stays off with torch {hw.torch_version}"
        )
    if options.get("triton.cudagraphs") and config.extra("sample_packing"):
        b.warnings.append(
            "torch_compile_options: triton.cudagraphs needs static shapes, which sample_packing does not "
            "give; graphs are captured again or skipped"
        )


def _mixed_precision(
    config: TrainingConfig, hw: Hardware, b: _Builder, ds_json: dict[str, Any] | None
) -> str | None:
    """``ACCELERATE_MIXED_PRECISION`` as Axolotl resolves it; ``None`` when the worker decides it."""
    hard_coded = _hard_coded_precisions(ds_json)
    if config.fp8:
        value, src = _fp8(config, hw, b), "fp8"
    elif config.bf16 is True:
        if hw.bf16_supported is False:
            raise ConfigError(
                "bf16",
                "true, but the target GPUs do not support bf16",
                "set bf16: false (or fp16: true), or target bf16-capable GPUs",
            )
        value, src = "bf16", "bf16"
        if config.fp16:
            b.warnings.append("fp16: ignored because bf16 is true (as in Axolotl)")
    elif config.bf16 == "auto" and not config.fp16:
        # What Axolotl trains with (resolve_dtype, utils/config/__init__.py:156-172): fp16 wins over
        # auto; without bf16 support it turns fp16 on unless fp16: false or float16 (C14).
        fallback = "no" if config.fp16 is False or config.extra("float16") else "fp16"
        if hw.bf16_supported is None:
            # A worker without a GPU trains in fp32: Accelerate refuses fp16 off the GPU.
            b.defer(Bf16Auto(fallback, without_gpu="no", deepspeed_requires=_one_precision(hard_coded)))
            return None
        value, src = ("bf16" if hw.bf16_supported else fallback), "bf16"
    elif config.fp16:
        value, src = "fp16", "fp16"
    else:
        value, src = "no", "bf16" if "bf16" in config.model_fields_set else "default"
    if not (config.launch is not None and value == "no"):
        # From an accelerate config file, mixed precision "no" leaves the choice to the JSON, as
        # DeepSpeedPlugin.set_mixed_precision does (utils/dataclasses.py:1415-1440).
        _check_deepspeed_precision(hard_coded, value)
    b.set("ACCELERATE_MIXED_PRECISION", value, src)
    return value


def _fp8(config: TrainingConfig, hw: Hardware, b: _Builder) -> str:
    if hw.fp8_supported is False:
        raise ConfigError(
            "fp8",
            "fp8 requested, but the target GPUs do not support fp8",
            "remove fp8 or target GPUs of compute capability >= 8.9",
        )
    if hw.fp8_supported is None:
        b.defer(RequireFp8())
    if not config.torch_compile:
        b.warnings.append("fp8: without torch_compile fp8 training may be slower than bf16")
    fc = config.fsdp_config
    if fc is not None and fc.activation_checkpointing:
        # check_fp8_config (validation.py:434-441).
        b.warnings.append("fp8: with FSDP activation checkpointing it may be slower than bf16")
    if config.bf16 is True or config.fp16:
        b.warnings.append("fp8: takes precedence over bf16/fp16 (as in Axolotl)")
    return "fp8"


def _hard_coded_precisions(ds_json: dict[str, Any] | None) -> tuple[str, ...]:
    """The precisions (``bf16``, ``fp16``) the DeepSpeed JSON turns on with ``enabled: true``."""
    if ds_json is None:
        return ()
    return tuple(key for key in ("bf16", "fp16") if ds.precision_flag(ds_json, key) is True)


def _one_precision(hard_coded: tuple[str, ...]) -> str | None:
    """The one precision a ``bf16: auto`` worker must resolve to, for the JSON (D14)."""
    if len(hard_coded) > 1:
        raise ConfigError(
            "deepspeed.fp16.enabled",
            "is true in the DeepSpeed JSON together with bf16.enabled, so no mixed precision matches both",
            'set one of them to "auto" or false',
        )
    return hard_coded[0] if hard_coded else None


def _check_deepspeed_precision(hard_coded: tuple[str, ...], precision: str) -> None:
    """A DeepSpeed JSON that hard-codes a precision the plan does not use trains wrongly (D14)."""
    for key in hard_coded:
        if precision != key and not (precision == "fp8" and key == "bf16"):
            raise ConfigError(
                f"deepspeed.{key}.enabled",
                f"is true in the DeepSpeed JSON but mixed precision resolves to {precision!r}",
                f'set {key}.enabled to "auto" in the JSON, or set {key}: true in the config',
            )


def _check_lora_kernels(config: TrainingConfig, hw: Hardware, version: int) -> None:
    """Axolotl's check_multigpu_lora_kernels: LoRA kernels are not compatible with multi-GPU FSDP1."""
    kernels = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
    used = next((k for k in kernels if config.extra(k)), None)
    if used and version == 1 and config.fsdp_config is not None and (hw.world_size or 1) > 1:
        raise ConfigError(used, "LoRA kernels are not compatible with FSDP1 on more than one GPU")
