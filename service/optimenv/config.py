"""Pydantic models of the part of an Axolotl config that decides the distributed environment.

Users hand us the file they train with: keys outside the sections we own are kept untouched.
Inside ``fsdp_config`` every key is ours, so a misspelt one is an error with a suggestion.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from optimenv import deepspeed as ds
from optimenv import limits
from optimenv.errors import ConfigError, shown
from optimenv.limits import INT_MAX, MAX_CONFIG_BYTES, MAX_DEPTH, MAX_INT_CHARS, MAX_VALUES
from optimenv.validation import config_error

try:  # libyaml scans and parses about 3x faster; composing stays in Python, where it is counted
    from yaml.cyaml import CParser as _Parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_VALUES", "TrainingConfig", "load_config", "parse_config"]
MAX_CONFIG_VALUES = MAX_VALUES
Int64 = Annotated[int, Field(le=INT_MAX)]

StateDictType = Literal["FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT"]
ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]
BackwardPrefetch = Literal["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"]
_SHARDING_BY_NUMBER = {str(i + 1): s for i, s in enumerate(ShardingStrategy.__args__)}  # type: ignore[attr-defined]
LEGACY_FSDP_ITEMS = (
    "full_shard",
    "shard_grad_op",
    "no_shard",
    "hybrid_shard",
    "hybrid_shard_zero2",
    "offload",
    "auto_wrap",
)
BNB_8BIT_OPTIMIZERS = frozenset({"adamw_8bit", "adamw_bnb_8bit"})


class FSDPConfig(BaseModel):
    """``fsdp_config``: every key Axolotl reads plus the FSDP1 keys Accelerate reads from env."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fsdp_version: Literal[1, 2] | None = None
    activation_checkpointing: bool | None = None
    offload_params: bool | None = None
    sync_module_states: bool | None = None
    cpu_ram_efficient_loading: bool | None = None
    cpu_offload_pin_memory: bool | None = None
    use_orig_params: bool | None = None
    state_dict_type: StateDictType | None = None
    final_state_dict_type: StateDictType | None = None
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP"] | None = None
    transformer_layer_cls_to_wrap: str | None = None
    min_num_params: Int64 | None = Field(default=None, ge=1)
    reshard_after_forward: bool | None = None
    mixed_precision_policy: str | None = None
    # Accepted by Accelerate but dropped by Axolotl's schema (defect D1).
    sharding_strategy: ShardingStrategy | None = None
    backward_prefetch: BackwardPrefetch | None = None
    forward_prefetch: bool | None = None
    limit_all_gathers: bool | None = None
    activation_checkpointing_offload: bool | None = None
    ignored_modules: str | None = None

    @field_validator(
        "state_dict_type", "final_state_dict_type", "auto_wrap_policy", "backward_prefetch", mode="before"
    )
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("sharding_strategy", mode="before")
    @classmethod
    def _sharding(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            value = _SHARDING_BY_NUMBER.get(value.strip(), value.strip().upper())
        return value

    @field_validator("transformer_layer_cls_to_wrap", mode="before")
    @classmethod
    def _classes(cls, value: Any) -> Any:
        # Accelerate splits on "," without stripping, so "A, B" would look for " B".
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if not all(parts):
                raise ValueError("class names must be non-empty, separated by commas")
            odd = next((p for p in parts if not p.isidentifier()), None)
            if odd is not None:
                # Accelerate compares them with each module's class __name__: nothing else can match.
                raise ValueError(f"{shown(odd)} is not a class name (a Python identifier)")
            value = ",".join(parts)
        return value

    @model_validator(mode="after")
    def _size_wrap_needs_min(self) -> FSDPConfig:
        if self.auto_wrap_policy == "SIZE_BASED_WRAP" and self.min_num_params is None:
            raise ConfigError(
                "fsdp_config.min_num_params", "is required when auto_wrap_policy is SIZE_BASED_WRAP"
            )
        return self


_FSDP_KEYS = tuple(FSDPConfig.model_fields)


def _normalise_fsdp_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Strip the ``fsdp_`` prefix (only the prefix; Axolotl removes every occurrence, D19)."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError("fsdp_config", f"keys must be strings, got {shown(key)}")
        name = key if key == "fsdp_version" else key.removeprefix("fsdp_")
        if name == "version":
            name = "fsdp_version"
        if name in out and out[name] != value:
            raise ConfigError(
                f"fsdp_config.{limits.key_text(key)}",
                f"conflicts with fsdp_config.{limits.key_text(origin[name])} "
                f"({shown(value)} vs {shown(out[name])})",
                "keep one of the two spellings",
            )
        out[name] = value
        origin[name] = key
    for name in out:
        if name not in _FSDP_KEYS:
            where = f"fsdp_config.{limits.key_text(origin[name])}"
            raise ConfigError(where, "unknown key", fsdp_key_hint(name))
    return out


def _check_version(version: Any, field: str) -> None:
    """An FSDP version other than 1 or 2, named where it was written (not where it was copied to)."""
    if version is not None and (type(version) is not int or version not in (1, 2)):
        raise ConfigError(field, f"must be 1 or 2, got {shown(version)}")


def _lax_int(value: Any) -> Any:
    """``"2"`` -> ``2``, as Axolotl's ``int`` field coerces it (and ``str(v) == "2"`` compares it)."""
    text = value.strip() if isinstance(value, str) else ""
    if 0 < len(text) <= 19 and text.isascii() and text.isdecimal():  # 19 digits: always a 64-bit int
        return int(text)
    return value


def fsdp_key_hint(name: str) -> str:
    """The hint for an unknown ``fsdp_config`` key."""
    return _did_you_mean(name, _FSDP_KEYS)


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str], noun: str = "keys") -> str:
    close = difflib.get_close_matches(word[:100], choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    known = sorted(choices)
    more = f" and {len(known) - MAX_LISTED} more" if len(known) > MAX_LISTED else ""
    return f"known {noun}: {', '.join(known[:MAX_LISTED])}{more}"


#: A "known keys" hint lists at most this many (a message stays one readable line).
MAX_LISTED = 12


class TrainingConfig(BaseModel):
    """An Axolotl-style training config; keys we do not own are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    fsdp: list[str] | None = None
    fsdp_version: Literal[1, 2] | None = None
    fsdp_config: FSDPConfig | None = None
    deepspeed: str | dict[str, Any] | None = None
    deepcompile: bool | None = None
    bf16: Literal["auto"] | bool | None = "auto"
    fp16: bool | None = None
    fp8: bool | None = None
    fp8_enable_fsdp_float8_all_gather: bool | None = None
    tf32: Literal["auto"] | bool | None = "auto"
    torch_compile: Literal["auto"] | bool | None = None
    torch_compile_backend: str | None = None
    torch_compile_options: dict[str, bool | int | float | str] | None = None
    tensor_parallel_size: Int64 | None = Field(default=None, ge=1)
    dp_shard_size: Int64 | None = Field(default=None, ge=1)
    dp_replicate_size: Int64 | None = Field(default=None, ge=1)
    context_parallel_size: Int64 | None = Field(default=None, ge=1)
    sequence_parallel_degree: Int64 | None = Field(default=None, ge=1)
    expert_parallel_size: Int64 | None = Field(default=None, ge=1)
    gradient_accumulation_steps: Int64 | None = Field(default=1, ge=1)
    micro_batch_size: Int64 | None = Field(default=1, ge=1)
    batch_size: Int64 | None = Field(default=None, ge=1)
    ddp_timeout: Int64 | None = Field(default=None, ge=1)
    use_ray: bool = False
    ray_run_name: str | None = None
    ray_num_workers: Int64 = Field(default=1, ge=1)
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"GPU": 1.0})

    _deepspeed_json: dict[str, Any] | None = PrivateAttr(default=None)
    _deepspeed_origin: str | None = PrivateAttr(default=None)
    _fsdp_version_source: str = PrivateAttr(default="default")
    _launch: LaunchSettings | None = PrivateAttr(default=None)

    @field_validator("fsdp", mode="before")
    @classmethod
    def _legacy_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split()
        if isinstance(value, list):
            for item in value:
                if item not in LEGACY_FSDP_ITEMS:
                    hint = _did_you_mean(str(item), LEGACY_FSDP_ITEMS, "items")
                    raise ValueError(f"unknown item {shown(item)}; {hint}")
            strategies = [i for i in value if i not in ("offload", "auto_wrap")]
            if len(set(strategies)) > 1:
                # transformers refuses these combinations too; one would be silently dropped.
                raise ValueError(f"at most one sharding strategy, got {', '.join(strategies)}")
        return value

    @field_validator("torch_compile_backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        if isinstance(value, str):
            upper = value.upper()
            if upper not in DYNAMO_BACKENDS:
                hint = _did_you_mean(upper, DYNAMO_BACKENDS, "backends")
                raise ValueError(f"unknown backend {shown(value)}; {hint}")
        return value

    @field_validator("torch_compile_options")
    @classmethod
    def _inductor_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Axolotl's allowlist of torch._inductor.config flags (schemas/config.py:1617-1629).
        unknown = sorted(set(value or ()) - INDUCTOR_OPTIONS)
        if unknown:
            hint = _did_you_mean(unknown[0], sorted(INDUCTOR_OPTIONS), "options")
            raise ValueError(f"{', '.join(map(repr, unknown))} not allowed; {hint}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("deepspeed") in ("", {}):
            # Axolotl tests `cfg.deepspeed` for truth (trainer.py:667): an empty value is no DeepSpeed.
            data["deepspeed"] = None
        raw = data.get("fsdp_config")
        top = _lax_int(data.get("fsdp_version"))
        _check_version(top, "fsdp_version")
        if top is not None:
            data["fsdp_version"] = top
        if isinstance(raw, dict):
            fc = _normalise_fsdp_keys(raw)
            inner = _lax_int(fc.get("fsdp_version"))
            written = next((k for k in raw if k in ("version", "fsdp_version")), "fsdp_version")
            _check_version(inner, f"fsdp_config.{written}")
            if top is not None and inner is not None and str(top) != str(inner):
                raise ConfigError(
                    "fsdp_version",
                    f"{shown(top)} conflicts with fsdp_config.fsdp_version {shown(inner)}",
                    "set the FSDP version in one place",
                )
            version = top if top is not None else inner
            if version is None and fc:
                # transformers >= 5.10 defaults a missing version to 2 while Accelerate's env
                # default is 1: pin 1, as Axolotl does, so both channels agree.
                version = 1
            if fc:
                fc["fsdp_version"] = version
            data["fsdp_config"] = fc
            if version is not None:
                data["fsdp_version"] = version
        sp = data.get("sequence_parallel_degree")
        cp = data.get("context_parallel_size")
        if sp is not None:
            if cp is not None and _lax_int(cp) != _lax_int(sp):
                raise ConfigError(
                    "sequence_parallel_degree",
                    f"{shown(sp)} conflicts with context_parallel_size {shown(cp)}",
                    "sequence_parallel_degree is the deprecated name of context_parallel_size; keep one",
                )
            data["context_parallel_size"] = sp
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _remember_version_source(cls, data: Any, handler: Any) -> TrainingConfig:
        # Runs before ``_prepare`` (a wrap validator defined later is outermost), so it sees the
        # keys as written: the pinned FSDP1 default must not be reported as the user's choice.
        model: TrainingConfig = handler(data)
        if isinstance(data, dict):
            raw = data.get("fsdp_config")
            if data.get("fsdp_version") is not None:
                model._fsdp_version_source = "fsdp_version"
            elif isinstance(raw, dict):
                written = next((k for k in ("version", "fsdp_version") if raw.get(k) is not None), None)
                if written is not None:
                    model._fsdp_version_source = f"fsdp_config.{written}"
        return model

    @model_validator(mode="after")
    def _resolve_deepspeed(self, info: ValidationInfo) -> TrainingConfig:
        value = self.deepspeed
        if value is None:
            return self
        if isinstance(value, dict):
            ds.check_json(value)
            self._deepspeed_json = ds.json_copy(value)
            self._deepspeed_origin = "inline"
        elif value in ds.PRESETS:
            self._deepspeed_json = ds.preset(value)
            self._deepspeed_origin = f"preset:{value}"
        else:
            if not value.strip():
                raise ConfigError("deepspeed", "must not be empty", "remove it or name a preset or a file")
            context = info.context or {}
            base_dirs = tuple(context.get("base_dirs", ())) or (Path.cwd(),)
            path, content = ds.load_file(value, base_dirs)
            self._deepspeed_json = content
            self._deepspeed_origin = f"file:{path}"
        ds.zero_stage(self._deepspeed_json)
        return self

    @model_validator(mode="after")
    def _axolotl_rules(self) -> TrainingConfig:
        optimizer = self.extra("optimizer")
        if optimizer is not None and not isinstance(optimizer, str):
            # Axolotl's schema takes a name; the rules below compare it with names.
            raise ConfigError(
                "optimizer",
                f"must be an optimizer name, got a {type(optimizer).__name__}",
                "e.g. optimizer: adamw_torch_fused",
            )
        _check_rules(self)
        return self

    # ---- derived views used by the planner -------------------------------------------------
    @property
    def deepspeed_json(self) -> dict[str, Any] | None:
        """The DeepSpeed JSON this config names (file, preset or inline), as loaded."""
        return self._deepspeed_json

    @property
    def deepspeed_origin(self) -> str | None:
        """``inline``, ``preset:<name>`` or ``file:<path>``."""
        return self._deepspeed_origin

    @property
    def fsdp_enabled(self) -> bool:
        """Axolotl's condition ``cfg.fsdp or cfg.fsdp_config`` (an empty mapping is falsy)."""
        return bool(self.fsdp) or bool(self.fsdp_config and self.fsdp_config.model_fields_set)

    @property
    def fsdp_version_source(self) -> str:
        """The key that set the FSDP version, or ``default`` (FSDP1 pinned, as Axolotl pins it)."""
        return self._fsdp_version_source

    @property
    def effective_fsdp_version(self) -> int:
        """The FSDP version in force: explicit, pinned to 1 for a non-empty config, 1 for the list."""
        return self.fsdp_version or 1

    def extra(self, key: str) -> Any:
        """A key outside the sections we own (``optimizer``, ``load_in_4bit`` …), or None."""
        assert key in READ_EXTRAS, f"{key} is read by the planner: list it in READ_EXTRAS"
        return (self.model_extra or {}).get(key)

    @property
    def launch(self) -> LaunchSettings | None:
        """How ``accelerate launch`` would hand this config to Accelerate; ``None`` for Axolotl's format."""
        return self._launch

    @property
    def near_misses(self) -> tuple[tuple[str, str], ...]:
        """Top-level keys optimenv does not read that look like one it does: ``(key, the one it reads)``."""
        out = []
        for key in self.model_extra or {}:
            if not isinstance(key, str) or key in READ_EXTRAS or key in AXOLOTL_NEIGHBOURS:
                continue
            close = difflib.get_close_matches(key, READ_KEYS, n=1, cutoff=NEAR_MISS_CUTOFF)
            if close:
                out.append((key, close[0]))
        return tuple(out)


#: Keys outside the fields above that the planner's rules read (through :meth:`TrainingConfig.extra`).
READ_EXTRAS = frozenset(
    {
        "adapter",
        "float16",
        "fp32_norms",
        "gradient_checkpointing_kwargs",
        "load_in_4bit",
        "load_in_8bit",
        "lora_embedding_kernel",
        "lora_mlp_kernel",
        "lora_o_kernel",
        "lora_qkv_kernel",
        "optimizer",
        "relora",
        "relora_steps",
        "rl",
        "sample_packing",
    }
)
#: Keys of Axolotl's own schema (``src/axolotl/utils/schemas``, 067b021c) that look like one we read:
#: real keys, never near misses (``eval_batch_size`` is not a misspelt ``batch_size``).
AXOLOTL_NEIGHBOURS = frozenset(
    {
        "a_bf16",
        "bfloat16",
        "data_parallel_size",
        "eval_batch_size",
        "eval_sample_packing",
        "expert_parallel_backend",
        "gradient_checkpointing",
        "merge_lora",
        "reward_num_workers",
        "sample_packing_bin_size",
        "sample_packing_eff_est",
        "timeout",
        "torch_compile_mode",
        "trackio_run_name",
        "trl",
        "use_mora",
        "w_fp8",
    }
)
READ_KEYS = sorted(set(TrainingConfig.model_fields) | READ_EXTRAS)
#: difflib similarity from which an unread key counts as a near miss (``deepspeed_confg`` is 0.75).
NEAR_MISS_CUTOFF = 0.75


@dataclass(frozen=True)
class LaunchSettings:
    """What an ``accelerate config`` file says beyond the fields an Axolotl config shares with it.

    Built by :mod:`optimenv.accelerate_config`; the planner reads it where ``accelerate launch``
    hands a setting to Accelerate differently from Axolotl.
    """

    machines: int
    processes: int | None
    #: config field -> the key the file wrote, for messages (``bf16`` -> ``mixed_precision``).
    fields: Mapping[str, str]
    size_names: Mapping[str, str]
    parallelism_config: bool = False
    cp_comm_strategy: str | None = None
    dynamo_mode: str | None = None
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    dynamo_regional: bool = False
    gradient_accumulation_written: bool = False
    zero3_init: bool | None = None
    moe_layer_cls_names: str | None = None
    debug: bool = False
    cpu_affinity: bool = False
    warnings: tuple[str, ...] = ()

    def field(self, name: str) -> str:
        """The key the file wrote for the config field ``name`` (a dotted path)."""
        for ours, theirs in sorted(self.fields.items(), key=lambda kv: -len(kv[0])):
            if name == ours or name.startswith(ours + "."):
                return theirs + name[len(ours) :]
        return name


#: The torch._inductor.config flags Axolotl lets ``torch_compile_options`` set
#: (``INDUCTOR_COMPILE_OPTIONS_ALLOWLIST``, ``schemas/enums.py:162-175``).
INDUCTOR_OPTIONS = frozenset(
    {
        "coordinate_descent_tuning",
        "coordinate_descent_check_all_directions",
        "shape_padding",
        "epilogue_fusion",
        "max_autotune_gemm",
        "fx_graph_cache",
        "assume_aligned_inputs",
        "comprehensive_padding",
        "decompose_mem_bound_mm",
        "triton.cudagraphs",
    }
)

DYNAMO_BACKENDS = (
    "NO",
    "EAGER",
    "AOT_EAGER",
    "INDUCTOR",
    "AOT_TS_NVFUSER",
    "NVPRIMS_NVFUSER",
    "CUDAGRAPHS",
    "OFI",
    "FX2TRT",
    "ONNXRT",
    "TENSORRT",
    "AOT_TORCHXLA_TRACE_ONCE",
    "TORCHXLA_TRACE_ONCE",
    "TVM",
    "HPU_BACKEND",
    "NEURON",
)


def _check_rules(cfg: TrainingConfig) -> None:
    """Axolotl's validators for the fields we own, plus the contradictions that train wrongly."""
    fc, fsdp_on, version = cfg.fsdp_config, cfg.fsdp_enabled, cfg.effective_fsdp_version
    if cfg.deepspeed is not None and cfg.fsdp:
        raise ConfigError("deepspeed", "deepspeed and fsdp cannot be used together", "remove one of them")
    if cfg.deepspeed is not None and fsdp_on:
        raise ConfigError(
            "deepspeed",
            "deepspeed and fsdp_config cannot be used together (Axolotl silently drops DeepSpeed here)",
            "remove fsdp_config or deepspeed",
        )
    _check_batch_sizes(cfg)
    _check_fsdp_rules(cfg)
    _check_method_rules(cfg)
    if fc is not None and fsdp_on:
        _check_sharding(fc, version)
    _check_compile_and_offload(cfg, version)


def _check_fsdp_rules(cfg: TrainingConfig) -> None:
    """Axolotl's refusals of FSDP settings with optimizers, quantisation and fp8."""
    fc, fsdp_on, version = cfg.fsdp_config, cfg.fsdp_enabled, cfg.effective_fsdp_version
    optimizer = cfg.extra("optimizer")
    if fc is not None and fc.cpu_offload_pin_memory is False and not (version == 2 and fc.offload_params):
        raise ConfigError(
            "fsdp_config.cpu_offload_pin_memory",
            "false needs fsdp_version 2 and offload_params: true",
        )
    if fsdp_on and version == 2 and optimizer in BNB_8BIT_OPTIMIZERS:
        raise ConfigError(
            "optimizer", f"FSDP2 not compatible with {optimizer}", "use adamw_torch_8bit instead"
        )
    if (
        fsdp_on
        and version == 1
        and fc is not None
        and fc.offload_params
        and isinstance(optimizer, str)
        and "8bit" in optimizer
    ):
        raise ConfigError(
            "optimizer",
            f"FSDP1 with offload_params is not compatible with {optimizer}",
            "use a non-8-bit optimizer or fsdp_version 2",
        )
    if (
        fsdp_on
        and version == 2
        and fc is not None
        and fc.cpu_ram_efficient_loading
        and cfg.extra("load_in_4bit") is True
    ):
        raise ConfigError(
            "fsdp_config.cpu_ram_efficient_loading",
            "FSDP2 does not support cpu_ram_efficient_loading with load_in_4bit",
            "set fsdp_config.cpu_ram_efficient_loading to false",
        )
    if cfg.fp8_enable_fsdp_float8_all_gather and not (fsdp_on and version == 2):
        raise ConfigError("fp8_enable_fsdp_float8_all_gather", "needs FSDP2 (fsdp_version: 2)")


def _check_method_rules(cfg: TrainingConfig) -> None:
    """Axolotl's refusals of training methods (ReLoRA, muon, RL, TP, CP) with the distributed setup."""
    fc, fsdp_on, version = cfg.fsdp_config, cfg.fsdp_enabled, cfg.effective_fsdp_version
    optimizer = cfg.extra("optimizer")
    if cfg.deepcompile and cfg.deepspeed is None:
        raise ConfigError("deepcompile", "needs deepspeed")
    relora = next((k for k in ("relora", "relora_steps") if cfg.extra(k)), None)
    if relora and (fsdp_on or cfg.deepspeed is not None):
        raise ConfigError(relora, "ReLoRA supports neither FSDP nor DeepSpeed", "train without them")
    if optimizer == "muon" and cfg.deepspeed is not None:
        raise ConfigError("optimizer", "muon is not compatible with DeepSpeed")
    if optimizer == "muon" and fsdp_on and version != 2:
        raise ConfigError("optimizer", "muon needs FSDP2 (fsdp_version: 2)")
    if (
        fsdp_on
        and version == 2
        and cfg.extra("rl") in ("dpo", "kto", "orpo", "ipo")
        and (cfg.extra("load_in_8bit") or cfg.extra("load_in_4bit"))
    ):
        raise ConfigError(
            "fsdp_version",
            f"FSDP2 does not support load_in_8bit or load_in_4bit with rl {cfg.extra('rl')}",
            "use DeepSpeed or fsdp_version: 1",
        )
    if cfg.extra("fp32_norms") and not (fc is not None and fsdp_on and version == 2):
        raise ConfigError("fp32_norms", "needs fsdp_config with fsdp_version: 2")
    if (cfg.tensor_parallel_size or 1) > 1 and optimizer in BNB_8BIT_OPTIMIZERS | {"paged_adamw_8bit"}:
        raise ConfigError("optimizer", f"tensor parallelism is not compatible with {optimizer}")
    if (
        (cfg.context_parallel_size or 1) > 1
        and cfg.extra("sample_packing")
        and (cfg.micro_batch_size or 1) != 1
    ):
        raise ConfigError(
            "micro_batch_size",
            "must be 1 with context_parallel_size > 1 and sample_packing",
        )


def _check_batch_sizes(cfg: TrainingConfig) -> None:
    """Axolotl 0.19.0's ``check_batch_size_fields`` and ``check_gas_bsz`` (validation.py:218-279)."""
    written = cfg.model_fields_set
    if not cfg.batch_size:
        if cfg.gradient_accumulation_steps is None:
            raise ConfigError(
                "gradient_accumulation_steps", "is null and batch_size is not set", "set one of them"
            )
        return
    if cfg.gradient_accumulation_steps and "gradient_accumulation_steps" in written:
        raise ConfigError(
            "batch_size",
            "please set only one of gradient_accumulation_steps or batch_size",
            "batch_size is derived as micro_batch_size x gradient_accumulation_steps",
        )
    if not (cfg.micro_batch_size and "micro_batch_size" in written):
        raise ConfigError(
            "micro_batch_size",
            "is required with batch_size: Axolotl needs two of micro_batch_size, "
            "gradient_accumulation_steps and batch_size, and derives the third",
            "set micro_batch_size (per GPU); gradient_accumulation_steps is batch_size / micro_batch_size",
        )
    if cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(
            "batch_size", f"{cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size}"
        )


def _check_compile_and_offload(cfg: TrainingConfig, version: int) -> None:
    """torch_compile_options (Axolotl) and FSDP activation-checkpointing offload (Accelerate)."""
    if cfg.torch_compile_options is not None and not cfg.torch_compile:
        # check_torch_compile_options_requires_compile, schemas/config.py:1631-1640.
        raise ConfigError(
            "torch_compile_options",
            "is set but torch_compile is not enabled",
            "set torch_compile: true (or auto), or remove torch_compile_options",
        )
    fc = cfg.fsdp_config
    if fc is not None and cfg.fsdp_enabled and fc.activation_checkpointing_offload:
        # FullyShardedDataParallelPlugin.__post_init__ refuses both otherwise (dataclasses.py:1963-1970).
        if not fc.activation_checkpointing:
            raise ConfigError(
                "fsdp_config.activation_checkpointing_offload", "needs activation_checkpointing: true"
            )
        if version != 2:
            raise ConfigError("fsdp_config.activation_checkpointing_offload", "needs fsdp_version: 2")


def _check_sharding(fc: FSDPConfig, version: int) -> None:
    strategy = fc.sharding_strategy
    if strategy is None:
        return
    reshard = fc.reshard_after_forward
    implied = strategy in ("FULL_SHARD", "HYBRID_SHARD")
    if version == 2:
        if strategy in ("HYBRID_SHARD", "HYBRID_SHARD_ZERO2"):
            raise ConfigError(
                "fsdp_config.sharding_strategy",
                f"{strategy} has no FSDP2 equivalent",
                "use dp_replicate_size > 1 with dp_shard_size > 1 for HSDP",
            )
        if strategy == "NO_SHARD":
            raise ConfigError(
                "fsdp_config.sharding_strategy",
                "NO_SHARD has no FSDP2 equivalent (FSDP2 always shards)",
                "use DDP (no fsdp_config) or remove sharding_strategy",
            )
    if reshard is not None and strategy != "NO_SHARD" and reshard != implied:
        raise ConfigError(
            "fsdp_config.reshard_after_forward",
            f"{str(reshard).lower()} contradicts sharding_strategy {strategy}",
            "drop one of the two",
        )


ConfigFormat = Literal["axolotl", "accelerate"]
FORMATS: tuple[ConfigFormat, ...] = ("axolotl", "accelerate")
# The format that parse_config uses when its caller names none (see reading_as).
_FORMAT: contextvars.ContextVar[ConfigFormat | None] = contextvars.ContextVar("config_format", default=None)


@contextlib.contextmanager
def reading_as(fmt: ConfigFormat | None) -> Iterator[None]:
    """Within the block, configs are read as ``fmt`` (``None``: recognised by their keys).

    For readers that reach :func:`parse_config` through :func:`load_config`, such as ``--format``.
    """
    token = _FORMAT.set(fmt)
    try:
        yield
    finally:
        _FORMAT.reset(token)


def parse_config(
    data: Any,
    *,
    base_dirs: tuple[Path, ...] = (),
    fmt: ConfigFormat | None = None,
) -> TrainingConfig:
    """Validate an already-parsed config mapping; relative DeepSpeed paths resolve in ``base_dirs``.

    The mapping is held to the bounds of :mod:`optimenv.limits` first (values, text, depth,
    64-bit integers), as a YAML file is. ``fmt``: ``axolotl`` or ``accelerate`` (an ``accelerate
    config`` file); ``None`` recognises it by its keys (see :func:`config_format`).
    """
    if not isinstance(data, dict):
        raise ConfigError("config", f"top level must be a mapping, got {type(data).__name__}")
    limits.check_data(data)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(
                "config",
                f"the key {shown(key)} is not a string",
                "YAML reads unquoted true, null, numbers and dates as other types: quote the key",
            )
    fmt = fmt or _FORMAT.get() or config_format(data)
    if fmt == "accelerate":
        from optimenv.accelerate_config import parse_accelerate_config

        return parse_accelerate_config(data, base_dirs=base_dirs)
    try:
        return TrainingConfig.model_validate(data, context={"base_dirs": base_dirs})
    except ValidationError as exc:
        raise config_error(exc, root="config", unknown_hint=fsdp_key_hint) from None


def config_format(data: Mapping[str, Any]) -> ConfigFormat:
    """``accelerate`` for a mapping of ``accelerate config`` keys, ``axolotl`` for the rest.

    Refuses a mapping that mixes keys only ``accelerate config`` writes with keys it never writes.
    """
    from optimenv.accelerate_config import ACCELERATE_KEYS, ACCELERATE_ONLY_KEYS

    keys = {k for k in data if isinstance(k, str)}
    ours = sorted(keys & ACCELERATE_ONLY_KEYS)
    if not ours:
        return "axolotl"
    # A misspelt accelerate key (mixed_precison) is the accelerate format's unknown key, not Axolotl's.
    others = sorted(
        str(k)
        for k in data
        if k not in ACCELERATE_KEYS
        and not difflib.get_close_matches(str(k), ACCELERATE_KEYS, n=1, cutoff=0.8)
    )
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise ConfigError(
            "config",
            f"mixes keys of an accelerate config file ({', '.join(ours[:3])}) with keys it does not have "
            f"({shown})",
            "pass --format accelerate or --format axolotl to say which it is, or remove the other keys",
        )
    return "accelerate"


def load_config(
    source: str | Path,
    *,
    text: str | None = None,
    base_dirs: tuple[Path, ...] | None = None,
) -> TrainingConfig:
    """Read and validate a YAML config from ``source`` (a path), or from ``text`` when given.

    Only a regular file of at most ``MAX_CONFIG_BYTES`` is read. Relative DeepSpeed paths resolve
    against the config's folder, then the working directory.
    """
    if text is None:
        path = Path(source)
        try:
            raw = limits.read_file(str(path), MAX_CONFIG_BYTES)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            hint = "give a regular file, or - to read standard input" if _is_special(exc) else None
            raise ConfigError("config", f"cannot read {shown(str(path))}: {_reason(exc)}", hint) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("config", f"{shown(str(path))} is not UTF-8 text") from None
        dirs: tuple[Path, ...] = (path.resolve().parent, Path.cwd())
    else:
        dirs = (Path.cwd(),)
    data = parse_yaml(text)
    return parse_config(data, base_dirs=base_dirs if base_dirs is not None else dirs)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _reason(exc: OSError | ValueError) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _is_special(exc: OSError | ValueError) -> bool:
    return isinstance(exc, OSError) and "not a regular file" in (exc.strerror or "")


def parse_yaml(text: str) -> Any:
    """One YAML document, loaded within the bounds of :mod:`optimenv.limits`, with one-line errors.

    The bounds on values, text and depth are counted while the document is composed, aliases
    included, so a few kilobytes that expand to gigabytes are refused before anything is built.
    """
    if not isinstance(text, str):
        raise ConfigError("config", f"must be YAML text, got {type(text).__name__}")
    if limits.text_bytes(text) > MAX_CONFIG_BYTES:
        raise ConfigError("config", f"is larger than the limit of {MAX_CONFIG_BYTES:,} bytes")
    loader = _BoundedLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError("config", f"not valid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError("config", "is empty")
    limits.check_data(data)
    return data


class _BoundedLoader(_Parser, Composer, SafeConstructor, Resolver):
    """PyYAML's safe loader that counts every node as it composes it (see :func:`parse_yaml`).

    An alias adds what its anchor holds, so the totals are those of the expanded document; a
    ``ConfigError`` names the field where a bound is crossed. Long integers are refused before
    ``int()`` sees them (its cost grows with the square of the digits, and 4300 is its limit).
    """

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._values = 0
        self._text = 0
        self._path: list[Any] = []
        self._sizes: dict[Node, tuple[int, int]] = {}  # anchored node -> (values, text) it expands to

    # libyaml's parser composes too; Composer's methods must run so that compose_node is ours.
    get_single_node = Composer.get_single_node
    check_node = Composer.check_node
    get_node = Composer.get_node

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            return self._compose_alias(event, parent, index)
        if len(self._path) >= MAX_DEPTH:
            raise limits.too_deep(self._field(index))
        self._path.append(index)
        before = (self._values, self._text)
        node = super().compose_node(parent, index)
        self._path.pop()
        if node is not None and getattr(event, "anchor", None) is not None:
            self._sizes[node] = (self._values - before[0], self._text - before[1])
        return node

    def _compose_alias(self, event: AliasEvent, parent: Node | None, index: Any) -> Node | None:
        """The anchored node, charged with everything it holds (PyYAML refuses an unknown alias)."""
        node = super().compose_node(parent, index)
        size = self._sizes.get(node) if node is not None else None
        anchor = limits.key_text(event.anchor)
        if size is None:
            raise ConfigError(
                self._field(index),
                f"the alias *{anchor} refers to a node that holds it",
                "a recursive structure cannot be a config: write the values out",
            )
        line = event.start_mark.line + 1 if event.start_mark else "?"
        values, text = size
        self._charge(
            values,
            text,
            f"the alias *{anchor} at line {line} repeats {_count(values, 'value')} and "
            f"{_count(text, 'byte')} of text",
        )
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError):
            # PyYAML's constructors trust the tag: "!!int x" ends in int("x"), "!!bool x" in a KeyError.
            mark = node.start_mark
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            tag = "!!" + str(node.tag).rsplit(":", 1)[-1]
            value = node.value if isinstance(node, ScalarNode) else type(node).__name__
            raise ConfigError(
                "config", f"not valid YAML{where}: {shown(value)} is not a valid {tag}"
            ) from None

    def compose_scalar_node(self, anchor: Any) -> ScalarNode:
        node: ScalarNode = super().compose_scalar_node(anchor)
        value = node.value
        self._charge(1, limits.text_bytes(value))
        if node.tag == "tag:yaml.org,2002:int" and len(value) - value.count("_") > MAX_INT_CHARS:
            raise limits.int_refusal(self._field(None), limits.OversizedInt(len(value)))
        return node

    def compose_sequence_node(self, anchor: Any) -> SequenceNode:
        self._charge(1, 0)
        node: SequenceNode = super().compose_sequence_node(anchor)
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        self._charge(1, 0)
        node: MappingNode = super().compose_mapping_node(anchor)
        return node

    def _charge(self, values: int, text: int, alias: str | None = None) -> None:
        self._values += values
        self._text += text
        if self._values > MAX_VALUES:
            raise limits.too_many_values("config", alias)
        if self._text > limits.MAX_TEXT_BYTES:
            raise limits.too_much_text("config", alias)

    def _field(self, index: Any) -> str:
        """The dotted path of the node being composed (its parent's keys and indexes, then ``index``)."""
        parts = [p for p in (*self._path, index) if p is not None]
        out = ""
        for part in parts:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                key = limits.key_text(part.value) if isinstance(part, ScalarNode) else "<key>"
                out += f".{key}" if out else key
        return out or "config"
