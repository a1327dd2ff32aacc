"""Bad input through the real CLI: exit 1, one ``error: <field>: …`` line on stderr, nothing else.

Every row is a config (or option) that must be refused, the dotted field path the message must
start with, and optionally a phrase that tells the user how to fix it. Rows that only fail once the
hardware is known run ``plan`` with options; the others run both ``validate`` and ``plan``. The same
rows through the Python API raise :class:`ConfigError` with ``.field`` set.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from optimenv.cli import hardware_from, main
from optimenv.config import MAX_CONFIG_BYTES, load_config
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import plan

FSDP2 = "fsdp_version: 2\nfsdp_config:\n  auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"


@dataclass(frozen=True)
class Case:
    id: str
    config: str | bytes | None  # None: the file does not exist
    field: str
    says: str = ""  # a phrase the message must contain (the fix, or what was wrong)
    options: tuple[str, ...] = ()  # plan options; a row with options only fails in ``plan``
    files: tuple[tuple[str, str | bytes], ...] = ()  # extra files beside the config

    @property
    def needs_hardware(self) -> bool:
        return any(o.startswith("--") for o in self.options)


CASES = [
    # ---- wrong types and ranges -----------------------------------------------------------------
    Case("bf16-not-bool", "bf16: maybe\n", "bf16"),
    Case("fp16-string", "fp16: yes please\n", "fp16"),
    Case(
        "gas-zero",
        "gradient_accumulation_steps: 0\n",
        "gradient_accumulation_steps",
        "greater than or equal to 1",
    ),
    Case("gas-word", "gradient_accumulation_steps: four\n", "gradient_accumulation_steps"),
    Case("gas-null", "gradient_accumulation_steps: null\n", "gradient_accumulation_steps", "set one"),
    Case("micro-negative", "micro_batch_size: -1\n", "micro_batch_size"),
    Case("tp-float", "tensor_parallel_size: 1.5\n", "tensor_parallel_size"),
    Case("use-ray-word", "use_ray: sometimes\n", "use_ray"),
    Case("resources-not-mapping", "resources_per_worker: lots\n", "resources_per_worker"),
    Case("deepspeed-number", "deepspeed: 3\n", "deepspeed"),
    Case(
        "torch-compile-backend",
        "torch_compile: true\ntorch_compile_backend: turbo\n",
        "torch_compile_backend",
    ),
    # ---- fsdp_config keys and values --------------------------------------------------------------
    Case(
        "fsdp-typo",
        FSDP2 + "  reshard_after_foward: true\n",
        "fsdp_config.reshard_after_foward",
        "did you mean 'reshard_after_forward'",
    ),
    Case(
        "fsdp-prefixed-typo",
        "fsdp_config:\n  fsdp_offload_parms: true\n",
        "fsdp_config.fsdp_offload_parms",
        "did you mean 'offload_params'",
    ),
    Case("fsdp-policy", "fsdp_config:\n  auto_wrap_policy: LAYER_WRAP\n", "fsdp_config.auto_wrap_policy"),
    Case("fsdp-state-dict", "fsdp_config:\n  state_dict_type: FULL\n", "fsdp_config.state_dict_type"),
    Case("fsdp-strategy-number", "fsdp_config:\n  sharding_strategy: 7\n", "fsdp_config.sharding_strategy"),
    Case("fsdp-prefetch", "fsdp_config:\n  backward_prefetch: SOMETIMES\n", "fsdp_config.backward_prefetch"),
    Case("fsdp-min-params", "fsdp_config:\n  min_num_params: 0\n", "fsdp_config.min_num_params"),
    Case(
        "fsdp-size-wrap-no-min",
        "fsdp_config:\n  auto_wrap_policy: SIZE_BASED_WRAP\n",
        "fsdp_config.min_num_params",
    ),
    Case(
        "fsdp-classes-empty",
        "fsdp_config:\n  transformer_layer_cls_to_wrap: 'A,,B'\n",
        "fsdp_config.transformer_layer_cls_to_wrap",
        "non-empty",
    ),
    Case("fsdp-config-list", "fsdp_config: [offload_params]\n", "fsdp_config"),
    Case("fsdp-key-not-string", "fsdp_config:\n  1: true\n", "fsdp_config"),
    Case(
        "fsdp-two-spellings",
        "fsdp_config:\n  fsdp_offload_params: true\n  offload_params: false\n",
        "fsdp_config.offload_params",
        "keep one",
    ),
    Case("fsdp-legacy-item", "fsdp: [full_shard, auto_wrapp]\n", "fsdp", "did you mean 'auto_wrap'"),
    Case(
        "fsdp2-hybrid",
        FSDP2 + "  sharding_strategy: HYBRID_SHARD\n",
        "fsdp_config.sharding_strategy",
        "dp_replicate_size",
    ),
    Case(
        "fsdp-reshard-contradiction",
        FSDP2 + "  sharding_strategy: FULL_SHARD\n  reshard_after_forward: false\n",
        "fsdp_config.reshard_after_forward",
    ),
    Case(
        "fsdp1-pin-memory",
        "fsdp_version: 1\nfsdp_config:\n  cpu_offload_pin_memory: false\n",
        "fsdp_config.cpu_offload_pin_memory",
    ),
    Case("fsdp2-8bit-optimizer", FSDP2 + "optimizer: adamw_8bit\n", "optimizer", "adamw_torch_8bit"),
    Case(
        "float8-all-gather-needs-fsdp2",
        "fp8_enable_fsdp_float8_all_gather: true\n",
        "fp8_enable_fsdp_float8_all_gather",
    ),
    # ---- version conflicts ---------------------------------------------------------------------------
    Case("fsdp-version-3", "fsdp_version: 3\n", "fsdp_version"),
    Case(
        "fsdp-version-conflict",
        "fsdp_version: 1\nfsdp_config:\n  version: 2\n",
        "fsdp_version",
        "set the FSDP version in one place",
    ),
    Case(
        "sp-cp-conflict",
        "sequence_parallel_degree: 2\ncontext_parallel_size: 4\n",
        "sequence_parallel_degree",
    ),
    # ---- DeepSpeed ---------------------------------------------------------------------------------
    Case(
        "deepspeed-and-fsdp-config",
        "deepspeed: zero3\n" + FSDP2,
        "deepspeed",
        "remove fsdp_config or deepspeed",
    ),
    Case("deepspeed-and-fsdp-list", "deepspeed: zero2\nfsdp: [full_shard]\n", "deepspeed"),
    Case("deepspeed-missing-file", "deepspeed: ds_nowhere.json\n", "deepspeed", "preset name"),
    Case("deepspeed-blank-string", "deepspeed: '  '\n", "deepspeed"),
    Case(
        "deepspeed-invalid-json",
        "deepspeed: ds.json\n",
        "deepspeed",
        "not valid JSON",
        files=(("ds.json", '{"zero_optimization": {"stage": 3},}'),),
    ),
    Case(
        "deepspeed-json-array",
        "deepspeed: ds.json\n",
        "deepspeed",
        "JSON object",
        files=(("ds.json", "[1, 2]"),),
    ),
    Case(
        "deepspeed-json-not-utf8",
        "deepspeed: ds.json\n",
        "deepspeed",
        files=(("ds.json", b'{"zero_optimization": {"stage": "\xff"}}'),),
    ),
    Case(
        "deepspeed-stage-5",
        "deepspeed:\n  zero_optimization: {stage: 5}\n",
        "deepspeed.zero_optimization.stage",
    ),
    Case(
        "deepspeed-stage-auto",
        "deepspeed: ds.json\n",
        "deepspeed.zero_optimization.stage",
        files=(("ds.json", json.dumps({"zero_optimization": {"stage": "auto"}})),),
    ),
    Case(
        "deepspeed-stage-bool",
        "deepspeed:\n  zero_optimization: {stage: true}\n",
        "deepspeed.zero_optimization.stage",
    ),
    Case("deepspeed-zero-not-mapping", "deepspeed:\n  zero_optimization: 3\n", "deepspeed.zero_optimization"),
    Case(
        "deepspeed-inline-date",
        "deepspeed:\n  zero_optimization: {stage: 2}\n  comment: 2024-01-01\n",
        "deepspeed.comment",
        "not a JSON value",
    ),
    Case(
        "deepspeed-inline-number-key",
        "deepspeed:\n  zero_optimization: {stage: 2, 1: x}\n",
        "deepspeed.zero_optimization",
        "keys must be strings",
    ),
    Case("deepcompile-without-deepspeed", "deepcompile: true\n", "deepcompile"),
    Case(
        "deepspeed-fp16-json-vs-bf16",
        "bf16: true\ndeepspeed:\n  zero_optimization: {stage: 2}\n  fp16: {enabled: true}\n",
        "deepspeed.fp16.enabled",
    ),
    # ---- batch sizes ------------------------------------------------------------------------------------
    Case(
        "batch-size-and-gas",
        "batch_size: 16\ngradient_accumulation_steps: 2\n",
        "batch_size",
        "only one of",
    ),
    Case("batch-size-not-multiple", "batch_size: 10\nmicro_batch_size: 3\n", "batch_size"),
    # ---- the file itself ----------------------------------------------------------------------------------
    Case("yaml-unclosed", "bf16: [true, false\n", "config", "not valid YAML at line"),
    Case("yaml-bad-indent", "fsdp_config:\n  a: 1\n b: 2\n", "config", "not valid YAML"),
    Case("yaml-tab", "bf16:\n\t- true\n", "config", "not valid YAML"),
    Case("yaml-list", "- bf16\n- fp16\n", "config", "mapping"),
    Case("yaml-scalar", "just a string\n", "config", "mapping"),
    Case("yaml-empty", "", "config", "empty"),
    Case("yaml-only-comments", "# nothing here\n", "config", "empty"),
    Case("yaml-huge", "#" * (MAX_CONFIG_BYTES + 1), "config", "limit"),
    Case("not-utf8", b"bf16: true\nbase_model: \xff\xfe\n", "config", "UTF-8"),
    Case("missing-file", None, "config", "cannot read"),
    # ---- only once the hardware is known ---------------------------------------------------------------
    Case("bf16-unsupported", "bf16: true\n", "bf16", "bf16: false", options=("--bf16-supported", "no")),
    Case("fp8-unsupported", "fp8: true\n", "fp8", options=("--fp8-supported", "no")),
    Case(
        "dp-shard-not-dividing",
        FSDP2 + "dp_shard_size: 3\n",
        "dp_shard_size",
        "multiply to 3, which does not divide the 4 processes",
        options=("--nodes", "1", "--gpus-per-node", "4"),
    ),
    Case(
        "dp-sizes-over-the-gpus",
        FSDP2 + "dp_shard_size: 2\ndp_replicate_size: 4\n",
        "dp_shard_size",
        "change the sizes you wrote (dp_shard_size 2 x dp_replicate_size 4)",
        options=("--nodes", "1", "--gpus-per-node", "4"),
    ),
    Case(
        "tp-not-dividing",
        "tensor_parallel_size: 3\n",
        "tensor_parallel_size",
        options=("--nodes", "2", "--gpus-per-node", "8"),
    ),
    Case(
        "fsdp2-local-state-dict",
        FSDP2 + "  state_dict_type: LOCAL_STATE_DICT\n",
        "fsdp_config.state_dict_type",
        "SHARDED_STATE_DICT",
    ),
    Case(
        "fsdp2-old-torch",
        FSDP2,
        "fsdp_version",
        "torch >= 2.7",
        options=("--torch-version", "2.5.1"),
    ),
    Case(
        "deepspeed-path-relative",
        "deepspeed: zero2\n",
        "deepspeed_path",
        options=("--deepspeed-path", "ds.json"),
    ),
    Case("nodes-zero", "bf16: true\n", "Invalid value for '--nodes'", options=("--nodes", "0")),
]


def _write(case: Case, folder: Path) -> Path:
    for name, content in case.files:
        target = folder / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    path = folder / "config.yaml"
    if isinstance(case.config, bytes):
        path.write_bytes(case.config)
    elif isinstance(case.config, str):
        path.write_text(case.config)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    assert isinstance(code, int)
    return code, out, err


def _assert_refused(case: Case, code: int, out: str, err: str) -> None:
    # A bad option value is a usage error (2, click's convention); a refused config is 1.
    assert code == (2 if case.id == "nodes-zero" else 1), (code, err)
    assert out == "", "stdout carries data only, and there is none"
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    line = lines[0]
    assert line.startswith("error: "), line
    if case.id == "nodes-zero":  # click's own option error names the option
        assert case.field in line
    else:
        assert line.startswith(f"error: {case.field}: "), line
    assert case.says in line, line


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_refuses_with_one_line(
    case: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # relative DeepSpeed paths also resolve against the working directory
    path = str(_write(case, tmp_path))
    commands = [["plan", path, *case.options]]
    if not case.needs_hardware:
        commands += [["validate", path], ["plan", path, "-o", "json"]]
    for argv in commands:
        _assert_refused(case, *_run(argv, capsys))


@pytest.mark.parametrize("case", [c for c in CASES if c.config is not None], ids=lambda c: c.id)
def test_stdin_gives_the_same_error(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # From stdin, relative DeepSpeed files resolve against the working directory.
    monkeypatch.chdir(tmp_path)
    for name, content in case.files:
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    data = case.config if isinstance(case.config, bytes) else str(case.config).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    _assert_refused(case, *_run(["plan", "-", *case.options], capsys))


@pytest.mark.parametrize("case", [c for c in CASES if c.id != "nodes-zero"], ids=lambda c: c.id)
def test_python_api_raises_config_error_with_field(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(case, tmp_path)
    options = dict(zip(case.options[::2], case.options[1::2], strict=True))
    kwargs = {
        "nodes": int(options["--nodes"]) if "--nodes" in options else None,
        "gpus_per_node": int(options["--gpus-per-node"]) if "--gpus-per-node" in options else None,
        "bf16_supported": options.get("--bf16-supported"),
        "fp8_supported": options.get("--fp8-supported"),
        "torch_version": options.get("--torch-version"),
    }
    with pytest.raises(ConfigError) as raised:
        config = load_config(path)
        plan(config, hardware_from(kwargs), deepspeed_path=options.get("--deepspeed-path", "/etc/ds.json"))
    assert raised.value.field == case.field
    assert "\n" not in str(raised.value)


# A few rows through the installed console script, as a user runs it.
SUBPROCESS_ROWS = ("fsdp-typo", "yaml-huge", "deepspeed-invalid-json", "bf16-unsupported")


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_ROWS)
def test_console_script_refuses(case_id: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    path = _write(case, tmp_path)
    script = Path(sys.executable).with_name("optimenv")
    done = subprocess.run(
        [str(script), "plan", str(path), *case.options],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    _assert_refused(case, done.returncode, done.stdout, done.stderr)


@pytest.mark.slow
def test_subprocess_stdin_not_utf8(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("optimenv")
    done = subprocess.run(
        [str(script), "validate", "-"],
        input=b"bf16: true\nbase_model: \xff\xfe\n",
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert done.stdout == b""
    assert len(err.splitlines()) == 1 and err.startswith("error: config: "), err
    assert "Traceback" not in err


def test_errors_are_optimenv_errors() -> None:
    assert issubclass(ConfigError, OptimEnvError)
