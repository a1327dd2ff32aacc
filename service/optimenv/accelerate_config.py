"""``accelerate config`` files as input: the format modelled with pydantic, translated into the
training config the planner reads, so that one planner serves both formats.

What a file means is what ``accelerate launch --config_file F`` makes of it (Accelerate 1.15):
``_validate_launch_command`` flattens the sections into launcher arguments with the launcher's
defaults (``commands/launch.py:1202-1388``), and ``prepare_multi_gpu_env`` /
``prepare_deepspeed_cmd_env`` turn those into the environment (``utils/launch.py:201-591``). The
translation writes those defaults out, and what only a launcher sets travels as
:class:`~optimenv.config.LaunchSettings`. Where the file names something optimenv does not plan
(TPUs, Megatron-LM, SageMaker, CPU runs) it is refused with one line instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optimenv.config import (
    DYNAMO_BACKENDS,
    LaunchSettings,
    TrainingConfig,
    _did_you_mean,
    _lax_int,
    fsdp_key_hint,
)
from optimenv.errors import ConfigError
from optimenv.validation import config_error

_STRICT = ConfigDict(extra="forbid", frozen=True)
DistributedType = Literal["NO", "MULTI_GPU", "FSDP", "DEEPSPEED"]
DEFAULT_MIN_NUM_PARAMS = 100_000_000  # accelerate launch --fsdp_min_num_params default (launch.py:527-532)


class DynamoSection(BaseModel):
    """``dynamo_config`` (keys without the ``dynamo_`` prefix get it, as the launcher adds it)."""

    model_config = _STRICT

    dynamo_backend: str = "NO"
    dynamo_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    dynamo_use_fullgraph: bool = False
    dynamo_use_dynamic: bool = False
    dynamo_use_regional_compilation: bool = False

    @field_validator("dynamo_backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.upper() not in DYNAMO_BACKENDS:
                raise ValueError(
                    f"unknown backend {value!r}; {_did_you_mean(value.upper(), DYNAMO_BACKENDS, 'backends')}"
                )
            return value.upper()
        return value


OffloadDevice = Literal["none", "cpu", "nvme"]


class DeepSpeedSection(BaseModel):
    """``deepspeed_config``: a ``deepspeed_config_file``, or the settings Accelerate builds a JSON from."""

    model_config = _STRICT

    deepspeed_config_file: str | None = None
    zero_stage: Literal[0, 1, 2, 3] | None = None
    offload_optimizer_device: OffloadDevice | None = None
    offload_param_device: OffloadDevice | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    gradient_accumulation_steps: int | None = Field(default=None, ge=1)
    gradient_clipping: float | None = None
    zero3_init_flag: bool | None = None
    zero3_save_16bit_model: bool | None = None
    deepspeed_hostfile: str | None = None
    deepspeed_exclusion_filter: str | None = None
    deepspeed_inclusion_filter: str | None = None
    deepspeed_multinode_launcher: str | None = None
    deepspeed_moe_layer_cls_names: str | None = None

    @field_validator("offload_optimizer_device", "offload_param_device", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class ParallelismSection(BaseModel):
    """``parallelism_config``: Accelerate's ``ParallelismConfig`` sizes, with their full names."""

    model_config = _STRICT

    parallelism_config_dp_replicate_size: int = Field(default=1, ge=1)
    parallelism_config_dp_shard_size: int = Field(default=1, ge=1)
    parallelism_config_tp_size: int = Field(default=1, ge=1)
    parallelism_config_cp_size: int = Field(default=1, ge=1)
    parallelism_config_cp_backend: Literal["torch"] = "torch"
    parallelism_config_cp_comm_strategy: Literal["allgather", "alltoall"] | None = None
    parallelism_config_sp_size: int = Field(default=1, ge=1)
    parallelism_config_sp_backend: Literal["deepspeed"] = "deepspeed"
    parallelism_config_sp_seq_length: int | str | None = None
    parallelism_config_sp_seq_length_is_variable: bool | None = None
    parallelism_config_sp_attn_implementation: str | None = None


class AccelerateConfig(BaseModel):
    """An ``accelerate config`` file (Accelerate's ``ClusterConfig``, ``commands/config/config_args.py``)."""

    model_config = _STRICT

    compute_environment: Literal["LOCAL_MACHINE", "AMAZON_SAGEMAKER"] = "LOCAL_MACHINE"
    distributed_type: str
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = None
    use_cpu: bool = False
    debug: bool = False
    num_processes: int | None = Field(default=None, ge=-1)
    machine_rank: int = Field(default=0, ge=0)
    num_machines: int = Field(default=1, ge=1)
    gpu_ids: str | int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    rdzv_backend: str | None = "static"
    same_network: bool | None = None
    main_training_function: str = "main"
    enable_cpu_affinity: bool = False
    downcast_bf16: bool | str = False
    fp8_config: dict[str, Any] | None = None
    deepspeed_config: DeepSpeedSection | None = None
    fsdp_config: dict[str, Any] | None = None
    parallelism_config: ParallelismSection | None = None
    megatron_lm_config: dict[str, Any] | None = None
    mpirun_config: dict[str, Any] | None = None
    dynamo_config: DynamoSection | None = None
    tpu_name: str | None = None
    tpu_zone: str | None = None
    tpu_use_cluster: bool = False
    tpu_use_sudo: bool = False
    command_file: str | None = None
    commands: list[str] | None = None
    tpu_vm: list[str] | None = None
    tpu_env: list[str] | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("distributed_type", mode="before")
    @classmethod
    def _distributed(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


#: Every top-level key of the format, with the two legacy ones Accelerate still converts.
ACCELERATE_KEYS = frozenset({*AccelerateConfig.model_fields, "fp16", "dynamo_backend"})
#: Keys that an Axolotl config has (or might plausibly have) too: they say nothing about the format.
_SHARED_KEYS = frozenset({"fsdp_config", "fp16", "debug"})
ACCELERATE_ONLY_KEYS = ACCELERATE_KEYS - _SHARED_KEYS
#: The ``fsdp_config`` keys the launcher hands to Accelerate, without their ``fsdp_`` prefix.
FSDP_KEYS = (
    "version",
    "sharding_strategy",
    "reshard_after_forward",
    "offload_params",
    "min_num_params",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "backward_prefetch",
    "state_dict_type",
    "forward_prefetch",
    "use_orig_params",
    "cpu_ram_efficient_loading",
    "sync_module_states",
    "activation_checkpointing",
    "activation_checkpointing_offload",
    "ignored_modules",
)
#: What DeepSpeedPlugin refuses next to a ``deepspeed_config_file`` (``_deepspeed_config_checks``).
_IGNORED_WITH_FILE = (
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
)
_SIZES = {
    "tp": "parallelism_config_tp_size",
    "dp_shard": "parallelism_config_dp_shard_size",
    "dp_replicate": "parallelism_config_dp_replicate_size",
    "cp": "parallelism_config_cp_size",
}
_SIZE_FIELDS = {
    "tp": "tensor_parallel_size",
    "dp_shard": "dp_shard_size",
    "dp_replicate": "dp_replicate_size",
    "cp": "context_parallel_size",
}


def parse_accelerate_config(data: dict[str, Any], *, base_dirs: tuple[Path, ...] = ()) -> TrainingConfig:
    """Validate an ``accelerate config`` mapping and translate it into a :class:`TrainingConfig`.

    Relative ``deepspeed_config_file`` paths resolve in ``base_dirs``, like an Axolotl config's.
    """
    data = _legacy_keys(data)
    _check_keys(data, AccelerateConfig.model_fields, "")
    for section, model in (
        ("deepspeed_config", DeepSpeedSection),
        ("parallelism_config", ParallelismSection),
    ):
        if isinstance(data.get(section), dict):
            _check_keys(data[section], model.model_fields, f"{section}.")
    if isinstance(data.get("dynamo_config"), dict):
        data["dynamo_config"] = _prefixed(data["dynamo_config"], "dynamo_", "dynamo_config")
        _check_keys(data["dynamo_config"], DynamoSection.model_fields, "dynamo_config.")
    try:
        acc = AccelerateConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, root="config") from None
    return _Translation(acc, base_dirs).config()


def _legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Accelerate's ``BaseConfig.process_config``: ``fp16: true`` and a top-level ``dynamo_backend``."""
    data = dict(data)
    legacy_fp16 = data.pop("fp16", None)
    if "mixed_precision" not in data and legacy_fp16:
        data["mixed_precision"] = "fp16"
    if "dynamo_backend" in data:
        backend = data.pop("dynamo_backend")
        data["dynamo_config"] = {} if backend == "NO" else {"dynamo_backend": backend}
    if data.get("distributed_type") is None:
        raise ConfigError(
            "distributed_type", "is required in an accelerate config file", "e.g. FSDP, DEEPSPEED, MULTI_GPU"
        )
    return data


def _check_keys(data: dict[Any, Any], known: Any, where: str) -> None:
    names = sorted(known)
    for key in data:
        if key not in known:
            # parallelism_config's keys carry the section's name: tp_size means parallelism_config_tp_size.
            prefixed = f"{where.rstrip('.')}_{key}"
            hint = f"did you mean {prefixed!r}?" if prefixed in known else _did_you_mean(str(key), names)
            raise ConfigError(f"{where}{key}", "unknown key", hint)


def _prefixed(section: dict[Any, Any], prefix: str, where: str) -> dict[str, Any]:
    """Add the launcher's prefix where a key lacks it (``_validate_launch_command``); both spellings of
    one key with different values are refused."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        if not isinstance(key, str):
            raise ConfigError(where, f"keys must be strings, got {key!r}")
        name = key if key.startswith(prefix) else prefix + key
        if name in out and out[name] != value:
            raise ConfigError(
                f"{where}.{key}", f"conflicts with {where}.{name}", "keep one of the two spellings"
            )
        out[name] = value
    return out


class _Translation:
    """One file's translation: the Axolotl-style mapping, the fields it came from, the launcher's part."""

    def __init__(self, acc: AccelerateConfig, base_dirs: tuple[Path, ...]) -> None:
        self.acc = acc
        self.base_dirs = base_dirs
        self.data: dict[str, Any] = {}
        self.fields: dict[str, str] = {}
        self.warnings: list[str] = []
        self.extra: dict[str, Any] = {}

    def config(self) -> TrainingConfig:
        acc = self.acc
        self._refuse_unsupported()
        self._precision()
        kind = acc.distributed_type
        for section, wanted in (("fsdp_config", "FSDP"), ("deepspeed_config", "DEEPSPEED")):
            if getattr(acc, section) and kind != wanted:
                self.warnings.append(
                    f"{section}: not used, distributed_type is {kind} (accelerate launch ignores it too)"
                )
        if kind == "FSDP":
            self._fsdp(_prefixed(acc.fsdp_config or {}, "fsdp_", "fsdp_config"))
        if kind == "DEEPSPEED":
            self._deepspeed(acc.deepspeed_config or DeepSpeedSection())
        self._parallelism()
        self._dynamo()
        launch = self._launch()
        try:
            config = TrainingConfig.model_validate(self.data, context={"base_dirs": self.base_dirs})
        except ValidationError as exc:
            error = config_error(exc, root="config", unknown_hint=fsdp_key_hint)
            raise ConfigError(launch.field(error.field), error.reason, error.hint) from None
        except ConfigError as exc:
            raise ConfigError(launch.field(exc.field), exc.reason, exc.hint) from None
        config._launch = launch
        return config

    def _refuse_unsupported(self) -> None:
        acc = self.acc
        if acc.compute_environment != "LOCAL_MACHINE":
            raise ConfigError(
                "compute_environment",
                f"{acc.compute_environment} is not planned by optimenv",
                "use LOCAL_MACHINE",
            )
        if acc.distributed_type not in DistributedType.__args__:  # type: ignore[attr-defined]
            raise ConfigError(
                "distributed_type",
                f"{acc.distributed_type} is not planned by optimenv",
                f"use one of {', '.join(DistributedType.__args__)}",  # type: ignore[attr-defined]
            )
        if acc.use_cpu:
            raise ConfigError(
                "use_cpu",
                "CPU runs are not planned from accelerate config files",
                "optimenv run --cpu trains on CPUs",
            )
        if acc.fp8_config:
            raise ConfigError(
                "fp8_config",
                "is not planned by optimenv yet",
                "remove it; mixed_precision: fp8 alone is planned",
            )
        parallel = acc.parallelism_config
        if parallel is not None and parallel.parallelism_config_sp_size > 1:
            raise ConfigError(
                "parallelism_config.parallelism_config_sp_size",
                "DeepSpeed sequence parallelism is not planned by optimenv yet",
                "use parallelism_config_cp_size (context parallelism)",
            )

    def _precision(self) -> None:
        mp = self.acc.mixed_precision or "no"  # the launcher's default (launch.py:1290-1295)
        self.data.update(bf16=mp == "bf16", fp16=mp == "fp16" or None, fp8=mp == "fp8" or None)
        for name in ("bf16", "fp16", "fp8"):
            self.fields[name] = "mixed_precision"

    def _fsdp(self, section: dict[str, Any]) -> None:
        keys = {key.removeprefix("fsdp_"): key for key in section}
        for name, key in keys.items():
            if name not in FSDP_KEYS:
                raise ConfigError(f"fsdp_config.{key}", "unknown key", _did_you_mean(name, FSDP_KEYS))
        given = {name: section[key] for name, key in keys.items()}
        version = _lax_int(given.pop("version", 1))
        fc = _fsdp_with_defaults(given, version, self.warnings)
        self.data["fsdp_version"] = version
        self.data["fsdp_config"] = fc
        self.fields.update(fsdp_config="distributed_type", fsdp_version="fsdp_config.fsdp_version")
        for name in fc:
            self.fields[f"fsdp_config.{name}"] = (
                f"fsdp_config.{keys[name]}" if name in keys else f"accelerate launch default (fsdp_{name})"
            )

    def _deepspeed(self, ds: DeepSpeedSection) -> None:
        written = ds.model_fields_set
        if ds.deepspeed_config_file is not None:
            if not ds.deepspeed_config_file.strip():
                raise ConfigError(
                    "deepspeed_config.deepspeed_config_file", "is empty", "name a DeepSpeed JSON file"
                )
            clash = [name for name in _IGNORED_WITH_FILE if name in written]
            if self.acc.mixed_precision is not None:
                clash.append("mixed_precision")
            if clash:
                where = "mixed_precision" if clash[0] == "mixed_precision" else f"deepspeed_config.{clash[0]}"
                raise ConfigError(
                    where,
                    "Accelerate refuses it next to deepspeed_config_file (DeepSpeedPlugin ignores it "
                    "and raises)",
                    "set it in the DeepSpeed JSON file, or pass --mixed_precision to accelerate launch",
                )
            self.data["deepspeed"] = ds.deepspeed_config_file
            self.fields["deepspeed"] = "deepspeed_config.deepspeed_config_file"
        else:
            self.data["deepspeed"] = _deepspeed_json(ds)
            self.fields["deepspeed"] = "deepspeed_config"
        if ds.gradient_accumulation_steps is not None:
            self.data["gradient_accumulation_steps"] = ds.gradient_accumulation_steps
            self.fields["gradient_accumulation_steps"] = "deepspeed_config.gradient_accumulation_steps"
        self.extra.update(
            gradient_accumulation_written=ds.gradient_accumulation_steps is not None,
            zero3_init=ds.zero3_init_flag,
            moe_layer_cls_names=ds.deepspeed_moe_layer_cls_names,
        )

    def _parallelism(self) -> None:
        parallel = self.acc.parallelism_config
        if parallel is None:
            return
        if self.acc.distributed_type == "NO":
            self.warnings.append(
                "parallelism_config: not used for one process (accelerate launch ignores it too)"
            )
            return
        for axis, key in _SIZES.items():
            self.data[_SIZE_FIELDS[axis]] = getattr(parallel, key)
            self.fields[_SIZE_FIELDS[axis]] = f"parallelism_config.{key}"
        self.extra.update(
            parallelism_config=True, cp_comm_strategy=parallel.parallelism_config_cp_comm_strategy
        )

    def _dynamo(self) -> None:
        dynamo = self.acc.dynamo_config
        if dynamo is None or dynamo.dynamo_backend == "NO":
            return
        if self.acc.distributed_type == "DEEPSPEED":
            # prepare_deepspeed_cmd_env writes no ACCELERATE_DYNAMO_* (utils/launch.py:430-591).
            self.warnings.append(
                "dynamo_config: accelerate launch does not pass it to DeepSpeed runs, so torch.compile "
                "stays off here too"
            )
            return
        self.data.update(torch_compile=True, torch_compile_backend=dynamo.dynamo_backend)
        self.fields.update(
            torch_compile="dynamo_config", torch_compile_backend="dynamo_config.dynamo_backend"
        )
        self.extra.update(
            dynamo_mode=dynamo.dynamo_mode,
            dynamo_fullgraph=dynamo.dynamo_use_fullgraph,
            dynamo_dynamic=dynamo.dynamo_use_dynamic,
            dynamo_regional=dynamo.dynamo_use_regional_compilation,
        )

    def _launch(self) -> LaunchSettings:
        acc = self.acc
        processes = acc.num_processes if acc.num_processes not in (None, -1) else None
        if acc.distributed_type == "NO" and processes is None:
            processes = 1  # process_config's default for one process
        if processes is not None and processes % acc.num_machines:
            raise ConfigError(
                "num_processes",
                f"{processes} is not a multiple of num_machines {acc.num_machines}",
                "accelerate launch starts num_processes / num_machines processes on each machine",
            )
        names = {axis: f"parallelism_config.{key}" for axis, key in _SIZES.items()}
        return LaunchSettings(
            machines=acc.num_machines,
            processes=processes,
            fields=self.fields,
            size_names={**names, "ep": "expert_parallel_size", "config": "parallelism_config"},
            debug=acc.debug,
            cpu_affinity=acc.enable_cpu_affinity,
            warnings=tuple(self.warnings),
            **self.extra,
        )


def _fsdp_with_defaults(given: dict[str, Any], version: Any, warnings: list[str]) -> dict[str, Any]:
    """The FSDP settings ``accelerate launch`` hands to Accelerate for ``version``, defaults written out.

    Defaults (``launch.py:514-598``): ``cpu_ram_efficient_loading``, ``sync_module_states`` and (FSDP1)
    ``use_orig_params`` are on; a size-based policy wraps at 1e8 parameters. FSDP2 ignores the
    FSDP1-only keys; FSDP1 reads its strategy from ``sharding_strategy``.
    """
    fc = dict(given)
    fc.setdefault("cpu_ram_efficient_loading", True)
    fc.setdefault("sync_module_states", True)
    if _truthy(fc["cpu_ram_efficient_loading"]) and not _truthy(fc["sync_module_states"]):
        # prepare_multi_gpu_env refuses it (utils/launch.py:306-307).
        raise ConfigError(
            "fsdp_config.fsdp_sync_module_states",
            "must be true when fsdp_cpu_ram_efficient_loading is true (accelerate launch refuses it)",
        )
    if str(fc.get("auto_wrap_policy", "")).upper() == "SIZE_BASED_WRAP":
        fc.setdefault("min_num_params", DEFAULT_MIN_NUM_PARAMS)
    else:
        fc.pop("min_num_params", None)  # read by Accelerate for a size-based policy only
    reshard = fc.pop("reshard_after_forward", None)
    if version == 2:
        # FSDP1-only settings; Accelerate's FSDP2 plugin ignores them (utils/dataclasses.py:1938-1956).
        for key in ("sharding_strategy", "use_orig_params", "sync_module_states", "forward_prefetch"):
            if fc.pop(key, None) is not None and key in ("sharding_strategy", "forward_prefetch"):
                warnings.append(f"fsdp_config.fsdp_{key}: FSDP1 only; FSDP2 ignores it (as Accelerate does)")
        fc["reshard_after_forward"] = True if reshard is None else reshard
        return fc
    fc.setdefault("use_orig_params", True)
    if "sharding_strategy" not in fc:
        # `accelerate config` writes FSDP1's strategy as fsdp_reshard_after_forward, which the launcher
        # then overrides with its default FULL_SHARD (C32): honour what the file says.
        fc["sharding_strategy"] = _strategy(reshard) if reshard is not None else "FULL_SHARD"
    elif reshard is not None:
        warnings.append(
            "fsdp_config: FSDP1 follows fsdp_sharding_strategy; fsdp_reshard_after_forward is ignored"
        )
    return fc


def _strategy(reshard: Any) -> Any:
    """FSDP1's strategy from ``fsdp_reshard_after_forward``: a strategy name, or a boolean (C4)."""
    if isinstance(reshard, bool):
        return "FULL_SHARD" if reshard else "SHARD_GRAD_OP"
    if isinstance(reshard, str) and reshard.strip().lower() in ("true", "false"):
        return "FULL_SHARD" if reshard.strip().lower() == "true" else "SHARD_GRAD_OP"
    return reshard


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on", "t")
    return bool(value)


def _deepspeed_json(ds: DeepSpeedSection) -> dict[str, Any]:
    """The JSON ``DeepSpeedPlugin`` builds from the launcher's variables when no file is named
    (``utils/dataclasses.py:1301-1324``); the NVMe paths never reach it from ``accelerate launch``."""
    for key in ("offload_optimizer_device", "offload_param_device"):
        if getattr(ds, key) == "nvme":
            raise ConfigError(
                f"deepspeed_config.{key}",
                "nvme: accelerate launch does not pass the NVMe paths to Accelerate",
                "name a deepspeed_config_file that sets offload_*.nvme_path",
            )
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": ds.gradient_accumulation_steps or "auto",
        "zero_optimization": {
            "stage": 2 if ds.zero_stage is None else ds.zero_stage,
            "offload_optimizer": {"device": ds.offload_optimizer_device or "none", "nvme_path": None},
            "offload_param": {"device": ds.offload_param_device or "none", "nvme_path": None},
            "stage3_gather_16bit_weights_on_model_save": bool(ds.zero3_save_16bit_model),
        },
    }
    clipping = "auto" if ds.gradient_clipping is None else ds.gradient_clipping
    if clipping:
        config["gradient_clipping"] = clipping
    return config
