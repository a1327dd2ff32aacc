"""In-process mode: ``python -m optimenv.bootstrap run SCRIPT`` and ``apply()`` inside a script.

The script runs in the bootstrap's process, so transformers' ZeRO-3 config the bootstrap holds is
the one ``from_pretrained`` would see. On CPU, Accelerate builds the DeepSpeed plugin from env in a
single process (it only refuses to shard); the test asserts what it builds and what it parsed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.bootstrap.support import FSDP2, ZERO3, MakeSpec, clean_env, run

pytestmark = pytest.mark.slow

TRAIN = """\
import json, sys
import transformers.integrations.deepspeed as hf_ds
import optimenv.bootstrap

before = hf_ds.is_deepspeed_zero3_enabled()
held = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
# apply() at the top of a script, as users write it: a no-op returning the bootstrap's record.
applied = optimenv.bootstrap.apply()

from accelerate import Accelerator
from accelerate.state import AcceleratorState

accelerator = Accelerator()
state = AcceleratorState()
plugin = state.deepspeed_plugin
print(json.dumps({
    "argv": sys.argv,
    "name": __name__,
    "zero3_before_accelerate": before,
    "held_is_bootstraps": held is not None and held is applied.zero3_config,
    "assigned": len(applied.assigned),
    "distributed_type": state.distributed_type.value,
    "num_processes": state.num_processes,
    "mixed_precision": state.mixed_precision,
    "zero_stage": plugin.zero_stage if plugin else None,
    "zero3_init_flag": plugin.zero3_init_flag if plugin else None,
    "gradient_accumulation_steps": plugin.gradient_accumulation_steps if plugin else None,
    "bf16_enabled": plugin.deepspeed_config["bf16"]["enabled"] if plugin else None,
    "zero3_after_accelerate": hf_ds.is_deepspeed_zero3_enabled(),
}))
"""


@pytest.fixture
def train_script(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    return script


@pytest.mark.timeout(180)
def test_run_holds_zero3_config_and_accelerate_builds_the_planned_deepspeed_plugin(
    make_spec: MakeSpec, train_script: Path
) -> None:
    files = make_spec(ZERO3)
    result = run(
        [
            sys.executable,
            "-m",
            "optimenv.bootstrap",
            "run",
            "--spec",
            str(files.spec),
            str(train_script),
            "--lr",
            "1e-4",
        ]
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["argv"] == [str(train_script), "--lr", "1e-4"]
    assert out["name"] == "__main__"
    assert out["zero3_before_accelerate"] is True
    assert out["held_is_bootstraps"] is True
    assert out["assigned"] == 6
    # What Accelerate 1.15 builds on a CPU host from the planned env (machine-notes.md).
    assert out["distributed_type"] == "DEEPSPEED"
    assert out["num_processes"] == 1
    assert out["mixed_precision"] == "no"
    assert out["zero_stage"] == 3
    assert out["zero3_init_flag"] is True
    assert out["gradient_accumulation_steps"] == 4
    assert out["bf16_enabled"] is False
    assert out["zero3_after_accelerate"] is True
    assert result.stderr.startswith("optimenv-bootstrap: spec ")

    # Control: the same variables without the bootstrap, and nothing holds the ZeRO-3 config.
    env = clean_env(**{e["name"]: e["value"] for e in files.doc["env"]}, OPTIMENV_SPEC=str(files.spec))
    env["ACCELERATE_MIXED_PRECISION"] = "no"
    control = run([sys.executable, str(train_script)], env=env)
    assert control.returncode == 0, control.stderr
    assert json.loads(control.stdout)["zero3_before_accelerate"] is False


def test_refuses_when_accelerate_state_already_exists(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    code = (
        "import sys\n"
        "from accelerate import PartialState\n"
        "PartialState(cpu=True)\n"
        "import optimenv.bootstrap\n"
        "from optimenv.errors import OptimEnvError\n"
        "try:\n"
        f"    optimenv.bootstrap.apply({str(files.spec)!r})\n"
        "except OptimEnvError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(1)\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("accelerate: PartialState is already initialised in this process")
    assert "call optimenv.bootstrap.apply() before" in result.stdout


def test_run_passes_the_scripts_exit_code_and_refuses_like_exec_mode(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    files = make_spec(FSDP2)
    script = tmp_path / "exit5.py"
    script.write_text("import os, sys\nassert os.environ['FSDP_VERSION'] == '2'\nsys.exit(5)\n")
    base = [sys.executable, "-m", "optimenv.bootstrap", "run", "-q", "--spec", str(files.spec)]
    assert run([*base, str(script)]).returncode == 5
    missing = run([*base, str(tmp_path / "nope.py")])
    assert missing.returncode == 2 and "nope.py: no such file" in missing.stderr
    conflict = run([*base, str(script)], env=clean_env(FSDP_VERSION="1"))
    assert conflict.returncode == 1
    assert conflict.stderr.startswith("optimenv-bootstrap: error: conflict: FSDP_VERSION='1'")
    module = run([*base, "-m", "calendar", "2026", "1"])
    assert module.returncode == 0 and "January 2026" in module.stdout
