"""``plan(config, hardware) -> Plan``: the environment Accelerate must see, decided ahead of time.

This is Axolotl's ``prepare_optim_env`` (0.19.0) as a pure function, variable by variable and in
the same write order, with the defects listed in ``docs/compatibility.md`` repaired. Whatever only
the worker can know is returned as ``deferred`` steps for the bootstrap, never guessed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from optimenv import deepspeed as ds
from optimenv.errors import ConfigError, shown
from optimenv.spec import DeferredKind, SpecStep
from optimenv.versions import at_least, parse_version

if TYPE_CHECKING:
    from optimenv.config import TrainingConfig

DEFAULT_DEEPSPEED_PATH = "/etc/optimenv/deepspeed.json"

#: Rendezvous defaults Axolotl sets (setdefault) for a DeepSpeed run on a single GPU.
SINGLE_GPU_DEFAULTS = {
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "RANK": "0",
    "MASTER_ADDR": "0.0.0.0",
    "MASTER_PORT": "29500",
}


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
class Deferred:
    """A decision only the worker can take. ``kind`` is what the bootstrap dispatches on."""

    kind: DeferredKind
    variable: str | None
    source: str
    detail: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> SpecStep:
        return {
            "kind": self.kind,
            "variable": self.variable,
            "source": self.source,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class Plan:
    """The planned environment. ``deepspeed`` is the JSON the workers will read."""

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

    def to_dict(self) -> dict[str, Any]:
        """Exactly the ``optimenv plan -o json`` document."""
        return {
            "env": self.env_dict,
            "sources": self.sources,
            "deferred": [d.to_dict() for d in self.deferred],
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

    def defer(self, kind: Any, variable: str | None, source: str, **detail: Any) -> None:
        self.deferred.append(Deferred(kind, variable, source, tuple(sorted(detail.items()))))


def plan(
    config: TrainingConfig,
    hardware: Hardware | None = None,
    *,
    deepspeed_path: str = DEFAULT_DEEPSPEED_PATH,
) -> Plan:
    """Plan the environment for ``config`` on ``hardware``. Deterministic and side-effect free."""
    hw = hardware or Hardware()
    if not deepspeed_path.startswith("/"):
        raise ConfigError(
            "deepspeed_path", f"must be an absolute path on the workers, got {deepspeed_path!r}"
        )
    b = _Builder()

    if config.ddp_timeout:
        b.set("AXOLOTL_NCCL_TIMEOUT", str(config.ddp_timeout), "ddp_timeout", mode="default")
    b.defer("nccl_p2p_check", "NCCL_P2P_DISABLE", "default", value_if_unsupported="1", skip_if_set=True)

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


def _fsdp(config: TrainingConfig, b: _Builder) -> int:
    fc = config.fsdp_config
    version = config.effective_fsdp_version
    if fc is None or not fc.model_fields_set:
        # Legacy list only: Axolotl crashes here (D2); translate it as transformers does.
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
        return version

    src = "fsdp_config."
    b.set("ACCELERATE_USE_FSDP", "true", "fsdp_config")
    b.set("FSDP_VERSION", str(version), config.fsdp_version_source)
    if config.fsdp:
        b.warnings.append("fsdp: the legacy list is ignored because fsdp_config is set")
    flags = (
        ("FSDP_ACTIVATION_CHECKPOINTING", "activation_checkpointing"),
        ("FSDP_OFFLOAD_PARAMS", "offload_params"),
        ("FSDP_SYNC_MODULE_STATES", "sync_module_states"),
        ("FSDP_CPU_RAM_EFFICIENT_LOADING", "cpu_ram_efficient_loading"),
        ("FSDP_USE_ORIG_PARAMS", "use_orig_params"),
    )
    for name, key in flags:
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
        b.set(
            "FSDP_CPU_OFFLOAD_PIN_MEMORY",
            str(fc.cpu_offload_pin_memory).lower(),
            src + "cpu_offload_pin_memory",
        )
    if fc.auto_wrap_policy:
        b.set("FSDP_AUTO_WRAP_POLICY", fc.auto_wrap_policy, src + "auto_wrap_policy")
    if fc.transformer_layer_cls_to_wrap:
        b.set(
            "FSDP_TRANSFORMER_CLS_TO_WRAP",
            fc.transformer_layer_cls_to_wrap,
            src + "transformer_layer_cls_to_wrap",
        )
    if fc.min_num_params:
        b.set("FSDP_MIN_NUM_PARAMS", str(fc.min_num_params), src + "min_num_params")

    if version == 2:
        reshard = fc.reshard_after_forward
        reshard_src = src + "reshard_after_forward"
        if reshard is None and fc.sharding_strategy is not None:
            reshard = fc.sharding_strategy == "FULL_SHARD"
            reshard_src = src + "sharding_strategy"
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
    else:
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
    if fc.limit_all_gathers is not None:
        b.warnings.append(
            "fsdp_config.limit_all_gathers: Accelerate has no variable for it; it only reaches "
            "TrainingArguments (FSDP1)"
        )
    return version


def _deepspeed(
    config: TrainingConfig, hw: Hardware, b: _Builder, path: str
) -> tuple[dict[str, Any], int | None]:
    loaded = config.deepspeed_json
    if loaded is None:  # pragma: no cover - the model validator always resolves it
        raise ConfigError("deepspeed", "was not resolved; load the config with optimenv.load_config")
    ds_json = ds.json_copy(loaded)
    stage = ds.zero_stage(ds_json)
    if stage is not None and isinstance(ds_json["zero_optimization"].get("stage"), str):
        ds_json["zero_optimization"]["stage"] = stage
        b.warnings.append("deepspeed: zero_optimization.stage was a string; written as a number")
    tp = config.tensor_parallel_size or 1
    if tp > 1:
        # Axolotl's AutoTP rewrite (check_tensor_parallel_size_update_ds_json).
        ds_json.setdefault("tensor_parallel", {})["autotp_size"] = tp
        ds_json.setdefault("zero_optimization", {})["gather_16bit_weights_on_model_save"] = True
    if config.deepcompile:
        ds_json.setdefault("compile", {})["deepcompile"] = True

    b.set("ACCELERATE_USE_DEEPSPEED", "true", "deepspeed")
    b.set("ACCELERATE_DEEPSPEED_CONFIG_FILE", path, "deepspeed")
    gas, gas_src = _gradient_accumulation(config)
    b.set("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(gas), gas_src)
    if stage:
        b.set("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage), "deepspeed.zero_optimization.stage")
        if stage == 3:
            b.set("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", "deepspeed.zero_optimization.stage")
    if hw.world_size in (None, 1):
        b.defer("single_gpu_rendezvous_defaults", None, "deepspeed", defaults=dict(SINGLE_GPU_DEFAULTS))
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
        b.defer("deepspeed_zero3_config", None, "deepspeed.zero_optimization.stage", path=path)
    return ds_json, stage


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


def _parallelism(config: TrainingConfig, hw: Hardware, b: _Builder) -> None:
    enabled = False
    sizes = (
        ("PARALLELISM_CONFIG_TP_SIZE", "tensor_parallel_size", config.tensor_parallel_size),
        ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "dp_shard_size", config.dp_shard_size),
        ("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "dp_replicate_size", config.dp_replicate_size),
    )
    for name, key, value in sizes:
        if (value or 1) > 1:
            b.set(name, str(value), key)
            enabled = True
    cp = config.context_parallel_size or 1
    # Validation copies the deprecated sequence_parallel_degree into context_parallel_size.
    cp_src = (
        "sequence_parallel_degree" if config.sequence_parallel_degree is not None else "context_parallel_size"
    )
    if config.sequence_parallel_degree is not None:
        b.warnings.append("sequence_parallel_degree: deprecated; use context_parallel_size")
    if cp > 1:
        b.set("PARALLELISM_CONFIG_CP_SIZE", str(cp), cp_src)
        b.set("ACCELERATE_ALLOW_CP_STANDALONE", "true", cp_src)
        enabled = True
    ep = config.expert_parallel_size or 1
    if ep > 1:
        b.set("PARALLELISM_CONFIG_EP_SIZE", str(ep), "expert_parallel_size")
        if (config.dp_shard_size or 1) > 1:
            enabled = True
        else:
            b.warnings.append(
                "expert_parallel_size: without dp_shard_size > 1 Accelerate's ParallelismConfig "
                "stays off (as in Axolotl); only Axolotl's own patch reads PARALLELISM_CONFIG_EP_SIZE"
            )
    if enabled:
        b.set("ACCELERATE_USE_PARALLELISM_CONFIG", "true", _first_parallel_source(b))
    if hw.world_size is not None:
        check_world_size(
            {v.name: v.value for v in b.env.values()},
            {v.name: v.source for v in b.env.values()},
            hw.world_size,
            f"{hw.nodes} node(s) x {hw.gpus_per_node}",
        )


class ProcessCountError(ConfigError):
    """The parallelism sizes multiply to ``product`` processes, the job has ``world`` (C28)."""

    def __init__(self, field: str, message: str, hint: str, *, product: int, world: int) -> None:
        super().__init__(field, message, hint)
        self.product = product
        self.world = world


#: ``PARALLELISM_CONFIG_<X>_SIZE`` suffix -> the config field that sets it.
_SIZE_FIELDS = (
    ("TP", "tensor_parallel_size"),
    ("DP_SHARD", "dp_shard_size"),
    ("DP_REPLICATE", "dp_replicate_size"),
    ("CP", "context_parallel_size"),
    ("EP", "expert_parallel_size"),
)


def check_world_size(env: Mapping[str, str], sources: Mapping[str, str], world: int, what: str) -> None:
    """With the flag set the sizes must multiply to exactly ``world`` processes (C28).

    Accelerate checks this when it builds ``ParallelismConfig`` (``parallelism_config.py:370-377``);
    its one exemption, DeepSpeed sequence parallelism (``PARALLELISM_CONFIG_SP_SIZE``), is never
    planned. EP counts because Axolotl's patch, the only reader of ``PARALLELISM_CONFIG_EP_SIZE``,
    multiplies it into the total. Without the flag no ``ParallelismConfig`` is built.
    """
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG") != "true":
        return
    sizes = {var: int(env.get(f"PARALLELISM_CONFIG_{var}_SIZE", "1")) for var, _ in _SIZE_FIELDS}
    product = math.prod(sizes.values())
    if product == world:
        return
    fields = dict(_SIZE_FIELDS)
    # Data parallelism (dp_shard) is the usual knob, unless DeepSpeed shards and none was asked for;
    # then the sizes the config set, in Axolotl's order.
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED") == "true" and sizes["DP_SHARD"] == 1
    candidates = [
        *(["DP_SHARD"] if not deepspeed else []),
        *(var for var, _ in _SIZE_FIELDS if var != "DP_SHARD" and sizes[var] > 1),
    ]
    first = next(var for var, _ in _SIZE_FIELDS if sizes[var] > 1)
    message = (
        f"the parallelism sizes multiply to {product}, but Accelerate needs them to equal the "
        f"{world} processes ({what})"
    )
    for var in candidates:
        rest = product // sizes[var]
        if world % rest == 0:
            field_name = sources.get(f"PARALLELISM_CONFIG_{var}_SIZE", fields[var])
            raise ProcessCountError(
                field_name,
                message,
                f"set {field_name} to {world // rest} so the sizes multiply to the {world} GPUs",
                product=product,
                world=world,
            )
    raise ProcessCountError(
        sources.get(f"PARALLELISM_CONFIG_{first}_SIZE", fields[first]),
        message,
        "make tensor_parallel_size x dp_shard_size x dp_replicate_size x context_parallel_size "
        f"(x expert_parallel_size) equal {world}",
        product=product,
        world=world,
    )


def _first_parallel_source(b: _Builder) -> str:
    return next(v.source for v in b.env.values() if v.name.startswith("PARALLELISM_CONFIG_"))


def _torch_compile(config: TrainingConfig, hw: Hardware, b: _Builder) -> None:
    if not config.torch_compile:
        return
    backend = (config.torch_compile_backend or "inductor").upper()
    src = "torch_compile_backend" if config.torch_compile_backend else "torch_compile"
    if config.torch_compile == "auto":
        if hw.torch_version is None:
            b.defer(
                "torch_compile_auto",
                "ACCELERATE_DYNAMO_BACKEND",
                "torch_compile",
                value=backend,
                min_torch="2.5.1",
            )
            return
        if not at_least(hw.torch_version, "2.5.1"):
            return
    b.set("ACCELERATE_DYNAMO_BACKEND", backend, src)


def _mixed_precision(
    config: TrainingConfig, hw: Hardware, b: _Builder, ds_json: dict[str, Any] | None
) -> str | None:
    name = "ACCELERATE_MIXED_PRECISION"
    bf16_explicit = "bf16" in config.model_fields_set
    if config.fp8:
        if hw.fp8_supported is False:
            raise ConfigError(
                "fp8",
                "fp8 requested, but the target GPUs do not support fp8",
                "remove fp8 or target GPUs of compute capability >= 8.9",
            )
        if hw.fp8_supported is None:
            b.defer("require_fp8", name, "fp8")
        value, src = "fp8", "fp8"
        if not config.torch_compile:
            b.warnings.append("fp8: without torch_compile fp8 training may be slower than bf16")
        if config.bf16 is True or config.fp16:
            b.warnings.append("fp8: takes precedence over bf16/fp16 (as in Axolotl)")
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
    elif config.bf16 == "auto":
        fallback = "fp16" if config.fp16 else "no"
        if config.fp16 and not bf16_explicit:
            # Axolotl picks bf16 here on bf16 hardware although the user asked for fp16.
            value, src = "fp16", "fp16"
        elif hw.bf16_supported is None:
            b.defer("bf16_auto", name, "bf16", if_supported="bf16", otherwise=fallback)
            _check_deepspeed_precision(ds_json, None, b)
            return None
        elif hw.bf16_supported:
            value, src = "bf16", "bf16"
            if config.fp16:
                b.warnings.append("fp16: ignored because bf16: auto resolves to bf16 here (as in Axolotl)")
        else:
            value, src = fallback, ("fp16" if config.fp16 else "bf16")
    elif config.fp16:
        value, src = "fp16", "fp16"
    else:
        value, src = "no", "bf16" if bf16_explicit else "default"
    _check_deepspeed_precision(ds_json, value, b)
    b.set(name, value, src)
    return value


def _check_deepspeed_precision(ds_json: dict[str, Any] | None, precision: str | None, b: _Builder) -> None:
    """A DeepSpeed JSON that hard-codes a precision the plan does not use trains wrongly (D14)."""
    if ds_json is None:
        return
    for key in ("bf16", "fp16"):
        if ds.precision_flag(ds_json, key) is True:
            if precision is None:
                b.deferred[-1] = Deferred(
                    b.deferred[-1].kind,
                    b.deferred[-1].variable,
                    b.deferred[-1].source,
                    tuple(sorted({**dict(b.deferred[-1].detail), "deepspeed_requires": key}.items())),
                )
            elif precision != key and not (precision == "fp8" and key == "bf16"):
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
