"""What a first-time user meets on the command line: ``optimenv spec``, hints that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimenv.cli import main
from optimenv.config import load_config
from optimenv.plan import Hardware, plan
from optimenv.spec import build_spec, deepspeed_text, spec_text, verify_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert isinstance(info.value.code, int)
    return info.value.code, out, err


def test_spec_writes_what_the_configmaps_carry_with_the_local_deepspeed_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "new" / "folder"  # created, parents too
    code, out, err = _run(capsys, "spec", EXAMPLES / "zero3-gpu.yaml", "-o", out_dir, "--nodes", "1")
    assert (code, out) == (0, "")  # stdout carries data only: the files are the data
    ds_file = out_dir / "deepspeed.json"
    expected = build_spec(
        plan(load_config(EXAMPLES / "zero3-gpu.yaml"), Hardware(nodes=1), deepspeed_path=str(ds_file))
    )
    assert (out_dir / "spec.json").read_text() == spec_text(expected)
    assert verify_spec(json.loads((out_dir / "spec.json").read_text()))["deepspeedPath"] == str(ds_file)
    assert ds_file.read_text() == deepspeed_text(expected["deepspeed"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["deepspeed.json", "spec.json"]  # no temp files
    assert f"wrote {ds_file}, {out_dir / 'spec.json'}" in err
    assert f"optimenv-bootstrap --spec {out_dir / 'spec.json'} -- COMMAND" in err


def test_spec_without_deepspeed_writes_only_the_spec(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, _ = _run(capsys, "spec", EXAMPLES / "fsdp2-cpu.yaml", "-o", tmp_path)
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]
    assert json.loads((tmp_path / "spec.json").read_text())["deepspeed"] is None


def test_spec_replaces_old_files_whole_and_keeps_them_when_it_cannot_write(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "spec.json").write_text("an older spec")
    assert _run(capsys, "spec", EXAMPLES / "fsdp2-cpu.yaml", "-o", tmp_path)[0] == 0
    assert verify_spec(json.loads((tmp_path / "spec.json").read_text()))
    # A folder where spec.json should go: the write fails, nothing half-written is left behind.
    blocked = tmp_path / "blocked"
    (blocked / "spec.json").mkdir(parents=True)
    code, out, err = _run(capsys, "spec", EXAMPLES / "zero3-gpu.yaml", "-o", blocked)
    assert (code, out) == (1, "")
    assert (
        err.startswith(f"error: --out-dir: cannot write {blocked / 'spec.json'}: ") and err.count("\n") == 1
    )
    assert sorted(p.name for p in blocked.iterdir()) == ["deepspeed.json", "spec.json"]
    assert (blocked / "spec.json").is_dir()


def test_spec_refuses_a_bad_config_like_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("bf16: maybe\n")
    code, _, err = _run(capsys, "spec", bad, "-o", tmp_path / "out")
    assert code == 1 and err.startswith("error: bf16: ")
    assert not (tmp_path / "out").exists()  # nothing created for a refused config


def test_parallel_sizes_on_the_default_job_size_name_the_topology_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["render", EXAMPLES / "parallel-gpu.yaml", "--target", "pytorchjob", "--name", "a", "--image", "i"]
    code, out, err = _run(capsys, *args, "--", "python", "t.py")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith("error: dp_shard_size: the parallelism sizes multiply to 4, but Accelerate needs")
    assert "the job defaults to 1 node x 1 GPU: give its size with --nodes and --gpus-per-node" in err
    assert "whose product must be 4" in err
    # Following the hint works.
    assert _run(capsys, *args, "--nodes", "2", "--gpus-per-node", "2", "--", "python", "t.py")[0] == 0
    # A size the user gave is not second-guessed: the hint is about the config then.
    code, _, err = _run(capsys, *args, "--gpus-per-node", "3", "--", "python", "t.py")
    assert code == 1 and "--nodes" not in err and "the 3 processes" in err


def test_configmaps_target_warns_that_the_command_is_not_used(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", EXAMPLES / "fsdp2-gpu.yaml", "--target", "configmaps", "--name", "a"]
    code, with_command, err = _run(capsys, *args, "--", "python", "train.py")
    assert code == 0
    assert err.startswith("warning: --target configmaps renders no job, so the command after -- is not used")
    code, without, err = _run(capsys, *args)
    assert (code, err) == (0, "")
    assert with_command == without  # the same ConfigMaps either way
