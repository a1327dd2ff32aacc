"""The ``optimenv`` command line: output formats, stdin, exit codes, hardware options, the README."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optimenv.config import load_config
from optimenv.deepspeed import preset
from optimenv.plan import Hardware, plan

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
ZERO3 = EXAMPLES / "zero3-gpu.yaml"
FSDP2_CPU = EXAMPLES / "fsdp2-cpu.yaml"
LEGACY = "fsdp: [full_shard, auto_wrap]\nbf16: true\n"


def test_json_has_exactly_the_documented_shape(cli: Any) -> None:
    run = cli("plan", ZERO3, "-o", "json", "--nodes", "2", "--gpus-per-node", "8")
    assert run.code == 0 and run.err == ""
    doc = run.json()
    assert list(doc) == ["env", "sources", "deferred", "deepspeed", "warnings"]
    assert doc["env"] == {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/etc/optimenv/deepspeed.json",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    assert list(doc["sources"]) == list(doc["env"])
    assert doc["sources"]["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "gradient_accumulation_steps"
    assert doc["sources"]["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for step in doc["deferred"]:
        assert list(step) == ["kind", "variable", "source", "detail"]
        assert isinstance(step["detail"], dict)
    assert [s["kind"] for s in doc["deferred"]] == ["nccl_p2p_check", "deepspeed_zero3_config"]
    assert doc["deferred"][1]["detail"] == {}  # the file is ACCELERATE_DEEPSPEED_CONFIG_FILE
    assert doc["deepspeed"] == preset("zero3")
    assert doc["warnings"] == []
    # The very document the Python API gives for the same file and hardware.
    api = plan(load_config(ZERO3), Hardware(nodes=2, gpus_per_node=8))
    assert doc == api.to_dict()
    assert run.out == api.to_json()


def test_json_for_fsdp_has_null_deepspeed(cli: Any) -> None:
    doc = cli("plan", FSDP2_CPU, "-o", "json").json()
    assert doc["deepspeed"] is None
    assert doc["env"]["FSDP_VERSION"] == "2"
    assert doc["sources"]["FSDP_VERSION"] == "fsdp_version"


def test_env_lines_read_back_as_the_planned_env(cli: Any) -> None:
    path = "/etc/my ds.json"  # a value that needs shell quoting
    run = cli("plan", ZERO3, "-o", "env", "--deepspeed-path", path)
    assert run.code == 0
    lines = [line for line in run.out.splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", line) for line in lines), lines
    assert "ACCELERATE_DEEPSPEED_CONFIG_FILE='/etc/my ds.json'" in lines
    parsed = dict(shlex.split(line)[0].split("=", 1) for line in lines)
    assert parsed == plan(load_config(ZERO3), deepspeed_path=path).env_dict


def test_env_lists_what_the_worker_decides_as_comments(cli: Any) -> None:
    run = cli("plan", FSDP2_CPU, "-o", "env")
    comments = [line for line in run.out.splitlines() if line.startswith("#")]
    assert comments == [
        "# decided on the worker: NCCL_P2P_DISABLE (nccl_p2p_check, from default)",
        "# decided on the worker: ACCELERATE_MIXED_PRECISION (bf16_auto, from bf16)",
    ]
    zero3 = cli("plan", ZERO3, "-o", "env").out.splitlines()
    assert "# decided on the worker: single_gpu_rendezvous_defaults (from deepspeed)" in zero3


@pytest.mark.slow
def test_env_output_sources_in_a_real_shell(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("optimenv")
    planned = subprocess.run(
        [str(script), "plan", str(ZERO3), "-o", "env", "--deepspeed-path", "/etc/it's here.json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (tmp_path / "plan.env").write_text(planned)
    shown = subprocess.run(
        ["sh", "-c", 'set -a; . ./plan.env; printf %s "$ACCELERATE_DEEPSPEED_CONFIG_FILE"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert shown == "/etc/it's here.json"


def test_table_shows_value_and_source(cli: Any) -> None:
    run = cli("plan", FSDP2_CPU)
    assert run.code == 0
    rows = [re.split(r"\s{2,}", line) for line in run.out.splitlines()]
    assert rows[0] == ["VARIABLE", "VALUE", "SOURCE"]
    result = plan(load_config(FSDP2_CPU))
    expected = [[v.name, v.value, v.source] for v in result.env]
    expected += [[d.variable or "-", f"<decided on the worker: {d.kind}>", d.source] for d in result.deferred]
    assert rows[1:] == expected
    assert ["ACCELERATE_MIXED_PRECISION", "<decided on the worker: bf16_auto>", "bf16"] in rows


def test_yaml_is_the_json_document(cli: Any) -> None:
    import yaml

    for config in (ZERO3, FSDP2_CPU):
        as_yaml = cli("plan", config, "-o", "yaml")
        assert as_yaml.code == 0 and as_yaml.err == ""
        assert yaml.safe_load(as_yaml.out) == cli("plan", config, "-o", "json").json()


def test_config_from_stdin(cli: Any) -> None:
    from_file = cli("plan", ZERO3, "-o", "json")
    from_stdin = cli("plan", "-", "-o", "json", stdin=ZERO3.read_text())
    assert from_stdin.code == 0
    assert from_stdin.out == from_file.out
    assert cli("validate", "-", stdin=ZERO3.read_text()).code == 0


def test_validate_exit_codes(cli: Any, tmp_path: Path) -> None:
    valid = cli("validate", ZERO3)
    assert (valid.code, valid.out) == (0, "")
    assert valid.err == f"{ZERO3}: valid\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("fsdp_config:\n  reshard_after_foward: true\n")
    refused = cli("validate", bad)
    assert (refused.code, refused.out) == (1, "")
    assert refused.err.startswith("error: fsdp_config.reshard_after_foward: unknown key")
    assert cli("validate", tmp_path / "absent.yaml").code == 1
    # A contradiction no hardware can resolve is refused by validate too, not only by plan.
    bad.write_text("bf16: true\ndeepspeed:\n  zero_optimization: {stage: 2}\n  fp16: {enabled: true}\n")
    assert cli("validate", bad).err.startswith("error: deepspeed.fp16.enabled: ")


def test_usage_errors_exit_2_with_one_line_and_the_help_to_read(cli: Any) -> None:
    for argv, help_of in (
        (["plan"], "optimenv plan"),
        (["plan", ZERO3, "-o", "xml"], "optimenv plan"),
        (["nosuchcommand"], "optimenv"),
        (["explain", ZERO3], "optimenv"),  # the old alias of plan is gone
        (["plan", ZERO3, "--gpus-per-node", "x"], "optimenv plan"),
        (["render", ZERO3, "--name", "a"], "optimenv render"),
    ):
        run = cli(*argv)
        assert (run.code, run.out) == (2, ""), argv
        assert run.err.startswith("error: ") and run.err.count("\n") == 1, run.err
        assert run.err.endswith(f" (see {help_of} --help)\n"), run.err
    # Invalid input, as opposed to an invalid command line, is 1 (test_validate_exit_codes).
    assert cli("plan", "-", stdin="bf16: maybe\n").code == 1
    no_args = cli()
    assert no_args.code == 2 and no_args.err.startswith("Usage: optimenv ")
    assert cli("--help").code == 0


def test_version(cli: Any) -> None:
    from importlib.metadata import version

    for flag in ("-V", "--version"):
        run = cli(flag)
        assert (run.code, run.out) == (0, f"optimenv, version {version('optimenv')}\n")


@pytest.mark.parametrize("output", ["table", "json", "env"])
def test_stdout_is_data_and_warnings_go_to_stderr(cli: Any, output: str) -> None:
    run = cli("plan", "-", "-o", output, stdin=LEGACY)
    assert run.code == 0
    warnings = plan(load_config("-", text=LEGACY)).warnings
    assert warnings, "this config is expected to warn"
    assert run.err.splitlines() == [f"warning: {w}" for w in warnings]
    assert "warning: " not in run.out
    if output == "json":
        assert run.json()["warnings"] == list(warnings)


def test_hardware_options_change_the_plan(cli: Any) -> None:
    unknown = cli("plan", FSDP2_CPU, "-o", "json").json()
    assert "ACCELERATE_MIXED_PRECISION" not in unknown["env"]
    [bf16] = [d for d in unknown["deferred"] if d["kind"] == "bf16_auto"]
    assert bf16["detail"] == {"if_supported": "bf16", "otherwise": "fp16", "without_gpu": "no"}

    yes = cli("plan", FSDP2_CPU, "-o", "json", "--bf16-supported", "yes").json()
    assert yes["env"]["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert all(d["kind"] != "bf16_auto" for d in yes["deferred"])
    # GPUs without bf16: Axolotl's resolve_dtype turns fp16 on (C14).
    no = cli("plan", FSDP2_CPU, "-o", "json", "--bf16-supported", "no").json()
    assert no["env"]["ACCELERATE_MIXED_PRECISION"] == "fp16"

    def rendezvous(*options: str) -> bool:
        doc = cli("plan", ZERO3, "-o", "json", *options).json()
        return any(d["kind"] == "single_gpu_rendezvous_defaults" for d in doc["deferred"])

    # Single-GPU rendezvous defaults are left to the worker unless more than one GPU is known.
    assert rendezvous()
    assert rendezvous("--nodes", "1", "--gpus-per-node", "1")
    assert rendezvous("--nodes", "2")  # GPUs per node unknown: still undecided
    assert not rendezvous("--nodes", "2", "--gpus-per-node", "8")
    assert not rendezvous("--nodes", "1", "--gpus-per-node", "2")

    parallel = EXAMPLES / "parallel-gpu.yaml"
    assert cli("plan", parallel, "--nodes", "1", "--gpus-per-node", "4").code == 0
    refused = cli("plan", parallel, "--nodes", "1", "--gpus-per-node", "6")
    assert refused.code == 1 and "multiply to 4, which does not divide the 6 processes" in refused.err
    # 4 divides 8, but Accelerate needs exactly 4 processes (C28); both sizes are written, so the
    # hint proposes no value for either (C29: hints never override what the user wrote).
    refused = cli("plan", parallel, "--nodes", "2", "--gpus-per-node", "4")
    assert refused.code == 1 and "multiply to 4, but Accelerate needs them to equal the 8" in refused.err
    assert "(change the sizes you wrote (dp_shard_size 2 x dp_replicate_size 2)" in refused.err


def _readme_sample() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    match = re.search(r"```text\n\$ (optimenv plan [^\n]+)\n(.*?)```", text, re.S)
    assert match, "README.md lost its plan sample"
    return match.group(1), match.group(2)


def test_readme_sample_is_the_real_output(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    command, shown = _readme_sample()
    assert command == "optimenv plan examples/zero3-gpu.yaml"
    monkeypatch.chdir(REPO)
    run = cli(*shlex.split(command)[1:])
    assert run.code == 0 and run.err == ""
    assert run.out == shown


def test_readme_gives_the_two_setup_commands_ci_runs() -> None:
    text = (REPO / "README.md").read_text()
    setup = re.findall(r"```sh setup\n(python3 -m venv \.venv && [^\n]+)\n```", text)
    assert len(setup) == 2, setup
    venv = "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e "
    # The main job installs only what run needs; tests/run runs this very command.
    run_install = f"{venv}'.[run]' && "
    assert setup[0].startswith(run_install)
    assert setup[0].removeprefix(run_install).startswith(".venv/bin/optimenv run examples/")
    # The test command installs the development set, and is what CI runs.
    test_install = f"{venv}'.[dev]' && "
    assert setup[1] == f"{test_install}make test"
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -c constraints.txt -e '.[dev]'" in ci and "\nmake test\n" in ci
