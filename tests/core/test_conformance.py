"""Conformance table: every row of Axolotl's ``prepare_optim_env`` reference, and every defect.

Rows follow ``../shared/reference/axolotl-env.md`` (cited as ``ref §N``; Axolotl source lines as
``trainer.py:N`` = ``src/axolotl/utils/trainer.py`` at 067b021c, ``validation.py:N`` =
``src/axolotl/utils/schemas/validation.py``). Where we differ from Axolotl on purpose, the case
names the rule in ``docs/compatibility.md`` (``C<n>``) and the defect (``D<n>``, ref §7).

Each case asserts the exact planned environment in write order (name, value, source), the exact
kinds of the deferred steps, the warnings (by prefix, all of them), or the exact error field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from optimenv import deepspeed as ds
from optimenv.config import parse_config
from optimenv.errors import ConfigError
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware, Plan, plan
from optimenv.steps import (
    Bf16Auto,
    DeepSpeedZero3Config,
    NcclP2PCheck,
    SingleGpuRendezvousDefaults,
    TorchCompileAuto,
    to_spec,
)

# One node of 8 bf16 GPUs with a known torch: the common case. fp8 support is left unknown.
HW = Hardware(nodes=1, gpus_per_node=8, bf16_supported=True, torch_version="2.13.0")
HW_NO_BF16 = Hardware(nodes=1, gpus_per_node=8, bf16_supported=False, torch_version="2.13.0")
HW_UNKNOWN = Hardware()
HW_ONE_GPU = Hardware(nodes=1, gpus_per_node=1, bf16_supported=True, torch_version="2.13.0")
# Parallel sizes must multiply to exactly the process count (C28).
HW_2 = Hardware(nodes=1, gpus_per_node=2, bf16_supported=True, torch_version="2.13.0")
HW_4 = Hardware(nodes=1, gpus_per_node=4, bf16_supported=True, torch_version="2.13.0")
HW_FP8 = Hardware(nodes=1, gpus_per_node=8, bf16_supported=True, fp8_supported=True, torch_version="2.13.0")
HW_NO_FP8 = Hardware(nodes=1, gpus_per_node=8, bf16_supported=True, fp8_supported=False)

P2P = "nccl_p2p_check"
MP_BF16 = ("ACCELERATE_MIXED_PRECISION", "bf16", "bf16")
DS_FILE = ("ACCELERATE_DEEPSPEED_CONFIG_FILE", DEFAULT_DEEPSPEED_PATH, "deepspeed")
DS_ON = ("ACCELERATE_USE_DEEPSPEED", "true", "deepspeed")
GAS_1 = ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1", "default")
ZERO3 = (
    ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3", "deepspeed.zero_optimization.stage"),
    ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", "deepspeed.zero_optimization.stage"),
)
FSDP_ON = ("ACCELERATE_USE_FSDP", "true", "fsdp_config")
V2 = ("FSDP_VERSION", "2", "fsdp_version")
V1_PINNED = ("FSDP_VERSION", "1", "default")
FSDP1_DEPRECATED = "fsdp_version: FSDP1 is deprecated"

Env = tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Case:
    id: str
    ref: str
    config: dict[str, Any]
    env: Env = ()
    hw: Hardware = HW
    deferred: tuple[str, ...] = (P2P,)
    warnings: tuple[str, ...] = ()
    error: str | None = None
    deepspeed: dict[str, Any] | None = field(default=None)


def fsdp2(**keys: Any) -> dict[str, Any]:
    return {"fsdp_version": 2, "fsdp_config": keys}


def fsdp1(**keys: Any) -> dict[str, Any]:
    return {"fsdp_version": 1, "fsdp_config": keys}


V1 = ("FSDP_VERSION", "1", "fsdp_version")


def fsdp2_env(*rows: tuple[str, str, str]) -> Env:
    return (FSDP_ON, V2, *rows, MP_BF16)


def fsdp1_env(*rows: tuple[str, str, str]) -> Env:
    return (FSDP_ON, V1, *rows, MP_BF16)


def src(key: str) -> str:
    return f"fsdp_config.{key}"


CASES: list[Case] = []


def add(*cases: Case) -> None:
    CASES.extend(cases)


# ---- §2 row 0: AXOLOTL_NCCL_TIMEOUT (0.19.0 trainer.py:665-666) ------------------------------
add(
    Case(
        "r0-ddp_timeout-set",
        "ref §2 row 0; 0.19.0 trainer.py:665-666",
        {"ddp_timeout": 7200},
        (("AXOLOTL_NCCL_TIMEOUT", "7200", "ddp_timeout"), MP_BF16),
    ),
    Case("r0-ddp_timeout-unset", "ref §2 row 0", {}, (MP_BF16,)),
    # C19: Axolotl's int field takes 0 (then exports nothing); a zero timeout is refused here.
    Case("r0-ddp_timeout-zero-C19", "ref §3.1 ddp_timeout", {"ddp_timeout": 0}, error="ddp_timeout"),
)

# ---- §2 row 1: NCCL_P2P_DISABLE is always left to the worker (trainer.py:659-662, D17) -------
add(Case("r1-nccl_p2p-deferred-D17", "ref §2 row 1, §2.1; environment.py:19-46", {}, (MP_BF16,)))

# ---- §2 rows 2/3: FSDP block or DeepSpeed block (trainer.py:664-679) -------------------------
add(
    # D5 / C10: Axolotl runs FSDP and silently drops DeepSpeed here; we refuse.
    Case(
        "r2-fsdp_config-and-deepspeed-D5-C10",
        "ref §7 D5; validation.py:1224-1229; trainer.py:664-679",
        {"fsdp_version": 2, "fsdp_config": {"offload_params": True}, "deepspeed": "zero2"},
        error="deepspeed",
    ),
    Case(
        "r2-fsdp-list-and-deepspeed",
        "ref §3.3 check_fsdp_deepspeed; validation.py:1224-1229",
        {"fsdp": ["full_shard"], "fsdp_config": {"offload_params": True}, "deepspeed": "zero2"},
        error="deepspeed",
    ),
    Case("r2-no-fsdp-no-deepspeed", "ref §2 rows 2-3", {"fsdp": None, "deepspeed": None}, (MP_BF16,)),
)

# ---- §2 row 5: ACCELERATE_DYNAMO_BACKEND (trainer.py:527-532; config.py:2040-2063) ----------
DYN_INDUCTOR = ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "torch_compile")
add(
    Case("r5-torch_compile-true", "ref §2 row 5", {"torch_compile": True}, (DYN_INDUCTOR, MP_BF16)),
    Case("r5-torch_compile-false", "ref §2 row 5", {"torch_compile": False}, (MP_BF16,)),
    Case(
        "r5-backend-upper-cased",
        "ref §2 row 5: aot_eager -> AOT_EAGER",
        {"torch_compile": True, "torch_compile_backend": "aot_eager"},
        (("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER", "torch_compile_backend"), MP_BF16),
    ),
    Case(
        "r5-backend-without-torch_compile",
        "ref §2 row 5: condition is torch_compile truthy",
        {"torch_compile_backend": "eager"},
        (MP_BF16,),
    ),
    Case(
        "r5-auto-torch-2.13-D16",
        "ref §3.3 check_torch_compile_auto; D16",
        {"torch_compile": "auto"},
        (DYN_INDUCTOR, MP_BF16),
    ),
    Case(
        "r5-auto-torch-2.5.1-boundary",
        "ref §3.3 check_torch_compile_auto: True iff torch >= 2.5.1",
        {"torch_compile": "auto"},
        (DYN_INDUCTOR, MP_BF16),
        hw=Hardware(bf16_supported=True, torch_version="2.5.1+cu124"),
    ),
    Case(
        "r5-auto-torch-2.5.0-off",
        "ref §3.3 check_torch_compile_auto",
        {"torch_compile": "auto", "torch_compile_backend": "eager"},
        (MP_BF16,),
        hw=Hardware(bf16_supported=True, torch_version="2.5.0"),
    ),
    # D16 / C17: without a known torch, Axolotl's driver exports INDUCTOR; we leave it to the worker.
    Case(
        "r5-auto-torch-unknown-deferred-D16-C17",
        "ref §7 D16; config.py:2040-2063",
        {"torch_compile": "auto", "bf16": True},
        (MP_BF16,),
        hw=HW_UNKNOWN,
        deferred=(P2P, "torch_compile_auto"),
    ),
    Case(
        "r5-unknown-backend-C19",
        "ref accelerate-env §1.4 DynamoBackend",
        {"torch_compile": True, "torch_compile_backend": "inductr"},
        error="torch_compile_backend",
    ),
)

# ---- §2 row 6: ACCELERATE_MIXED_PRECISION (trainer.py:684-691) -------------------------------
MP = "ACCELERATE_MIXED_PRECISION"
add(
    Case(
        "r6-fp8-supported",
        "ref §2 row 6: fp8 first",
        {"fp8": True, "torch_compile": True},
        (DYN_INDUCTOR, (MP, "fp8", "fp8")),
        hw=HW_FP8,
    ),
    Case(
        "r6-fp8-without-torch_compile-warns",
        "ref §3.3 check_fp8_config (validation.py:424-452)",
        {"fp8": True},
        ((MP, "fp8", "fp8"),),
        hw=HW_FP8,
        warnings=("fp8: without torch_compile",),
    ),
    Case(
        "r6-fp8-over-bf16-warns",
        "ref §2 row 6: fp8 wins over bf16",
        {"fp8": True, "bf16": True, "torch_compile": True},
        (DYN_INDUCTOR, (MP, "fp8", "fp8")),
        hw=HW_FP8,
        warnings=("fp8: takes precedence",),
    ),
    Case(
        "r6-fp8-unknown-support-deferred",
        "ref §3.3 check_fp8 (config.py:1784-1792): capability decided on the worker",
        {"fp8": True, "torch_compile": True},
        (DYN_INDUCTOR, (MP, "fp8", "fp8")),
        deferred=(P2P, "require_fp8"),
    ),
    Case(
        "r6-fp8-unsupported-error",
        "ref §3.3 check_fp8 (config.py:1784-1792)",
        {"fp8": True},
        hw=HW_NO_FP8,
        error="fp8",
    ),
    Case("r6-bf16-auto-supported", "ref §2 row 6", {"bf16": "auto"}, (MP_BF16,)),
    Case("r6-bf16-default-is-auto", "ref §3.1 bf16 default auto", {}, (MP_BF16,)),
    # C14: Axolotl exports "no" here, then resolve_dtype turns fp16 on and it trains in fp16
    # (utils/config/__init__.py:156-172): the plan says fp16.
    Case(
        "r6-bf16-auto-unsupported-trains-fp16-C14",
        "ref §2 row 6; utils/config/__init__.py:157-167",
        {"bf16": "auto"},
        ((MP, "fp16", "bf16"),),
        hw=HW_NO_BF16,
    ),
    Case(
        "r6-bf16-auto-unsupported-fp16-false-C14",
        "utils/config/__init__.py:166: fp16 is turned on only when it is unset",
        {"bf16": "auto", "fp16": False},
        ((MP, "no", "bf16"),),
        hw=HW_NO_BF16,
    ),
    Case(
        "r6-bf16-auto-unsupported-float16-C14",
        "utils/config/__init__.py:166: ... and float16 (no AMP) is not set",
        {"bf16": "auto", "float16": True},
        ((MP, "no", "bf16"),),
        hw=HW_NO_BF16,
    ),
    Case(
        "r6-bf16-auto-unsupported-fp16",
        "ref §2 row 6: elif fp16",
        {"bf16": "auto", "fp16": True},
        ((MP, "fp16", "fp16"),),
        hw=HW_NO_BF16,
    ),
    Case(
        "r6-bf16-auto-unknown-deferred-C17",
        "ref §4 table: bf16 auto needs the worker GPU",
        {},
        (),
        hw=HW_UNKNOWN,
        deferred=(P2P, "bf16_auto"),
    ),
    Case("r6-bf16-true", "ref §2 row 6: bf16 is True", {"bf16": True}, (MP_BF16,)),
    Case("r6-bf16-true-unknown-hw", "ref §2 row 6", {"bf16": True}, (MP_BF16,), hw=HW_UNKNOWN),
    # D14 / C15: Axolotl only warns (check_bf16, config.py:1760-1776) and exports bf16.
    Case(
        "r6-bf16-true-unsupported-error-D14-C15",
        "ref §7 D14; config.py:1760-1776",
        {"bf16": True},
        hw=HW_NO_BF16,
        error="bf16",
    ),
    Case(
        "r6-bf16-true-and-fp16-warns",
        "ref §2 row 6: bf16 before fp16",
        {"bf16": True, "fp16": True},
        (MP_BF16,),
        warnings=("fp16: ignored because bf16 is true",),
    ),
    # C14: Axolotl exports bf16 on a bf16 GPU, but normalize_config then sets bf16 false and the
    # Trainer runs fp16 (utils/config/__init__.py:169-170).
    Case(
        "r6-bf16-explicit-auto-and-fp16-trains-fp16-C14",
        "ref §2 row 6; utils/config/__init__.py:169-170",
        {"bf16": "auto", "fp16": True},
        ((MP, "fp16", "fp16"),),
    ),
    # C14: with bf16 left unset, fp16: true means fp16 (Axolotl gives bf16 on a bf16 GPU).
    Case("r6-fp16-bf16-unset-C14", "ref §2 row 6; issue 3", {"fp16": True}, ((MP, "fp16", "fp16"),)),
    Case(
        "r6-fp16-bf16-unset-unknown-hw-C14",
        "ref §2 row 6",
        {"fp16": True},
        ((MP, "fp16", "fp16"),),
        hw=HW_UNKNOWN,
    ),
    Case("r6-bf16-false", "ref §2 row 6: else no", {"bf16": False}, ((MP, "no", "bf16"),)),
    Case("r6-bf16-false-fp16", "ref §2 row 6", {"bf16": False, "fp16": True}, ((MP, "fp16", "fp16"),)),
    Case(
        "r6-bf16-null", "ref §2 row 6: None is neither auto nor True", {"bf16": None}, ((MP, "no", "bf16"),)
    ),
    Case(
        "r6-bfloat16-plays-no-part",
        "ref §2 row 6: bfloat16/float16 (non-AMP) play no part",
        {"bf16": False, "bfloat16": True, "float16": True},
        ((MP, "no", "bf16"),),
    ),
    # D15: always written, also when it resolves to "no" (a launcher's value is overwritten).
    Case(
        "r6-always-written-D15-C26",
        "ref §7 D15; trainer.py:684-691",
        {"bf16": False, "fp16": False},
        ((MP, "no", "bf16"),),
    ),
)

# ---- §2.2 FSDP (trainer.py:591-622), row by row -----------------------------------------------
for key, var in (
    ("activation_checkpointing", "FSDP_ACTIVATION_CHECKPOINTING"),
    ("offload_params", "FSDP_OFFLOAD_PARAMS"),
    ("sync_module_states", "FSDP_SYNC_MODULE_STATES"),
    ("cpu_ram_efficient_loading", "FSDP_CPU_RAM_EFFICIENT_LOADING"),
    ("use_orig_params", "FSDP_USE_ORIG_PARAMS"),
):
    add(
        Case(f"s2.2-{key}-true", "ref §2.2", fsdp2(**{key: True}), fsdp2_env((var, "true", src(key)))),
        Case(
            f"s2.2-{key}-false-exports-nothing",
            "ref §2.2: false exports nothing",
            fsdp2(**{key: False}),
            fsdp2_env(),
        ),
    )

add(
    Case(
        "s2.2-version-2",
        "ref §2.2 FSDP_VERSION",
        fsdp2(offload_params=True),
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    # D7 / C1: Axolotl never exports "1"; FSDP1 relies on Accelerate's default.
    Case(
        "s2.2-version-1-exported-D7-C1",
        "ref §7 D7; trainer.py:595-596",
        fsdp1(offload_params=True),
        fsdp1_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "s2.2-state_dict_type",
        "ref §2.2 FSDP_STATE_DICT_TYPE",
        fsdp2(state_dict_type="SHARDED_STATE_DICT"),
        fsdp2_env(("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", src("state_dict_type"))),
    ),
    Case(
        "s2.2-state_dict_type-lower-case-canonical",
        "accelerate-env §0.1 rule 3: canonical spelling",
        fsdp2(state_dict_type="full_state_dict"),
        fsdp2_env(("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT", src("state_dict_type"))),
    ),
    Case(
        "s2.2-state_dict_type-local-fsdp1",
        "ref §2.2",
        fsdp1(state_dict_type="LOCAL_STATE_DICT"),
        fsdp1_env(("FSDP_STATE_DICT_TYPE", "LOCAL_STATE_DICT", src("state_dict_type"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "s2.2-state_dict_type-local-fsdp2-error-C21",
        "accelerate-env §1.5: v2 + LOCAL -> ValueError",
        fsdp2(state_dict_type="LOCAL_STATE_DICT"),
        error="fsdp_config.state_dict_type",
    ),
    Case(
        "s2.2-state_dict_type-unknown",
        "ref §3.2 FSDPConfig literal",
        fsdp2(state_dict_type="HALF_STATE_DICT"),
        error="fsdp_config.state_dict_type",
    ),
    Case(
        "s2.2-cpu_offload_pin_memory-true",
        "ref §2.2: str(v).lower()",
        fsdp2(offload_params=True, cpu_offload_pin_memory=True),
        fsdp2_env(
            ("FSDP_OFFLOAD_PARAMS", "true", src("offload_params")),
            ("FSDP_CPU_OFFLOAD_PIN_MEMORY", "true", src("cpu_offload_pin_memory")),
        ),
    ),
    Case(
        "s2.2-cpu_offload_pin_memory-false-exported",
        "ref §2.2: the only variable that can export false",
        fsdp2(offload_params=True, cpu_offload_pin_memory=False),
        fsdp2_env(
            ("FSDP_OFFLOAD_PARAMS", "true", src("offload_params")),
            ("FSDP_CPU_OFFLOAD_PIN_MEMORY", "false", src("cpu_offload_pin_memory")),
        ),
    ),
    Case(
        "s2.2-auto_wrap_policy-transformer",
        "ref §2.2",
        fsdp2(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_layer_cls_to_wrap="LlamaDecoderLayer"),
        fsdp2_env(
            ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP", src("auto_wrap_policy")),
            ("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer", src("transformer_layer_cls_to_wrap")),
        ),
    ),
    Case(
        "s2.2-auto_wrap_policy-size-with-min_num_params",
        "ref §2.2 FSDP_MIN_NUM_PARAMS: str(int)",
        fsdp2(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=100000000),
        fsdp2_env(
            ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", src("auto_wrap_policy")),
            ("FSDP_MIN_NUM_PARAMS", "100000000", src("min_num_params")),
        ),
    ),
    Case(
        "s2.2-auto_wrap_policy-unknown",
        "ref §3.2 FSDPConfig literal",
        fsdp2(auto_wrap_policy="NO_WRAPPING"),
        error="fsdp_config.auto_wrap_policy",
    ),
    Case(
        "s2.2-transformer_layer_cls_to_wrap-comma-list-as-written",
        "ref §2.2: the string as written (may be comma-separated)",
        fsdp2(transformer_layer_cls_to_wrap="LlamaDecoderLayer,LlamaMLP"),
        fsdp2_env(
            (
                "FSDP_TRANSFORMER_CLS_TO_WRAP",
                "LlamaDecoderLayer,LlamaMLP",
                src("transformer_layer_cls_to_wrap"),
            )
        ),
    ),
    # C6: Accelerate splits on "," without stripping, so "A, B" would look for " B".
    Case(
        "s2.2-transformer_layer_cls_to_wrap-whitespace-stripped-C6",
        "accelerate-env §1.5 FSDP_TRANSFORMER_CLS_TO_WRAP no strip",
        fsdp2(transformer_layer_cls_to_wrap=" LlamaDecoderLayer , LlamaMLP "),
        fsdp2_env(
            (
                "FSDP_TRANSFORMER_CLS_TO_WRAP",
                "LlamaDecoderLayer,LlamaMLP",
                src("transformer_layer_cls_to_wrap"),
            )
        ),
    ),
    Case(
        "s2.2-transformer_layer_cls_to_wrap-yaml-list-joined-C6",
        "C6",
        fsdp2(transformer_layer_cls_to_wrap=["LlamaDecoderLayer", "LlamaMLP"]),
        fsdp2_env(
            (
                "FSDP_TRANSFORMER_CLS_TO_WRAP",
                "LlamaDecoderLayer,LlamaMLP",
                src("transformer_layer_cls_to_wrap"),
            )
        ),
    ),
    Case(
        "s2.2-transformer_layer_cls_to_wrap-empty-name-C6",
        "C6",
        fsdp2(transformer_layer_cls_to_wrap="LlamaDecoderLayer,,LlamaMLP"),
        error="fsdp_config.transformer_layer_cls_to_wrap",
    ),
    Case(
        "s2.2-min_num_params-zero-rejected",
        "ref §3.2 min_num_params: int >= 1",
        fsdp2(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=0),
        error="fsdp_config.min_num_params",
    ),
    Case(
        "s2.2-reshard_after_forward-true-fsdp2",
        "ref §2.2 FSDP_RESHARD_AFTER_FORWARD",
        fsdp2(reshard_after_forward=True),
        fsdp2_env(("FSDP_RESHARD_AFTER_FORWARD", "true", src("reshard_after_forward"))),
    ),
    # C3: Axolotl exports nothing for false, and Accelerate's FSDP2 default is true.
    Case(
        "s2.2-reshard_after_forward-false-fsdp2-exported-C3",
        "ref §2.2: false values export nothing; trainer.py:621-622",
        fsdp2(reshard_after_forward=False),
        fsdp2_env(("FSDP_RESHARD_AFTER_FORWARD", "false", src("reshard_after_forward"))),
    ),
    # D9 / C4: Axolotl exports FSDP_RESHARD_AFTER_FORWARD=true for FSDP1, which Accelerate ignores.
    Case(
        "s2.2-reshard_after_forward-true-fsdp1-as-strategy-D9-C4",
        "ref §7 D9; trainer.py:621-622",
        fsdp1(reshard_after_forward=True),
        fsdp1_env(("FSDP_SHARDING_STRATEGY", "FULL_SHARD", src("reshard_after_forward"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "s2.2-reshard_after_forward-false-fsdp1-as-strategy-D9-C4",
        "ref §7 D9",
        fsdp1(reshard_after_forward=False),
        fsdp1_env(("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", src("reshard_after_forward"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "s2.2-mixed_precision_policy-final_state_dict_type-not-exported",
        "ref §2.2: never exported, only reach TrainingArguments",
        fsdp2(mixed_precision_policy="bf16", final_state_dict_type="FULL_STATE_DICT", offload_params=True),
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    Case(
        "s2.2-fsdp2-full-order",
        "ref §2.2: write order",
        fsdp2(
            reshard_after_forward=True,
            min_num_params=1000,
            transformer_layer_cls_to_wrap="Block",
            auto_wrap_policy="TRANSFORMER_BASED_WRAP",
            cpu_offload_pin_memory=True,
            state_dict_type="FULL_STATE_DICT",
            use_orig_params=True,
            cpu_ram_efficient_loading=True,
            sync_module_states=True,
            offload_params=True,
            activation_checkpointing=True,
        ),
        fsdp2_env(
            ("FSDP_ACTIVATION_CHECKPOINTING", "true", src("activation_checkpointing")),
            ("FSDP_OFFLOAD_PARAMS", "true", src("offload_params")),
            ("FSDP_SYNC_MODULE_STATES", "true", src("sync_module_states")),
            ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", src("cpu_ram_efficient_loading")),
            ("FSDP_USE_ORIG_PARAMS", "true", src("use_orig_params")),
            ("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT", src("state_dict_type")),
            ("FSDP_CPU_OFFLOAD_PIN_MEMORY", "true", src("cpu_offload_pin_memory")),
            ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP", src("auto_wrap_policy")),
            ("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block", src("transformer_layer_cls_to_wrap")),
            ("FSDP_MIN_NUM_PARAMS", "1000", src("min_num_params")),
            ("FSDP_RESHARD_AFTER_FORWARD", "true", src("reshard_after_forward")),
        ),
    ),
    # D6 / C9: reproduced (an empty mapping turns nothing on), with a warning.
    Case(
        "s2.2-empty-fsdp_config-no-fsdp-D6-C9",
        "ref §7 D6; trainer.py:664",
        {"fsdp_config": {}},
        (MP_BF16,),
        warnings=("fsdp_config: empty, so FSDP stays off",),
    ),
    Case(
        "s2.2-empty-fsdp_config-with-fsdp_version-D6-C9",
        "ref §7 D6; validation.py:1105-1124 skips an empty mapping",
        {"fsdp_version": 2, "fsdp_config": {}},
        (MP_BF16,),
        warnings=("fsdp_config: empty, so FSDP stays off",),
    ),
    Case("s2.2-null-fsdp_config", "ref §2 row 2", {"fsdp_config": None}, (MP_BF16,)),
)

# ---- §2.2 / D1: the FSDP1 keys Axolotl's schema drops (schemas/fsdp.py:10-90) -----------------
add(
    # C2: exported for FSDP1 (Accelerate reads them); Axolotl drops them silently.
    Case(
        "D1-sharding_strategy-fsdp1-exported-C2",
        "ref §7 D1; schemas/fsdp.py:10-90",
        fsdp1(sharding_strategy="SHARD_GRAD_OP"),
        fsdp1_env(("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", src("sharding_strategy"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "D1-sharding_strategy-number-fsdp1-C2",
        "accelerate-env §2.2: numeric forms 1-5",
        fsdp1(sharding_strategy=4),
        fsdp1_env(("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD", src("sharding_strategy"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "D1-sharding_strategy-fsdp2-as-reshard-C2",
        "ref §7 D1; accelerate-env §2.2 FULL_SHARD->True",
        fsdp2(sharding_strategy="FULL_SHARD"),
        fsdp2_env(("FSDP_RESHARD_AFTER_FORWARD", "true", src("sharding_strategy"))),
    ),
    Case(
        "D1-sharding_strategy-shard_grad_op-fsdp2-as-reshard-false-C2",
        "accelerate-env §2.2 SHARD_GRAD_OP->False",
        fsdp2(sharding_strategy="SHARD_GRAD_OP"),
        fsdp2_env(("FSDP_RESHARD_AFTER_FORWARD", "false", src("sharding_strategy"))),
    ),
    Case(
        "D1-sharding_strategy-fsdp2-redundant-warns-C2",
        "ref §7 D1",
        fsdp2(sharding_strategy="FULL_SHARD", reshard_after_forward=True),
        fsdp2_env(("FSDP_RESHARD_AFTER_FORWARD", "true", src("reshard_after_forward"))),
        warnings=("fsdp_config.sharding_strategy: an FSDP1 setting",),
    ),
    Case(
        "D1-sharding_strategy-hybrid-fsdp2-error-C27",
        "accelerate-env §2.2: HSDP replication lost",
        fsdp2(sharding_strategy="HYBRID_SHARD"),
        error="fsdp_config.sharding_strategy",
    ),
    Case(
        "D1-sharding_strategy-no_shard-fsdp2-error-C27",
        "accelerate-env §2.2: NO_SHARD->False still shards",
        fsdp2(sharding_strategy="NO_SHARD"),
        error="fsdp_config.sharding_strategy",
    ),
    Case(
        "D1-sharding_strategy-contradicts-reshard-error-C27",
        "C27",
        fsdp1(sharding_strategy="FULL_SHARD", reshard_after_forward=False),
        error="fsdp_config.reshard_after_forward",
    ),
    Case(
        "D1-backward_prefetch-fsdp1-exported-C2",
        "ref §7 D1",
        fsdp1(backward_prefetch="backward_pre"),
        fsdp1_env(("FSDP_BACKWARD_PREFETCH", "BACKWARD_PRE", src("backward_prefetch"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "D1-forward_prefetch-fsdp1-exported-C2",
        "ref §7 D1",
        fsdp1(forward_prefetch=False),
        fsdp1_env(("FSDP_FORWARD_PREFETCH", "false", src("forward_prefetch"))),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "D1-prefetch-fsdp2-warns-C2",
        "accelerate-env §1.5: FSDP2 forces backward_prefetch None",
        fsdp2(backward_prefetch="BACKWARD_PRE", forward_prefetch=True),
        fsdp2_env(),
        warnings=("fsdp_config.backward_prefetch: FSDP1 only", "fsdp_config.forward_prefetch: FSDP1 only"),
    ),
    Case(
        "D1-limit_all_gathers-warns-C2",
        "ref §7 D1",
        fsdp2(limit_all_gathers=True),
        fsdp2_env(),
        warnings=("fsdp_config.limit_all_gathers:",),
    ),
    Case(
        "D1-misspelt-key-error-C2",
        "ref §7 D1: any other key dropped silently",
        fsdp2(reshard_after_foward=True),
        error="fsdp_config.reshard_after_foward",
    ),
    Case(
        "s2.2-fsdp1-full-order",
        "ref §2.2 order, then the FSDP1 keys",
        fsdp1(
            forward_prefetch=True,
            backward_prefetch="BACKWARD_POST",
            sharding_strategy="FULL_SHARD",
            use_orig_params=True,
            state_dict_type="SHARDED_STATE_DICT",
            limit_all_gathers=True,
        ),
        fsdp1_env(
            ("FSDP_USE_ORIG_PARAMS", "true", src("use_orig_params")),
            ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", src("state_dict_type")),
            ("FSDP_SHARDING_STRATEGY", "FULL_SHARD", src("sharding_strategy")),
            ("FSDP_BACKWARD_PREFETCH", "BACKWARD_POST", src("backward_prefetch")),
            ("FSDP_FORWARD_PREFETCH", "true", src("forward_prefetch")),
        ),
        warnings=(FSDP1_DEPRECATED, "fsdp_config.limit_all_gathers:"),
    ),
)

# ---- legacy `fsdp:` list (D2, C5) ---------------------------------------------------------------
add(
    Case(
        "D2-legacy-list-only-planned-C5",
        "ref §7 D2; trainer.py:664-666, :597",
        {"fsdp": ["full_shard", "auto_wrap", "offload"]},
        (
            ("ACCELERATE_USE_FSDP", "true", "fsdp"),
            ("FSDP_VERSION", "1", "default"),
            ("FSDP_OFFLOAD_PARAMS", "true", "fsdp"),
            ("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP", "fsdp"),
            ("FSDP_SHARDING_STRATEGY", "FULL_SHARD", "fsdp"),
            MP_BF16,
        ),
        warnings=("fsdp: the legacy list is deprecated",),
    ),
    Case(
        "D2-legacy-list-string-split-C5",
        "ref §3.1 fsdp: list[str]",
        {"fsdp": "shard_grad_op"},
        (
            ("ACCELERATE_USE_FSDP", "true", "fsdp"),
            ("FSDP_VERSION", "1", "default"),
            ("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", "fsdp"),
            MP_BF16,
        ),
        warnings=("fsdp: the legacy list is deprecated",),
    ),
    Case(
        "D2-legacy-list-fsdp2-shard_grad_op-C5",
        "accelerate-env §2.2 SHARD_GRAD_OP->False",
        {"fsdp": ["shard_grad_op"], "fsdp_version": 2},
        (
            ("ACCELERATE_USE_FSDP", "true", "fsdp"),
            V2,
            ("FSDP_RESHARD_AFTER_FORWARD", "false", "fsdp"),
            MP_BF16,
        ),
        warnings=("fsdp: the legacy list is deprecated",),
    ),
    Case(
        "D2-legacy-list-fsdp2-hybrid-error-C5",
        "accelerate-env §2.2",
        {"fsdp": ["hybrid_shard"], "fsdp_version": 2},
        error="fsdp",
    ),
    Case(
        "D2-legacy-list-two-strategies-error-C5",
        "transformers refuses full_shard with shard_grad_op",
        {"fsdp": ["full_shard", "shard_grad_op"]},
        error="fsdp",
    ),
    Case("D2-legacy-list-unknown-item", "ref §3.1", {"fsdp": ["full_shrad"]}, error="fsdp"),
    Case(
        "D2-legacy-list-ignored-with-fsdp_config-C5",
        "ref §2.2 reads only fsdp_config",
        {"fsdp": ["full_shard"], "fsdp_version": 2, "fsdp_config": {"offload_params": True}},
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
        warnings=("fsdp: the legacy list is ignored",),
    ),
)

# ---- §3.2 key normalisation (validation.py:1083-1124) ------------------------------------------
add(
    Case(
        "s3.2-fsdp_-prefix-stripped",
        "ref §3.2 check_fsdp_config_kwargs_prefix",
        {
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_offload_params": True,
                "fsdp_state_dict_type": "FULL_STATE_DICT",
            }
        },
        (
            FSDP_ON,
            ("FSDP_VERSION", "2", "fsdp_config.fsdp_version"),
            ("FSDP_OFFLOAD_PARAMS", "true", src("offload_params")),
            ("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT", src("state_dict_type")),
            MP_BF16,
        ),
    ),
    Case(
        "s3.2-version-in-fsdp_config-moved",
        "ref §3.2 check_fsdp_version_in_fsdp_config: version -> fsdp_version",
        {"fsdp_config": {"version": 2, "offload_params": True}},
        (
            FSDP_ON,
            ("FSDP_VERSION", "2", "fsdp_config.version"),
            ("FSDP_OFFLOAD_PARAMS", "true", src("offload_params")),
            MP_BF16,
        ),
    ),
    Case(
        "s3.2-top-level-version-wins-source",
        "ref §3.2",
        {"fsdp_version": 2, "fsdp_config": {"fsdp_version": 2, "offload_params": True}},
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    Case(
        "s3.2-fsdp1-pinned-when-no-version",
        "ref §3.2: pin both to 1 (transformers >= 5.10 defaults to 2)",
        {"fsdp_config": {"offload_params": True}},
        (FSDP_ON, V1_PINNED, ("FSDP_OFFLOAD_PARAMS", "true", src("offload_params")), MP_BF16),
        warnings=(FSDP1_DEPRECATED,),
    ),
    Case(
        "s3.2-version-string-2",
        "ref §2.2: str(cfg.fsdp_version) == '2'",
        {"fsdp_version": "2", "fsdp_config": {"offload_params": True}},
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    # D8 / C8: Axolotl exports FSDP_VERSION=2 while fsdp_config keeps 1.
    Case(
        "s3.2-version-conflict-error-D8-C8",
        "ref §7 D8; validation.py:1105-1124",
        {"fsdp_version": 2, "fsdp_config": {"fsdp_version": 1, "offload_params": True}},
        error="fsdp_version",
    ),
    Case(
        "s3.2-version-3-rejected",
        "ref §3.2 fsdp_version 1 or 2",
        {"fsdp_version": 3, "fsdp_config": {"offload_params": True}},
        error="fsdp_version",
    ),
    Case(
        "s3.2-both-spellings-agree",
        "ref §3.2",
        fsdp2(fsdp_offload_params=True, offload_params=True),
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    Case(
        "s3.2-both-spellings-conflict-error-C7",
        "ref §3.2",
        fsdp2(fsdp_offload_params=True, offload_params=False),
        error="fsdp_config.offload_params",
    ),
    # D19 / C7: Axolotl's replace("fsdp_", "") turns this into offload_params; a doubled prefix is a typo.
    Case(
        "s3.2-prefix-only-once-D19-C7",
        "ref §7 D19; validation.py:1083-1103",
        fsdp2(fsdp_fsdp_offload_params=True),
        error="fsdp_config.fsdp_fsdp_offload_params",
    ),
)

# ---- §2.3 DeepSpeed (trainer.py:535-588, :667-679) ---------------------------------------------
ZERO3_BF16_FILE = "deepspeed_configs/zero3_bf16.json"
add(
    Case(
        "s2.3-file-zero3-keeps-zero3-config-D10-C17",
        "ref §2.3 steps 2-6; file resolved like Axolotl's CWD",
        {"deepspeed": ZERO3_BF16_FILE},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
    ),
    Case(
        "s2.3-file-zero2",
        "ref §2.3 step 6: ZERO3_INIT only for stage 3",
        {"deepspeed": "deepspeed_configs/zero2.json"},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
    ),
    Case(
        "s2.3-file-zero1",
        "ref §2.3 step 6",
        {"deepspeed": "deepspeed_configs/zero1.json"},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
    ),
    Case(
        "s2.3-preset-zero3",
        "issue 3: presets usable as deepspeed: zero3",
        {"deepspeed": "zero3"},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
        deepspeed=ds.preset("zero3"),
    ),
    Case(
        "s2.3-preset-zero2",
        "issue 3 presets",
        {"deepspeed": "zero2"},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
        deepspeed=ds.preset("zero2"),
    ),
    Case(
        "s2.3-preset-zero3_offload_all",
        "issue 3 presets",
        {"deepspeed": "zero3_offload_all"},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
        deepspeed=ds.preset("zero3_offload_all"),
    ),
    Case(
        "s2.3-inline-mapping",
        "ref §2.3 step 3: inline mapping -> file (ours: the mounted path, C11)",
        {"deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
        deepspeed={"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}},
    ),
    Case(
        "s2.3-no-zero_optimization-no-stage",
        "ref §2.3 stage detection: .get('zero_optimization', {}).get('stage')",
        {"deepspeed": {"train_batch_size": "auto"}},
        (DS_ON, DS_FILE, GAS_1, MP_BF16),
    ),
    Case(
        "s2.3-stage-0-exports-no-stage",
        "ref §7 D4: stage 0 exports neither",
        {"deepspeed": {"zero_optimization": {"stage": 0}}},
        (DS_ON, DS_FILE, GAS_1, MP_BF16),
    ),
    # D4 / C12: Axolotl exports STAGE=3 without ZERO3_INIT for a string "3".
    Case(
        "s2.3-string-stage-3-zero3-init-D4-C12",
        "ref §7 D4; trainer.py:557-560",
        {"deepspeed": {"zero_optimization": {"stage": "3"}}},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
        warnings=("deepspeed: zero_optimization.stage was a string",),
        deepspeed={"zero_optimization": {"stage": 3}},
    ),
    Case(
        "s2.3-stage-auto-rejected-C12",
        "accelerate-env §1.6: int(stage)",
        {"deepspeed": {"zero_optimization": {"stage": "auto"}}},
        error="deepspeed.zero_optimization.stage",
    ),
    Case(
        "s2.3-gas-explicit",
        "ref §2.3 step 5",
        {"deepspeed": "zero1", "gradient_accumulation_steps": 4},
        (
            DS_ON,
            DS_FILE,
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "gradient_accumulation_steps"),
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
    ),
    # C13: Axolotl exports the schema default 1 here and derives GAS later in normalize_config.
    Case(
        "s2.3-gas-from-batch_size-C13",
        "ref §7 D3; utils/config/__init__.py:201-207",
        {"deepspeed": "zero1", "batch_size": 16, "micro_batch_size": 4},
        (
            DS_ON,
            DS_FILE,
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "batch_size"),
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
    ),
    # D3 / C13: Axolotl exports the string "None", which Accelerate's int() rejects.
    Case(
        "s2.3-gas-null-with-batch_size-D3-C13",
        "ref §7 D3; trainer.py:554-556",
        {"deepspeed": "zero1", "gradient_accumulation_steps": None, "batch_size": 8, "micro_batch_size": 2},
        (
            DS_ON,
            DS_FILE,
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "batch_size"),
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
    ),
    Case(
        "s2.3-gas-null-without-batch_size-D3-C13",
        "ref §7 D3",
        {"deepspeed": "zero1", "gradient_accumulation_steps": None},
        error="gradient_accumulation_steps",
    ),
    Case(
        "s2.3-batch_size-not-multiple-C13",
        "C13",
        {"deepspeed": "zero1", "batch_size": 10, "micro_batch_size": 4},
        error="batch_size",
    ),
    # D11 / C11: Axolotl exports everything, then HfTrainerDeepSpeedConfig raises in the worker.
    Case(
        "s2.3-missing-file-error-D11-C11",
        "ref §7 D11; trainer.py:668-679, :587-588",
        {"deepspeed": "deepspeed_configs/zero4.json"},
        error="deepspeed",
    ),
    Case("s2.3-empty-path-error", "C11", {"deepspeed": "  "}, error="deepspeed"),
    # D13 / C17: Axolotl sets these in-process (setdefault, then forces WORLD_SIZE/LOCAL_RANK/RANK).
    Case(
        "s2.3-single-gpu-defaults-deferred-D13-C17",
        "ref §2.3 steps 7-8; ref §7 D13; trainer.py:562-584",
        {"deepspeed": "zero2"},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
        hw=HW_ONE_GPU,
        deferred=(P2P, "single_gpu_rendezvous_defaults"),
    ),
    Case(
        "s2.3-unknown-topology-defers-defaults-C17",
        "ref §4: device_count() == 1 is a worker fact",
        {"deepspeed": "zero3", "bf16": True},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        hw=HW_UNKNOWN,
        deferred=(P2P, "single_gpu_rendezvous_defaults", "deepspeed_zero3_config"),
    ),
    # D12 / C23: Axolotl's AutoTP rewrite crashes on an inline mapping (it open()s it).
    Case(
        "s2.3-autotp-inline-D12-C23",
        "ref §7 D12; validation.py:1156-1186",
        {"deepspeed": {"zero_optimization": {"stage": 2}}, "tensor_parallel_size": 2},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2", "deepspeed.zero_optimization.stage"),
            ("PARALLELISM_CONFIG_TP_SIZE", "2", "tensor_parallel_size"),
            ("ACCELERATE_USE_PARALLELISM_CONFIG", "true", "tensor_parallel_size"),
            MP_BF16,
        ),
        deepspeed={
            "zero_optimization": {"stage": 2, "gather_16bit_weights_on_model_save": True},
            "tensor_parallel": {"autotp_size": 2},
        },
        hw=HW_2,
    ),
    Case(
        "s2.3-deepcompile-rewrite",
        "ref §3.3 check_deepcompile (validation.py:1188-1206)",
        {"deepspeed": {"zero_optimization": {"stage": 1}}, "deepcompile": True},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
        deepspeed={"zero_optimization": {"stage": 1}, "compile": {"deepcompile": True}},
    ),
    Case(
        "s2.3-deepcompile-needs-deepspeed",
        "ref §3.3 check_deepcompile",
        {"deepcompile": True},
        error="deepcompile",
    ),
    # D14 / C16: a JSON that hard-codes bf16 while the plan resolves to something else.
    Case(
        "s2.3-json-bf16-vs-plan-no-D14-C16",
        "ref §7 D14; trainer.py:684-691",
        {"deepspeed": ZERO3_BF16_FILE, "bf16": False},
        error="deepspeed.bf16.enabled",
    ),
    Case(
        "s2.3-json-bf16-auto-on-non-bf16-gpu-D14-C16",
        "ref §7 D14",
        {"deepspeed": ZERO3_BF16_FILE},
        hw=HW_NO_BF16,
        error="deepspeed.bf16.enabled",
    ),
    Case(
        "s2.3-json-bf16-vs-fp16-D14-C16",
        "ref §7 D14",
        {"deepspeed": ZERO3_BF16_FILE, "fp16": True},
        error="deepspeed.bf16.enabled",
    ),
    Case(
        "s2.3-json-bf16-unknown-gpu-deferred-D14-C16",
        "ref §7 D14: the worker checks",
        {"deepspeed": ZERO3_BF16_FILE},
        (DS_ON, DS_FILE, GAS_1, *ZERO3),
        hw=Hardware(nodes=2, gpus_per_node=8),
        deferred=(P2P, "deepspeed_zero3_config", "bf16_auto"),
    ),
    # D18 / C25: Axolotl looks for "zero3" in the path, so presets and inline mappings never warn.
    Case(
        "s2.3-qlora-zero3-reentrant-warns-D18-C25",
        "ref §7 D18; validation.py:626-644",
        {
            "deepspeed": "zero3",
            "adapter": "qlora",
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
        },
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
        warnings=("gradient_checkpointing_kwargs.use_reentrant: false with qlora and ZeRO-3",),
    ),
    # D20 / C22: Ray with batch_size only; the worker's re-validation fails in Axolotl.
    Case(
        "s2.3-ray-batch_size-only-D20-C22",
        "ref §7 D20; cli/train.py:168-182",
        {"use_ray": True, "ray_num_workers": 4, "deepspeed": "zero1", "batch_size": 8, "micro_batch_size": 2},
        (
            DS_ON,
            DS_FILE,
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "batch_size"),
            ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "deepspeed.zero_optimization.stage"),
            MP_BF16,
        ),
    ),
    # D21 / C22: on Ray the workers read the same mounted file as any other launcher.
    Case(
        "s2.3-ray-file-mounted-path-D21-C22",
        "ref §7 D21; cli/train.py:92-139",
        {"use_ray": True, "deepspeed": ZERO3_BF16_FILE},
        (DS_ON, DS_FILE, GAS_1, *ZERO3, MP_BF16),
        deferred=(P2P, "deepspeed_zero3_config"),
    ),
)

# ---- §2.4 parallelism (trainer.py:625-655) -----------------------------------------------------
USE_PC = "ACCELERATE_USE_PARALLELISM_CONFIG"
add(
    Case(
        "s2.4-tp",
        "ref §2.4",
        {"tensor_parallel_size": 2},
        (
            ("PARALLELISM_CONFIG_TP_SIZE", "2", "tensor_parallel_size"),
            (USE_PC, "true", "tensor_parallel_size"),
            MP_BF16,
        ),
        hw=HW_2,
    ),
    Case("s2.4-tp-1-nothing", "ref §2.4: > 1", {"tensor_parallel_size": 1, "dp_shard_size": 1}, (MP_BF16,)),
    Case(
        "s2.4-dp_shard",
        "ref §2.4",
        {"dp_shard_size": 4},
        (
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "4", "dp_shard_size"),
            (USE_PC, "true", "dp_shard_size"),
            MP_BF16,
        ),
        hw=HW_4,
    ),
    Case(
        "s2.4-dp_replicate",
        "ref §2.4",
        {"dp_replicate_size": 2},
        (
            ("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2", "dp_replicate_size"),
            (USE_PC, "true", "dp_replicate_size"),
            MP_BF16,
        ),
        hw=HW_2,
    ),
    Case(
        "s2.4-cp",
        "ref §2.4 CP + ACCELERATE_ALLOW_CP_STANDALONE",
        {"context_parallel_size": 2},
        (
            ("PARALLELISM_CONFIG_CP_SIZE", "2", "context_parallel_size"),
            ("ACCELERATE_ALLOW_CP_STANDALONE", "true", "context_parallel_size"),
            (USE_PC, "true", "context_parallel_size"),
            MP_BF16,
        ),
        hw=HW_2,
    ),
    Case(
        "s2.4-sequence_parallel_degree-migrated-C24",
        "ref §2.4; validation.py:1634-1641",
        {"sequence_parallel_degree": 4},
        (
            ("PARALLELISM_CONFIG_CP_SIZE", "4", "sequence_parallel_degree"),
            ("ACCELERATE_ALLOW_CP_STANDALONE", "true", "sequence_parallel_degree"),
            (USE_PC, "true", "sequence_parallel_degree"),
            MP_BF16,
        ),
        warnings=("sequence_parallel_degree: deprecated",),
        hw=HW_4,
    ),
    Case(
        "s2.4-sequence_parallel_degree-conflict",
        "ref §2.4",
        {"sequence_parallel_degree": 2, "context_parallel_size": 4},
        error="sequence_parallel_degree",
    ),
    Case(
        "s2.4-ep-with-dp_shard-C24",
        "ref §2.4 EP sets the flag only if dp_shard_size > 1",
        {"expert_parallel_size": 2, "dp_shard_size": 4},
        (
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "4", "dp_shard_size"),
            ("PARALLELISM_CONFIG_EP_SIZE", "2", "expert_parallel_size"),
            (USE_PC, "true", "dp_shard_size"),
            MP_BF16,
        ),
    ),
    Case(
        "s2.4-pure-ep-C24",
        "ref §2.4 EP without dp_shard: no flag; expert_parallel/plugin.py:292-293 (ep == world)",
        {"expert_parallel_size": 8},
        (("PARALLELISM_CONFIG_EP_SIZE", "8", "expert_parallel_size"), MP_BF16),
        warnings=("expert_parallel_size: without dp_shard_size > 1",),
    ),
    # C30: the expert-parallel plugin refuses EP that leaves ranks unfilled (plugin.py:282-290).
    Case(
        "s2.4-ep-alone-below-world-C30",
        "integrations/expert_parallel/plugin.py:282-290",
        {"expert_parallel_size": 2},
        hw=HW_4,
        error="expert_parallel_size",
    ),
    Case(
        "s2.4-ep-with-tp-C30",
        "integrations/expert_parallel/plugin.py:301-307: EP x TP not supported",
        {"expert_parallel_size": 2, "dp_shard_size": 2, "tensor_parallel_size": 2},
        error="expert_parallel_size",
    ),
    Case(
        "s2.4-all-order",
        "ref §2.4 write order",
        {
            "context_parallel_size": 2,
            "dp_replicate_size": 2,
            "dp_shard_size": 2,
            "tensor_parallel_size": 2,
        },
        (
            ("PARALLELISM_CONFIG_TP_SIZE", "2", "tensor_parallel_size"),
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2", "dp_shard_size"),
            ("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2", "dp_replicate_size"),
            ("PARALLELISM_CONFIG_CP_SIZE", "2", "context_parallel_size"),
            ("ACCELERATE_ALLOW_CP_STANDALONE", "true", "context_parallel_size"),
            (USE_PC, "true", "tensor_parallel_size"),
            MP_BF16,
        ),
        hw=Hardware(nodes=2, gpus_per_node=8, bf16_supported=True, torch_version="2.13.0"),
    ),
    # C29: Axolotl's loader fills dp_shard_size from the world (utils/distributed.py:350-353).
    Case(
        "s2.4-with-fsdp2-after-fsdp-block-C29",
        "ref §2 row 4 after row 2; TP exported with FSDP too; distributed.py:350-353",
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}, "tensor_parallel_size": 2},
        fsdp2_env(
            ("FSDP_RESHARD_AFTER_FORWARD", "true", src("reshard_after_forward")),
            ("PARALLELISM_CONFIG_TP_SIZE", "2", "tensor_parallel_size"),
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2", "dp_shard_size (inferred)"),
            (USE_PC, "true", "tensor_parallel_size"),
        ),
        hw=HW_4,
        warnings=("dp_shard_size: not set; 2 inferred from the 4 processes",),
    ),
    # Accelerate refuses FSDP2 whose mesh leaves it nothing to shard (parallelism_config.py:379-388).
    Case(
        "s2.4-fsdp2-all-tensor-parallel",
        "accelerate parallelism_config.py:379-388",
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}, "tensor_parallel_size": 2},
        hw=HW_2,
        error="tensor_parallel_size",
    ),
    Case(
        "s2.4-sizes-must-equal-processes-C28",
        "accelerate-env §1.7: product must match the process count",
        {"tensor_parallel_size": 3},
        error="tensor_parallel_size",
    ),
    # C29: a written dp_shard_size stands; the loader replicates the rest (distributed.py:359-369).
    Case(
        "s2.4-fsdp2-dp_shard-replicates-the-rest-C29",
        "distributed.py:359-369",
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}, "dp_shard_size": 2},
        fsdp2_env(
            ("FSDP_RESHARD_AFTER_FORWARD", "true", src("reshard_after_forward")),
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2", "dp_shard_size"),
            ("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "4", "dp_replicate_size (inferred)"),
            (USE_PC, "true", "dp_shard_size"),
        ),
        warnings=("dp_replicate_size: not set; 4 inferred from the 8 processes",),
    ),
    Case(
        "s2.4-deepspeed-cp-infers-dp_shard-C29",
        "distributed.py:350-353: CP builds the loader's mesh without FSDP too",
        {"deepspeed": {"zero_optimization": {"stage": 3}}, "context_parallel_size": 4},
        (
            DS_ON,
            DS_FILE,
            GAS_1,
            *ZERO3,
            ("PARALLELISM_CONFIG_CP_SIZE", "4", "context_parallel_size"),
            ("ACCELERATE_ALLOW_CP_STANDALONE", "true", "context_parallel_size"),
            ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2", "dp_shard_size (inferred)"),
            (USE_PC, "true", "context_parallel_size"),
            MP_BF16,
        ),
        warnings=("dp_shard_size: not set; 2 inferred from the 8 processes",),
        deferred=(P2P, "deepspeed_zero3_config"),
        deepspeed={"zero_optimization": {"stage": 3}},
    ),
    # C28: without TP/CP the loader builds no mesh for DeepSpeed; the sizes must fit as written.
    Case(
        "s2.4-deepspeed-dp_shard-must-fit-C28",
        "loaders/model.py:207-219; accelerate parallelism_config.py:370-377",
        {"deepspeed": "zero2", "dp_shard_size": 2},
        error="dp_shard_size",
    ),
    Case(
        "s2.4-ep-counts-with-the-flag-C30",
        "Axolotl's EP plugin: ep x dp_shard x tp x cp must equal the world (plugin.py:282-290)",
        {"expert_parallel_size": 2, "dp_shard_size": 2},
        error="expert_parallel_size",
    ),
    # Accelerate refuses TP/CP with pure replication (parallelism_config.py:336-341).
    Case(
        "s2.4-tp-with-pure-replication",
        "accelerate parallelism_config.py:336-341",
        {"tensor_parallel_size": 2, "dp_replicate_size": 2, "dp_shard_size": 1},
        hw=HW_4,
        error="dp_replicate_size",
    ),
    Case(
        "s2.4-fsdp1-refuses-parallel-sizes",
        "accelerate parallelism_config.py:390-397: FSDP1 is neither FSDP2, DeepSpeed nor multi-device",
        {**fsdp1(offload_params=True), "tensor_parallel_size": 2},
        hw=HW_2,
        error="tensor_parallel_size",
    ),
    Case("s2.4-size-zero-rejected-C19", "C19", {"dp_shard_size": 0}, error="dp_shard_size"),
)

# ---- §3.3 validators we reproduce --------------------------------------------------------------
add(
    Case(
        "s3.3-cpu_offload_pin_memory-false-needs-offload",
        "ref §3.3 check_fsdp2_cpu_offload_pin_memory (validation.py:1050-1065)",
        fsdp2(cpu_offload_pin_memory=False),
        error="fsdp_config.cpu_offload_pin_memory",
    ),
    Case(
        "s3.3-cpu_offload_pin_memory-false-needs-fsdp2",
        "ref §3.3 check_fsdp2_cpu_offload_pin_memory",
        fsdp1(cpu_offload_pin_memory=False, offload_params=True),
        error="fsdp_config.cpu_offload_pin_memory",
    ),
    Case(
        "s3.3-fsdp2-bnb-8bit-optimizer",
        "ref §3.3 check_fsdp2_w_8bit_optimizer (validation.py:1139-1154)",
        {**fsdp2(offload_params=True), "optimizer": "adamw_bnb_8bit"},
        error="optimizer",
    ),
    Case(
        "s3.3-fsdp2-adamw_8bit-optimizer",
        "ref §3.3 check_fsdp2_w_8bit_optimizer",
        {**fsdp2(offload_params=True), "optimizer": "adamw_8bit"},
        error="optimizer",
    ),
    Case(
        "s3.3-fsdp2-torch-8bit-optimizer-ok",
        "ref §3.3 check_fsdp2_w_8bit_optimizer names only the bnb ones",
        {**fsdp2(offload_params=True), "optimizer": "adamw_torch_8bit"},
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    Case(
        "s3.3-fsdp1-offload-8bit-optimizer",
        "ref §3.3 check_fsdp_offload_w_8bit_optimizer (validation.py:1126-1137)",
        {**fsdp1(offload_params=True), "optimizer": "paged_adamw_8bit"},
        error="optimizer",
    ),
    Case(
        "s3.3-fsdp2-cpu_ram_efficient_loading-4bit",
        "ref §3.3 check_fsdp2_cpu_ram_efficient_loading_w_4bit (0.19.0 validation.py:1266)",
        {**fsdp2(cpu_ram_efficient_loading=True), "load_in_4bit": True},
        error="fsdp_config.cpu_ram_efficient_loading",
    ),
    Case(
        "s3.3-fp8-all-gather-needs-fsdp2",
        "ref §3.3 check_fp8_config (validation.py:424-452)",
        {**fsdp1(offload_params=True), "fp8_enable_fsdp_float8_all_gather": True},
        error="fp8_enable_fsdp_float8_all_gather",
    ),
    Case(
        "s3.3-tp-bnb-8bit-optimizer",
        "ref §3.3 check_tensor_parallel_optimizer (validation.py:1775-1783)",
        {"tensor_parallel_size": 2, "optimizer": "adamw_bnb_8bit"},
        error="optimizer",
    ),
    Case(
        "s3.3-cp-sample_packing-micro_batch_size",
        "ref §3.3 check_context_parallel_size (validation.py:1627-1731)",
        {"context_parallel_size": 2, "sample_packing": True, "micro_batch_size": 2},
        error="micro_batch_size",
    ),
    Case(
        "s3.3-fsdp2-old-torch",
        "ref §3.3 check_fsdp_torch_version (config.py:2113-2128)",
        fsdp2(offload_params=True),
        hw=Hardware(bf16_supported=True, torch_version="2.6.0"),
        error="fsdp_version",
    ),
    Case(
        "s3.3-gas-and-batch_size",
        "ref §3.3 check_gas_bsz (validation.py:272-279)",
        {"gradient_accumulation_steps": 2, "batch_size": 8},
        error="batch_size",
    ),
    Case(
        "s3.3-batch_size-without-micro_batch_size",
        "ref §3.3 check_batch_size_fields (0.19.0 validation.py:222-229)",
        {"batch_size": 8, "micro_batch_size": None},
        error="micro_batch_size",
    ),
    Case(
        "s3.3-batch_size-alone",
        "0.19.0 check_batch_size_fields: micro_batch_size's default does not count",
        {"batch_size": 8},
        error="micro_batch_size",
    ),
    Case(
        "s3.3-size-based-wrap-needs-min_num_params",
        "ref §3.2 validate_size_based_wrap (schemas/fsdp.py:84-90)",
        fsdp2(auto_wrap_policy="SIZE_BASED_WRAP"),
        error="fsdp_config.min_num_params",
    ),
    Case(
        "s3.3-relora-forbids-fsdp",
        "ref §3.3 check_relora (validation.py:1580-1612)",
        {**fsdp2(offload_params=True), "relora": True},
        error="relora",
    ),
    Case(
        "s3.3-relora-forbids-deepspeed",
        "ref §3.3 check_relora",
        {"deepspeed": "zero2", "relora": True},
        error="relora",
    ),
    Case(
        "s3.3-muon-deepspeed",
        "ref §3.3 check_muon_deepspeed_fsdp (validation.py:889-964)",
        {"deepspeed": "zero2", "optimizer": "muon"},
        error="optimizer",
    ),
    Case(
        "s3.3-muon-fsdp1",
        "ref §3.3 check_muon_deepspeed_fsdp: FSDP must be 2",
        {**fsdp1(offload_params=True), "optimizer": "muon"},
        error="optimizer",
    ),
    Case(
        "s3.3-muon-fsdp2-ok",
        "ref §3.3 check_muon_deepspeed_fsdp",
        {**fsdp2(offload_params=True), "optimizer": "muon"},
        fsdp2_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
    ),
    Case(
        "s3.3-fsdp2-quantised-rl",
        "ref §3.3 check_fsdp2_base_model_quant_rl (validation.py:1067-1081)",
        {**fsdp2(offload_params=True), "rl": "dpo", "load_in_4bit": True},
        error="fsdp_version",
    ),
    Case(
        "s3.3-fp32_norms-needs-fsdp2",
        "ref §3.3 check_fp32_norms (config.py:1658-1680)",
        {**fsdp1(offload_params=True), "fp32_norms": True},
        error="fp32_norms",
    ),
    Case(
        "s3.3-lora-kernels-multi-gpu-fsdp1",
        "ref §3.3 check_multigpu_lora_kernels (config.py:1854-1872)",
        {**fsdp1(offload_params=True), "lora_mlp_kernel": True},
        error="lora_mlp_kernel",
    ),
    Case(
        "s3.3-lora-kernels-one-gpu-fsdp1-ok",
        "ref §3.3 check_multigpu_lora_kernels: n_gpu > 1 only",
        {**fsdp1(offload_params=True), "lora_mlp_kernel": True},
        fsdp1_env(("FSDP_OFFLOAD_PARAMS", "true", src("offload_params"))),
        hw=HW_ONE_GPU,
        warnings=(FSDP1_DEPRECATED,),
    ),
    # C18: validators of fields we do not own are not reproduced (Axolotl rejects warmup_steps: 0.1).
    Case(
        "s3.3-unowned-field-not-validated-C18",
        "corpus expert_parallel/qwen3_30ba3b_ep_fsdp_fft_4gpu.yaml",
        {"warmup_steps": 0.1, "datasets": [{"path": "x"}]},
        (MP_BF16,),
    ),
)


def _corpus_dirs(config: dict[str, Any], request: pytest.FixtureRequest) -> tuple[Path, ...]:
    """Where a DeepSpeed file named in ``config`` is looked up: Axolotl's examples (the corpus).

    Only such configs need the reference material; every other case runs without it.
    """
    if not isinstance(config.get("deepspeed"), str) or not config["deepspeed"].endswith(".json"):
        return ()
    corpus = request.getfixturevalue("corpus")
    assert isinstance(corpus, Path)
    return (corpus,)


def _plan(case: Case, request: pytest.FixtureRequest) -> Plan:
    return plan(parse_config(case.config, base_dirs=_corpus_dirs(case.config, request)), case.hw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case: Case, request: pytest.FixtureRequest) -> None:
    if case.error is not None:
        with pytest.raises(ConfigError) as caught:
            _plan(case, request)
        assert caught.value.field == case.error, f"{case.ref}: {caught.value}"
        assert "\n" not in str(caught.value)
        return
    result = _plan(case, request)
    assert [(v.name, v.value, v.source) for v in result.env] == list(case.env), case.ref
    assert tuple(d.kind for d in result.deferred) == case.deferred, case.ref
    assert len(result.warnings) == len(case.warnings), result.warnings
    for got, prefix in zip(result.warnings, case.warnings, strict=True):
        assert got.startswith(prefix), (got, prefix)
    if case.deepspeed is not None:
        assert result.deepspeed == case.deepspeed, case.ref


def test_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_defect_has_a_case() -> None:
    """Each known defect D1-D21 (ref §7) appears in at least one case ID with our behaviour."""
    named = {int(n) for c in CASES for n in re.findall(r"\bD(\d+)\b", c.id.replace("-", " "))}
    assert named >= set(range(1, 22)), sorted(set(range(1, 22)) - named)


def test_rules_named_here_are_documented(repo: Path) -> None:
    """Every difference rule a case names has its section in docs/compatibility.md."""
    text = (repo / "docs" / "compatibility.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#{2,4} (C\d+)\b", text, flags=re.MULTILINE))
    named = {rid for c in CASES for rid in re.findall(r"\b(C\d+)\b", c.id.replace("-", " "))}
    assert named and named <= documented, sorted(named - documented)


# ---- details the table does not show ------------------------------------------------------------


def test_nccl_timeout_is_a_default_not_an_override() -> None:
    """Row 0 is a setdefault (0.19.0 trainer.py:665-666); every other variable overwrites."""
    result = plan(
        parse_config({"ddp_timeout": 600, "fsdp_version": 2, "fsdp_config": {"offload_params": True}}), HW
    )
    modes = {v.name: v.mode for v in result.env}
    assert modes == {
        "AXOLOTL_NCCL_TIMEOUT": "default",
        "ACCELERATE_USE_FSDP": "set",
        "FSDP_VERSION": "set",
        "FSDP_OFFLOAD_PARAMS": "set",
        "ACCELERATE_MIXED_PRECISION": "set",
    }


def test_nccl_p2p_deferred_detail() -> None:
    """Row 1 (trainer.py:659-662): "1" when the check fails, never over a launcher's value."""
    (step,) = plan(parse_config({"bf16": False}), HW).deferred
    assert step == NcclP2PCheck()
    assert to_spec(step) == {
        "kind": "nccl_p2p_check",
        "variable": "NCCL_P2P_DISABLE",
        "source": "default",
        "detail": {"skip_if_set": True, "value_if_unsupported": "1"},
    }


@pytest.mark.parametrize(
    ("config", "detail"),
    [
        ({}, {"if_supported": "bf16", "otherwise": "fp16", "without_gpu": "no"}),
        ({"fp16": False}, {"if_supported": "bf16", "otherwise": "no", "without_gpu": "no"}),
        (
            {"deepspeed": "deepspeed_configs/zero3_bf16.json"},
            {"if_supported": "bf16", "otherwise": "fp16", "without_gpu": "no", "deepspeed_requires": "bf16"},
        ),
    ],
    ids=["auto-else-fp16-C14", "auto-fp16-false-else-no", "auto-deepspeed-needs-bf16-D14"],
)
def test_bf16_auto_deferred_detail(
    config: dict[str, Any], detail: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    """Row 6 with bf16 support unknown: the worker chooses, falling back as Axolotl's resolve_dtype
    does (utils/config/__init__.py:157-167); a worker without a GPU trains in fp32."""
    result = plan(parse_config(config, base_dirs=_corpus_dirs(config, request)), HW_UNKNOWN)
    step = next(d for d in result.deferred if isinstance(d, Bf16Auto))
    assert (step.variable, step.source, step.detail()) == ("ACCELERATE_MIXED_PRECISION", "bf16", detail)
    assert "ACCELERATE_MIXED_PRECISION" not in result.env_dict


def test_torch_compile_auto_deferred_detail() -> None:
    """D16: the worker exports the backend iff its torch is >= 2.5.1 (config.py:2040-2063)."""
    result = plan(parse_config({"torch_compile": "auto", "torch_compile_backend": "eager"}), HW_UNKNOWN)
    step = next(d for d in result.deferred if isinstance(d, TorchCompileAuto))
    assert step == TorchCompileAuto("EAGER")
    assert (step.variable, step.detail()) == (
        "ACCELERATE_DYNAMO_BACKEND",
        {"value": "EAGER", "min_torch": "2.5.1"},
    )


def test_single_gpu_defaults_detail() -> None:
    """D13: rendezvous defaults as setdefaults (trainer.py:562-584), never forced."""
    result = plan(parse_config({"deepspeed": "zero2"}), HW_ONE_GPU)
    step = next(d for d in result.deferred if isinstance(d, SingleGpuRendezvousDefaults))
    assert step.detail() == {
        "defaults": {
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "RANK": "0",
            "MASTER_ADDR": "0.0.0.0",
            "MASTER_PORT": "29500",
        }
    }


def test_zero3_config_deferred_uses_the_planned_file() -> None:
    """D10: the bootstrap keeps HfTrainerDeepSpeedConfig alive, built from the file workers read: the
    plan's DeepSpeed path (the spec's deepspeedPath), which the step does not repeat."""
    result = plan(parse_config({"deepspeed": "zero3"}), HW, deepspeed_path="/mnt/ds/zero3.json")
    step = next(d for d in result.deferred if isinstance(d, DeepSpeedZero3Config))
    assert to_spec(step)["detail"] == {}
    assert result.env_dict["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "/mnt/ds/zero3.json"
    assert result.deepspeed_path == "/mnt/ds/zero3.json"
    assert result.zero_stage == 3


def test_deepspeed_path_must_be_absolute() -> None:
    with pytest.raises(ConfigError) as caught:
        plan(parse_config({"deepspeed": "zero2"}), HW, deepspeed_path="deepspeed.json")
    assert caught.value.field == "deepspeed_path"


def test_file_json_shipped_as_written(corpus: Path) -> None:
    """Step 3-4: the JSON the file holds is what workers get (no rewrite without TP/deepcompile)."""
    import json

    path = corpus / "deepspeed_configs" / "zero3_bf16_cpuoffload_all.json"
    result = plan(parse_config({"deepspeed": str(path)}), HW)
    assert result.deepspeed == json.loads(path.read_text())


def test_relative_deepspeed_path_tries_each_base_dir(tmp_path: Path, corpus: Path) -> None:
    """C11: a relative path resolves against the config's folder first, then the working directory."""
    import json

    (tmp_path / "deepspeed_configs").mkdir()
    (tmp_path / "deepspeed_configs" / "zero3_bf16.json").write_text(
        json.dumps({"zero_optimization": {"stage": 1}})
    )
    first = parse_config({"deepspeed": ZERO3_BF16_FILE}, base_dirs=(tmp_path, corpus))
    assert first.deepspeed_json == {"zero_optimization": {"stage": 1}}
    second = parse_config({"deepspeed": ZERO3_BF16_FILE}, base_dirs=(tmp_path / "nowhere", corpus))
    assert second.deepspeed_json is not None and second.deepspeed_json["zero_optimization"]["stage"] == 3


def test_misspelt_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(fsdp2(reshard_after_foward=True))
    assert "did you mean 'reshard_after_forward'?" in str(caught.value)


def test_plan_is_deterministic_and_does_not_mutate_the_config() -> None:
    config = parse_config({"deepspeed": {"zero_optimization": {"stage": "3"}}, "tensor_parallel_size": 2})
    before = config.deepspeed_json
    first, second = plan(config, HW_2), plan(config, HW_2)
    assert first == second and first.to_json() == second.to_json()
    assert config.deepspeed_json == before == {"zero_optimization": {"stage": "3"}}
