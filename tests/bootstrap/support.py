"""Helpers for the bootstrap tests: specs planned from real configs, clean child environments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimenv.config import parse_config
from optimenv.plan import Hardware, plan
from optimenv.spec import Policy, build_spec, deepspeed_text, spec_text

BIN = Path(sys.executable).parent
ZERO3 = {"base_model": "m", "deepspeed": "zero3", "gradient_accumulation_steps": 4}
ZERO2_COMPILE = {
    "base_model": "m",
    "deepspeed": "zero2",
    "gradient_accumulation_steps": 2,
    "torch_compile": "auto",
}
FSDP2 = {
    "base_model": "m",
    "bf16": True,
    "fsdp_version": 2,
    "fsdp_config": {
        "offload_params": True,
        "state_dict_type": "SHARDED_STATE_DICT",
        "reshard_after_forward": True,
    },
}


@dataclass(frozen=True)
class SpecFiles:
    spec: Path
    deepspeed: Path | None
    doc: dict[str, Any]


MakeSpec = Callable[..., SpecFiles]


def spec_maker(folder: Path) -> MakeSpec:
    """``make(config, hardware=, policy=, deepspeed_path=, write_deepspeed=)``: spec.json (+ the JSON)."""

    def make(
        config: dict[str, Any],
        *,
        hardware: Hardware | None = None,
        policy: Policy = "plan-wins",
        deepspeed_path: str | None = None,
        write_deepspeed: bool = True,
        name: str = "spec.json",
    ) -> SpecFiles:
        ds_path = deepspeed_path or str(folder / "deepspeed.json")
        doc = build_spec(
            plan(parse_config(config), hardware or Hardware(), deepspeed_path=ds_path), policy=policy
        )
        spec = folder / name
        spec.write_text(spec_text(doc), encoding="utf-8")
        ds = None
        if doc["deepspeed"] is not None:
            ds = Path(ds_path)
            if write_deepspeed:
                ds.write_text(deepspeed_text(doc["deepspeed"]), encoding="utf-8")
        return SpecFiles(spec, ds, doc)

    return make


def clean_env(**extra: str) -> dict[str, str]:
    """A child environment with nothing of the test process's training variables in it."""
    keep = (
        "PATH",
        "HOME",
        "TMPDIR",
        "TORCH_EXTENSIONS_DIR",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "RAY_AUTH_MODE",
    )
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run(
    args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env or clean_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def bootstrap(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed ``optimenv-bootstrap`` console script."""
    return run([str(BIN / "optimenv-bootstrap"), *args], env=env, cwd=cwd)


PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def child_env(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout)
    assert isinstance(env, dict)
    return env


def ray_launch(
    spec: Path, folder: Path, script: Path, *script_args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``optimenv ray-launch`` with 2 CPU workers, results and ``report.json`` kept in ``folder``."""
    return run(
        [
            str(BIN / "optimenv"),
            "ray-launch",
            "--spec",
            str(spec),
            "--workers",
            "2",
            "--cpu",
            "--storage-path",
            str(folder / "ray_results"),
            "--report",
            str(folder / "report.json"),
            "--progress",
            "--",
            str(script),
            *script_args,
        ],
        env=env,
        cwd=folder,
        timeout=280,
    )
