"""DeepSpeed configs: the shipped presets, loading a file or a mapping, and ZeRO-stage detection.

Presets follow DeepSpeed's configuration documentation: batch sizes, gradient accumulation and
clipping are ``"auto"`` (Accelerate or the HF Trainer fill them from the training arguments),
mixed precision is ``"auto"`` (filled from ``ACCELERATE_MIXED_PRECISION``), and the stage is a
number, because Accelerate ignores ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` when the file has one.
"""

from __future__ import annotations

import copy
import difflib
import errno
import math
from pathlib import Path
from typing import Any

from optimenv import limits
from optimenv.errors import ConfigError, shown

_AUTO_BATCH: dict[str, Any] = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "wall_clock_breakdown": False,
}

_ZERO3_COMMON: dict[str, Any] = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": True,
}

_CPU_PINNED = {"device": "cpu", "pin_memory": True}


def _preset(zero: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**copy.deepcopy(_AUTO_BATCH), "zero_optimization": zero, **top}


PRESETS: dict[str, dict[str, Any]] = {
    "zero1": _preset({"stage": 1, "overlap_comm": True}),
    "zero2": _preset(
        {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "allgather_bucket_size": 200_000_000,
        }
    ),
    "zero3": _preset(dict(_ZERO3_COMMON)),
    # With offload, DeepSpeed insists on its own CPU optimizer unless told otherwise
    # (zero_force_ds_cpu_optimizer, default true): the optimizer users pass through
    # accelerator.prepare or the HF Trainer (torch AdamW) would be refused at deepspeed.initialize.
    "zero3_offload_params": _preset(
        {**_ZERO3_COMMON, "offload_param": dict(_CPU_PINNED)},
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    ),
    "zero3_offload_all": _preset(
        {**_ZERO3_COMMON, "offload_param": dict(_CPU_PINNED), "offload_optimizer": dict(_CPU_PINNED)},
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    ),
}


def preset(name: str) -> dict[str, Any]:
    """A fresh copy of a shipped preset."""
    return copy.deepcopy(PRESETS[name])


def check_json(value: Any, field: str = "deepspeed") -> None:
    """Refuse what a YAML mapping can hold but JSON cannot (dates, binary, non-string keys)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(field, f"keys must be strings, got {shown(key)}", "quote the key")
            check_json(item, f"{field}.{limits.key_text(key)}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json(item, f"{field}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field, f"{shown(value)} is not a JSON number", "use a finite number")
    elif not (value is None or isinstance(value, str | int | float)):
        raise ConfigError(field, f"{type(value).__name__} {shown(value)} is not a JSON value", "quote it")


def json_copy(value: Any) -> Any:
    """A deep copy of JSON data; several times cheaper than ``copy.deepcopy`` for this shape."""
    if type(value) is dict:
        return {key: json_copy(item) for key, item in value.items()}
    if type(value) is list:
        return [json_copy(item) for item in value]
    return value


def load_file(
    value: str, base_dirs: tuple[Path, ...], field: str = "deepspeed"
) -> tuple[Path, dict[str, Any]]:
    """Find ``value`` (absolute, or relative to each of ``base_dirs`` in turn) and parse it.

    Only a regular file of at most ``MAX_JSON_FILE_BYTES`` holding a DeepSpeed config (a JSON object
    with ``zero_optimization``, which Accelerate requires) is accepted: its content is copied into
    the worker spec and the DeepSpeed ConfigMap as it is.
    """
    candidate = Path(value)
    tried = [candidate] if candidate.is_absolute() else [d / candidate for d in base_dirs]
    for path in tried:
        try:
            raw = limits.read_file(str(path), limits.MAX_JSON_FILE_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
                continue  # a name longer than the filesystem allows names no file
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            raise ConfigError(field, f"cannot read the DeepSpeed file {shown(str(path))}: {reason}") from None
        return path, _parse_file(path, raw, field)
    names = ", ".join(sorted(PRESETS))
    if _looks_like_preset(value):
        close = difflib.get_close_matches(value, sorted(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            field,
            f"unknown preset {value!r}; presets are {names}",
            f"{hint}a file is named with its .json path, e.g. ./{value}.json",
        )
    where = ", ".join(dict.fromkeys(shown(str(p.parent), 200) for p in tried[:3])) or "."
    raise ConfigError(
        field,
        f"DeepSpeed file {shown(value)} not found (looked in {where})",
        f"give an existing path, a preset name ({names}) or an inline mapping",
    )


def _parse_file(path: Path, raw: bytes, field: str) -> dict[str, Any]:
    name = shown(str(path))
    try:
        data = limits.load_json(raw.decode("utf-8"), field)
    except UnicodeDecodeError:
        raise ConfigError(field, f"DeepSpeed file {name} is not UTF-8 text") from None
    except ValueError as exc:
        raise ConfigError(field, f"DeepSpeed file {name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(field, f"DeepSpeed file {name} must hold a JSON object")
    check_json(data, field)
    if not isinstance(data.get("zero_optimization"), dict):
        raise ConfigError(
            field,
            f"DeepSpeed file {name} has no zero_optimization mapping, so it is not a DeepSpeed config "
            "(Accelerate refuses one without it)",
            'name a DeepSpeed JSON, e.g. {"zero_optimization": {"stage": 2}}, or a preset',
        )
    return data


def _looks_like_preset(value: str) -> bool:
    """A bare name (no folder, no ``.json``), as presets are written: ``zero9`` is a preset typo."""
    return "/" not in value and "\\" not in value and "." not in value and bool(value.strip())


def zero_stage(ds: dict[str, Any], field: str = "deepspeed") -> int | None:
    """The ZeRO stage as an int, or None when the JSON does not say.

    A string such as ``"3"`` is accepted and normalised (Axolotl exports it but does not turn on
    ZeRO-3 init for it, defect D4); anything else that is not 0-3 is refused, because Accelerate
    would fail on it later (``int("auto")``).
    """
    zero = ds.get("zero_optimization")
    if zero is None:
        return None
    if not isinstance(zero, dict):
        raise ConfigError(f"{field}.zero_optimization", "must be a mapping")
    stage = zero.get("stage")
    if stage is None:
        return None
    if isinstance(stage, bool):
        raise ConfigError(f"{field}.zero_optimization.stage", f"must be 0, 1, 2 or 3, got {shown(stage)}")
    if isinstance(stage, str) and len(stage) <= 20 and stage.strip().isascii() and stage.strip().isdecimal():
        stage = int(stage.strip())
    if not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{field}.zero_optimization.stage", f"must be 0, 1, 2 or 3, got {shown(stage)}")
    return stage


def precision_flag(ds: dict[str, Any], key: str) -> bool | str | None:
    """``ds[key]["enabled"]`` (``bf16`` / ``fp16``), or None when absent."""
    section = ds.get(key)
    if isinstance(section, dict):
        value = section.get("enabled")
        if isinstance(value, bool | str):
            return value
    return None
