"""Exec mode: ``optimenv-bootstrap --spec PATH -- COMMAND`` applies the spec, then becomes COMMAND."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from optimenv.bootstrap import _apply
from optimenv.spec import SpecError
from tests.bootstrap.support import FSDP2, PRINT_ENV, ZERO3, MakeSpec, bootstrap, child_env, clean_env

pytestmark = pytest.mark.slow


def _one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""  # the command never ran
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("optimenv-bootstrap: error: ")
    return lines[0]


def test_the_command_sees_the_planned_env(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    result = bootstrap("--spec", str(files.spec), "--", *PRINT_ENV)
    env = child_env(result)
    for entry in files.doc["env"]:
        assert env[entry["name"]] == entry["value"]
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(files.deepspeed)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    # Deferred steps decided here, on a machine without a GPU: bf16 "auto" -> no, no P2P to
    # disable, no single-GPU rendezvous defaults.
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert env["ACCELERATE_USE_CPU"] == "true"  # no GPU: torchrun's processes join one gloo group
    assert "NCCL_P2P_DISABLE" not in env
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["OPTIMENV_SPEC"] == str(files.spec)
    summary = result.stderr.splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"optimenv-bootstrap: spec {files.doc['hash'][:15]}")
    assert "7 set" in summary[0] and "bf16_auto: ACCELERATE_MIXED_PRECISION=no" in summary[0]


def test_exec_replaces_the_process_so_signals_and_exit_codes_pass_through(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    files = make_spec(FSDP2)
    script = "import os, sys; print(os.getpid(), flush=True); os.kill(os.getpid(), 15)"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optimenv-bootstrap"),
            "--spec",
            str(files.spec),
            "--",
            sys.executable,
            "-c",
            script,
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    assert int(out.strip()) == proc.pid  # the same process: exec, not a child
    assert proc.returncode == -15  # killed by SIGTERM, as the command was
    result = bootstrap("-q", "--spec", str(files.spec), "--", sys.executable, "-c", "import sys; sys.exit(7)")
    assert result.returncode == 7
    assert result.stderr == ""  # --quiet


def test_rendezvous_variables_are_never_touched(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    rendezvous = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "23456",
        "PET_NNODES": "2",
    }
    env = child_env(bootstrap("--spec", str(files.spec), "--", *PRINT_ENV, env=clean_env(**rendezvous)))
    assert {k: env[k] for k in rendezvous} == rendezvous


def test_a_variable_already_equal_is_kept(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    result = bootstrap(
        "--spec",
        str(files.spec),
        "--",
        *PRINT_ENV,
        env=clean_env(ACCELERATE_USE_DEEPSPEED="true", NCCL_P2P_DISABLE="0"),
    )
    env = child_env(result)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["NCCL_P2P_DISABLE"] == "0"  # set by the operator: the P2P step leaves it alone
    assert "6 set" in result.stderr and "1 kept (ACCELERATE_USE_DEEPSPEED)" in result.stderr


def test_conflict_names_both_values_and_their_sources(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    result = bootstrap(
        "--spec", str(files.spec), "--", *PRINT_ENV, env=clean_env(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="8")
    )
    line = _one_error_line(result)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS='8' from the environment" in line
    assert "the plan sets '4' from gradient_accumulation_steps" in line
    assert "user-wins" in line


def test_user_wins_policy_keeps_the_environment_value(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3, policy="user-wins")
    result = bootstrap(
        "--spec", str(files.spec), "--", *PRINT_ENV, env=clean_env(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="8")
    )
    env = child_env(result)
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "8"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert "(user-wins)" in result.stderr and "kept (ACCELERATE_GRADIENT_ACCUMULATION_STEPS)" in result.stderr


def test_a_default_never_conflicts(make_spec: MakeSpec) -> None:
    files = make_spec({**FSDP2, "ddp_timeout": 3600})
    entry = next(e for e in files.doc["env"] if e["name"] == "AXOLOTL_NCCL_TIMEOUT")
    assert entry["mode"] == "default"
    env = child_env(
        bootstrap("--spec", str(files.spec), "--", *PRINT_ENV, env=clean_env(AXOLOTL_NCCL_TIMEOUT="60"))
    )
    assert env["AXOLOTL_NCCL_TIMEOUT"] == "60"
    assert env["FSDP_VERSION"] == "2"


def test_spec_from_optimenv_spec_variable(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    env = child_env(bootstrap("--", *PRINT_ENV, env=clean_env(OPTIMENV_SPEC=str(files.spec))))
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"


# --- refusals: one line on stderr, exit 1, the command never runs ---------------------------------


def test_missing_spec(tmp_path: Path) -> None:
    line = _one_error_line(
        bootstrap("--", *PRINT_ENV, env=clean_env(OPTIMENV_SPEC=str(tmp_path / "nope.json")))
    )
    assert f"no worker spec at {tmp_path / 'nope.json'} (from $OPTIMENV_SPEC)" in line


def test_missing_spec_at_the_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default pointed into an empty directory: whatever this machine has in /etc plays no part.
    default = tmp_path / "spec.json"
    monkeypatch.setattr(_apply, "SPEC_PATH", str(default))
    with pytest.raises(SpecError) as refused:
        _apply.load_spec(None, {})
    assert f"no worker spec at {default} (from the default location)" in str(refused.value)
    assert f"mount the spec ConfigMap rendered by optimenv at {default}" in str(refused.value)


def test_bad_hash(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    doc = json.loads(files.spec.read_text())
    doc["env"][2]["value"] = "16"  # hand-edited after rendering
    files.spec.write_text(json.dumps(doc))
    line = _one_error_line(bootstrap("--spec", str(files.spec), "--", *PRINT_ENV))
    assert "content hash mismatch" in line and "render it again" in line


def test_spec_that_is_not_json(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"apiVersion": ')
    line = _one_error_line(bootstrap("--spec", str(spec), "--", *PRINT_ENV))
    assert f"{spec} is not valid JSON (line 1 column" in line


def test_missing_deepspeed_json(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3, write_deepspeed=False)
    line = _one_error_line(bootstrap("--spec", str(files.spec), "--", *PRINT_ENV))
    assert f"DeepSpeed JSON is missing at {files.deepspeed}" in line


def test_corrupt_deepspeed_json(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    assert files.deepspeed is not None
    files.deepspeed.write_text(files.deepspeed.read_text()[:40])
    line = _one_error_line(bootstrap("--spec", str(files.spec), "--", *PRINT_ENV))
    assert f"{files.deepspeed} is not valid JSON" in line


def test_deepspeed_json_that_differs_from_the_plan(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    assert files.deepspeed is not None
    stale = json.loads(files.deepspeed.read_text())
    stale["zero_optimization"]["stage"] = 2
    files.deepspeed.write_text(json.dumps(stale))
    line = _one_error_line(bootstrap("--spec", str(files.spec), "--", *PRINT_ENV))
    assert "differs from the plan at zero_optimization.stage (file has 2, the plan has 3)" in line


def test_command_not_found_is_127_and_not_executable_is_126(make_spec: MakeSpec, tmp_path: Path) -> None:
    files = make_spec(FSDP2)
    result = bootstrap("-q", "--spec", str(files.spec), "--", "optimenv-no-such-command", "x")
    assert _one_error_line(result, 127).endswith("optimenv-no-such-command: command not found")
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program\n")
    result = bootstrap("-q", "--spec", str(files.spec), "--", str(plain))
    assert "permission denied" in _one_error_line(result, 126)


def test_usage_errors_exit_2(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    assert "no command to run" in bootstrap("--spec", str(files.spec)).stderr
    assert bootstrap("--spec", str(files.spec)).returncode == 2
    result = bootstrap("--nope", "--", "true")
    assert result.returncode == 2 and "unknown option --nope" in result.stderr
