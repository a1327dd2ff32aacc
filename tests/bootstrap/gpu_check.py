"""The GPU branches of the deferred steps, on a real GPU host (run by hand through the device tool).

    PYTHONPATH=service python tests/bootstrap/gpu_check.py

Needs only torch and accelerate (no pydantic: the spec is built from a Plan directly). Prints one
JSON document: exec mode's child environment and in-process decisions, with all GPUs visible and
with one. Not collected by pytest (the CI machine has no GPU). Expected on a 2 x H100 host:
bf16 and INDUCTOR set, fp8 accepted (compute capability 9.0), P2P supported (nothing set); with one
GPU visible, the single-GPU rendezvous defaults set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from optimenv.plan import EnvVar, Plan
from optimenv.spec import build_spec, spec_text
from optimenv.steps import (
    SINGLE_GPU_DEFAULTS,
    Bf16Auto,
    NcclP2PCheck,
    RequireFp8,
    SingleGpuRendezvousDefaults,
    TorchCompileAuto,
)

DEFERRED = (
    NcclP2PCheck(),
    Bf16Auto(otherwise="no"),
    RequireFp8(),
    SingleGpuRendezvousDefaults(),
    TorchCompileAuto("INDUCTOR"),
)
KEYS = ("NCCL_P2P_DISABLE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", *SINGLE_GPU_DEFAULTS)


def main() -> None:
    plan = Plan(
        env=(EnvVar("ACCELERATE_USE_FSDP", "true", "fsdp_config"),),
        deepspeed=None,
        deepspeed_path=None,
        zero_stage=None,
        deferred=DEFERRED,
        warnings=(),
    )
    spec = Path(tempfile.mkdtemp()) / "spec.json"
    spec.write_text(spec_text(build_spec(plan)))
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    out: dict[str, object] = {}
    for label, visible in (("all_gpus", None), ("one_gpu", "0")):
        env = dict(base)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "optimenv.bootstrap",
                "--spec",
                str(spec),
                "--",
                sys.executable,
                "-c",
                f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}}))",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        code = (
            "import json, optimenv.bootstrap as b\n"
            f"a = b.apply({str(spec)!r}, environ={{}})\n"
            "print(json.dumps(a.to_dict()['decisions']))"
        )
        decisions = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        out[label] = {
            "exec_rc": child.returncode,
            "exec_env": json.loads(child.stdout) if child.returncode == 0 else None,
            "stderr": child.stderr.strip(),
            "decisions": json.loads(decisions.stdout)
            if decisions.returncode == 0
            else decisions.stderr[-500:],
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
