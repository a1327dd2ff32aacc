"""Hostile and odd input found by fuzzing (issue 20): one line, exit 1, bounded time and memory.

Each row once gave a traceback, a message of a megabyte, a hang or gigabytes of memory. The rows
run through the CLI (validate and ``plan -o json``) and the Python API; the cases that need a
special file, a full disk or a memory cap run the installed console script in a child process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from optimenv.config import MAX_CONFIG_BYTES, load_config, parse_config, parse_yaml
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.limits import MAX_DEPTH, MAX_JSON_FILE_BYTES, MAX_TEXT_BYTES, MAX_VALUES
from optimenv.plan import plan
from tests.core.test_bad_input import Case, _assert_refused, _run, _write

HUGE_HEX = "0x" + "f" * 3600  # about 4,335 decimal digits: str() of it raises
OVER_64_BITS = "0x1" + "0" * 16  # 2^64
FSDP_SIZE_WRAP = "fsdp_config:\n  auto_wrap_policy: SIZE_BASED_WRAP\n  min_num_params: "
DS_INLINE = "deepspeed:\n  zero_optimization: {stage: 2}\n  train_batch_size: "
SCRIPT = Path(sys.executable).with_name("optimenv")
CAP = 512 * 1024 * 1024  # the chart's memory limit of the controller, applied to the CLI too

# (field the value goes into, config before the value, config after it)
INTEGER_FIELDS = [
    ("ddp_timeout", "ddp_timeout: ", ""),
    ("fsdp_config.min_num_params", FSDP_SIZE_WRAP, ""),
    ("gradient_accumulation_steps", "deepspeed: zero2\ngradient_accumulation_steps: ", ""),
    ("batch_size", "deepspeed: zero2\nbatch_size: ", ""),
    ("tensor_parallel_size", "tensor_parallel_size: ", ""),
    ("dp_shard_size", "dp_shard_size: ", ""),
    ("dp_replicate_size", "dp_replicate_size: ", ""),
    ("context_parallel_size", "context_parallel_size: ", ""),
    ("sequence_parallel_degree", "sequence_parallel_degree: ", ""),
    ("expert_parallel_size", "expert_parallel_size: ", ""),
    ("ray_num_workers", "ray_num_workers: ", ""),
    ("deepspeed.train_batch_size", DS_INLINE, ""),
    ("micro_batch_size", "micro_batch_size: ", ""),
]

CASES = [
    Case("int-5000-digits", "ddp_timeout: " + "1" * 5000 + "\n", "ddp_timeout", "out of range"),
    *(
        Case(f"huge-int-{field}", f"{before}{HUGE_HEX}{after}\n", field, "integers must lie between")
        for field, before, after in INTEGER_FIELDS
    ),
    *(
        Case(f"int-over-64-bits-{field}", f"{before}{OVER_64_BITS}{after}\n", field, "out of range")
        for field, before, after in INTEGER_FIELDS
    ),
    Case("quoted-int-over-64-bits", 'ddp_timeout: "' + "9" * 30 + '"\n', "ddp_timeout"),
    Case("quoted-fsdp-version-5000-digits", 'fsdp_version: "' + "1" * 5000 + '"\n', "fsdp_version"),
    Case(
        "quoted-zero-stage-5000-digits",
        'deepspeed:\n  zero_optimization: {stage: "' + "3" * 5000 + '"}\n',
        "deepspeed.zero_optimization.stage",
    ),
    Case(
        "sexagesimal-int",
        "ddp_timeout: 1" + ":59" * 200 + "\n",
        "ddp_timeout",
        "out of range",
    ),
    Case(
        "optimizer-list",
        "optimizer: [adamw_8bit]\nfsdp_version: 2\nfsdp_config: {offload_params: true}\n",
        "optimizer",
        "optimizer name",
    ),
    Case("optimizer-mapping", "optimizer: {name: adamw}\n", "optimizer", "optimizer name"),
    Case("top-level-bool-key", "true: 1\n", "config", "quote the key"),
    Case("top-level-int-key", "1: x\n", "config", "quote the key"),
    Case("long-value-echoed", "bf16: " + "x" * 1_000_000 + "\n", "bf16", "..."),
    Case(
        "long-fsdp-key",
        "fsdp_config:\n  ? " + "k" * 100_000 + "\n  : 1\n",
        "fsdp_config.'" + "k" * 56 + "...",
        "unknown key",
    ),
    Case(
        "class-name-escape",
        'fsdp_config:\n  transformer_layer_cls_to_wrap: "Llama\\e[31m"\n',
        "fsdp_config.transformer_layer_cls_to_wrap",
        "not a class name",
    ),
    Case(
        "many-small-values",
        "x: [" + ",".join(["1"] * 1_500_000) + "]\n",
        "config",
        f"has more than {MAX_VALUES:,} values",
    ),
    Case(
        "alias-amplification",
        'a: &a "' + "x" * 1_000_000 + '"\nb: [' + ",".join(["*a"] * 3000) + "]\n",
        "config",
        f"expands to more than {MAX_TEXT_BYTES:,} bytes of text (the alias *a at line 2",
    ),
    Case("alias-recursive", "a: &a [1, *a]\n", "a[1]", "refers to a node that holds it"),
    Case("nested-flow-100000", "a: " + "[" * 100_000 + "]" * 100_000 + "\n", "config", "nesting depth"),
    Case(
        "nested-block-100",
        "".join(f"{' ' * i}k{i}:\n" for i in range(100)) + " " * 100 + "leaf: 1\n",
        ".".join(f"k{i}" for i in range(MAX_DEPTH - 1)),
        f"nested deeper than {MAX_DEPTH} levels",
    ),
    Case(
        "deepspeed-file-nested",
        "deepspeed: ds.json\n",
        "deepspeed",
        f"nested deeper than {MAX_DEPTH} levels",
        files=(("ds.json", "[" * 100_000 + "]" * 100_000),),
    ),
    Case(
        "deepspeed-file-5000-digits",
        "deepspeed: ds.json\n",
        "deepspeed.train_batch_size",
        "out of range",
        files=(("ds.json", '{"zero_optimization": {"stage": 2}, "train_batch_size": ' + "7" * 5000 + "}"),),
    ),
    Case(
        "deepspeed-file-nan",
        "deepspeed: ds.json\n",
        "deepspeed",
        "NaN is not a JSON number",
        files=(("ds.json", '{"zero_optimization": {"stage": 2}, "gradient_clipping": NaN}'),),
    ),
    Case(
        "deepspeed-file-not-deepspeed",
        "deepspeed: creds.json\n",
        "deepspeed",
        "no zero_optimization mapping",
        files=(("creds.json", '{"auths": {"registry.example": {"auth": "c2VjcmV0"}}}'),),
    ),
    Case(
        "deepspeed-file-too-large",
        "deepspeed: big.json\n",
        "deepspeed",
        f"larger than the limit of {MAX_JSON_FILE_BYTES:,} bytes",
        files=(
            ("big.json", '{"zero_optimization": {"stage": 2}, "x": "' + "y" * MAX_JSON_FILE_BYTES + '"}'),
        ),
    ),
]
# Rows that are slow to build or parse three times over run once through the CLI.
_ONCE = {"many-small-values", "alias-amplification", "nested-flow-100000"}


def _refused_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err[:2000]
    assert "Traceback" not in err
    assert len(lines[0]) < 500, lines[0][:600]
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_refuses_with_one_short_line(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(_write(case, tmp_path))
    commands = [["plan", path, "-o", "json"]]
    if case.id not in _ONCE:
        commands.append(["validate", path])
    for argv in commands:
        code, out, err = _run(argv, capsys)
        _assert_refused(case, code, out, err)
        _refused_line(err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [c for c in CASES if c.id not in _ONCE], ids=lambda c: c.id)
def test_python_api_raises_one_line_config_error(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        plan(load_config(_write(case, tmp_path)))
    assert raised.value.field.startswith(case.field)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 500


def test_render_refuses_huge_ray_num_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ray.yaml"
    path.write_text(f"use_ray: true\nray_num_workers: {HUGE_HEX}\n")
    argv = [
        "render",
        str(path),
        "--target",
        "rayjob",
        "--name",
        "ft",
        "--image",
        "i:1",
        "--",
        "python",
        "t.py",
    ]
    code, out, err = _run(argv, capsys)
    assert (code, out) == (1, "")
    assert _refused_line(err).startswith("error: ray_num_workers: ")


def test_inline_deepspeed_huge_int_refused_by_validate_plan_and_render(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ds.yaml"
    path.write_text(f"{DS_INLINE}{HUGE_HEX}\n")
    for argv in (
        ["validate", str(path)],
        ["plan", str(path), "-o", "json"],
        ["render", str(path), "--target", "configmaps", "--name", "ft"],
    ):
        code, out, err = _run(argv, capsys)
        assert (code, out) == (1, ""), argv
        assert _refused_line(err).startswith("error: deepspeed.train_batch_size: "), argv


# ---- the Python API: data built in Python is held to the same bounds ------------------------------


def test_shared_references_count_as_what_they_repeat() -> None:
    big = "x" * 1_000_000
    with pytest.raises(ConfigError, match=r"holds more than [\d,]+ bytes of text"):
        parse_config({"notes": [big] * 3000})


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**5000], ids=["2^63", "-2^63-1", "10^5000"])
def test_python_ints_beyond_64_bits_are_refused(value: int) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"deepspeed": {"zero_optimization": {"stage": 2}, "x": [value]}})
    assert raised.value.field == "deepspeed.x[0]"
    assert len(str(raised.value)) < 200


def test_64_bit_extremes_are_accepted() -> None:
    config = parse_config({"ddp_timeout": 2**63 - 1, "seed": -(2**63)})
    assert plan(config).env_dict["AXOLOTL_NCCL_TIMEOUT"] == str(2**63 - 1)


def test_yaml_text_over_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(ConfigError, match="larger than the limit"):
        parse_yaml("#" * (MAX_CONFIG_BYTES + 1))


def test_message_of_any_error_is_capped() -> None:
    assert len(str(OptimEnvError("x" * 100_000))) <= 2000


# ---- files that are not regular files, and standard input ---------------------------------------


def _cli(
    *args: str, stdin: int | None = None, cwd: Path | None = None, stdout: int | None = None
) -> subprocess.CompletedProcess[str]:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    return subprocess.run(
        [str(SCRIPT), *args],
        stdin=stdin,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
        preexec_fn=cap,
    )


def _assert_cli_refused(done: subprocess.CompletedProcess[str], starts: str, says: str) -> None:
    assert done.returncode == 1, done.stderr[:2000]
    assert not done.stdout
    line = _refused_line(done.stderr)
    assert line.startswith(starts), line
    assert says in line, line


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_config_that_is_dev_zero_is_refused_unread() -> None:
    _assert_cli_refused(
        _cli("validate", "/dev/zero"), "error: config: ", "a character device, not a regular file"
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_config_that_is_a_fifo_without_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    _assert_cli_refused(_cli("validate", str(fifo)), "error: config: ", "a FIFO or pipe, not a regular file")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_config_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    _assert_cli_refused(_cli("validate", str(tmp_path)), "error: config: ", "")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_endless_standard_input_is_read_only_up_to_the_limit() -> None:
    with open("/dev/zero", "rb") as zero:
        done = _cli("validate", "-", stdin=zero.fileno())
    _assert_cli_refused(done, "error: config: standard input", f"limit of {MAX_CONFIG_BYTES:,} bytes")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sparse_six_gigabyte_deepspeed_file_is_refused_unread(tmp_path: Path) -> None:
    with open(tmp_path / "ds.json", "wb") as handle:
        handle.truncate(6 * 1024**3)  # sparse: no disk used, 6 GB to read
    (tmp_path / "cfg.yaml").write_text("deepspeed: ds.json\n")
    done = _cli("validate", "cfg.yaml", cwd=tmp_path)
    _assert_cli_refused(done, "error: deepspeed: ", f"larger than the limit of {MAX_JSON_FILE_BYTES:,} bytes")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_deepspeed_fifo_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ds.json")
    (tmp_path / "cfg.yaml").write_text("deepspeed: ds.json\n")
    _assert_cli_refused(
        _cli("validate", "cfg.yaml", cwd=tmp_path), "error: deepspeed: ", "not a regular file"
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_alias_amplification_stays_under_the_memory_cap(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text('a: &a "' + "x" * 1_000_000 + '"\nb: [' + ",".join(["*a"] * 3000) + "]\n")
    _assert_cli_refused(_cli("validate", str(path)), "error: config: ", "expands to more than")


# ---- stdout ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_full_disk_on_stdout_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("deepspeed: zero2\n")
    with open("/dev/full", "w") as full:
        done = _cli("plan", "cfg.yaml", "-o", "json", cwd=tmp_path, stdout=full.fileno())
    assert done.returncode == 1
    assert _refused_line(done.stderr) == "error: cannot write the output: No space left on device"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_env_output_is_written_as_planned_when_piped(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("deepspeed: zero2\n")
    path = "/etc/\x1b[31mds.json"
    as_json = _cli("plan", "cfg.yaml", "-o", "json", "--deepspeed-path", path, cwd=tmp_path)
    as_env = _cli("plan", "cfg.yaml", "-o", "env", "--deepspeed-path", path, cwd=tmp_path)
    assert as_json.returncode == as_env.returncode == 0, as_env.stderr
    planned = json.loads(as_json.stdout)["env"]["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    assert planned == path
    assert f"ACCELERATE_DEEPSPEED_CONFIG_FILE='{path}'" in as_env.stdout.splitlines()


def test_torch_version_with_a_trailing_newline_is_refused() -> None:
    from optimenv.plan import Hardware

    with pytest.raises(ConfigError) as raised:
        Hardware(torch_version="2.6.0\n")
    assert raised.value.field == "hardware.torch_version"
