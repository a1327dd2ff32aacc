"""Both input formats, recognised by their keys, and the messages a user sees (C31, C32).

The accelerate-config rules cite Accelerate 1.15 (``commands/launch.py``, ``utils/launch.py``,
``utils/dataclasses.py``, ``commands/config/config_args.py``); the reference comparison of the plugins
is ``test_accelerate_config.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from optimenv.config import config_format, load_config, parse_config, reading_as
from optimenv.errors import ConfigError
from optimenv.plan import Hardware, plan
from optimenv.resource import parse_spec
from optimenv.validation import parse_model
from optimenv.workload import Topology
from optimenv_controller.reconcile import Desired, Invalid, desired
from tests.core.conftest import Cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "accelerate-fsdp2.yaml"
ACCELERATE = {
    "distributed_type": "FSDP",
    "mixed_precision": "bf16",
    "num_processes": 4,
    "fsdp_config": {"fsdp_version": 2},
}


def _call(cli: Cli, *argv: str | Path, stdin: str = "") -> tuple[int, str, str]:
    result = cli(*argv, stdin=stdin)
    return result.code, result.out, result.err


def refused(data: dict[str, Any], hardware: Hardware | None = None, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        plan(parse_config(data, **kwargs), hardware)
    return info.value


# ---- near misses (C31) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("fsdp_confg", "fsdp_config"),
        ("deepspeed_confg", "deepspeed"),
        ("bf_16", "bf16"),
        ("tensor_paralel_size", "tensor_parallel_size"),
    ],
)
def test_a_near_miss_warns_with_what_was_meant(key: str, meant: str) -> None:
    result = plan(parse_config({key: {"offload_params": True}}))
    assert f"{key}: not a key optimenv reads; did you mean {meant!r}?" in result.warnings


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("eval_batch_size", 1),
        ("torch_compile_mode", "default"),
        ("gradient_checkpointing", True),
        ("bfloat16", True),
        ("optimizer", "adamw_torch"),
    ],
)
def test_keys_of_axolotls_schema_are_no_near_misses(key: str, value: object) -> None:
    """Real keys (schemas/*.py at 067b021c) or keys our rules read never warn."""
    assert parse_config({key: value}).near_misses == ()


def test_validate_shows_near_misses_and_strict_refuses_them(cli: Cli) -> None:
    text = "fsdp_confg:\n  offload_params: true\nflash_attention: true\ndeepspeed_confg: zero3\n"
    code, _, err = _call(cli, "validate", "-", stdin=text)
    assert code == 0 and "warning: fsdp_confg: not a key optimenv reads; did you mean 'fsdp_config'?" in err
    assert err.rstrip().endswith("-: valid")
    code, out, err = _call(cli, "validate", "--strict", "-", stdin=text)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(
        "error: fsdp_confg: not a key optimenv reads; and deepspeed_confg (did you mean 'fsdp_config'?"
    )


# ---- error messages (C31) ------------------------------------------------------------------------------


def test_every_invalid_value_is_named_on_one_line() -> None:
    data = {"bf16": "maybe", "fp16": "x", "tensor_parallel_size": 0}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    text = str(info.value)
    assert text.startswith("bf16: must be 'auto' or true/false (got 'maybe'); fp16: ")
    assert "; tensor_parallel_size: Input should be greater than or equal to 1 (got 0)" in text
    assert "more error" not in text


def test_the_resource_and_the_job_are_read_like_the_config() -> None:
    """One translator for every model: each refused field named (under spec. for the resource), what
    it got echoed clipped, an unknown field with its hint, all on one line."""
    spec = {
        "config": {},
        "topology": {"nodes": 0, "gpusPerNode": "x" * 10_000},
        "job": {"target": "slurm", "image": "i", "tolerations": ["gpu"]},
        "policy": 3,
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    assert str(info.value) == (
        "spec.topology.nodes: Input should be greater than or equal to 1 (got 0); "
        f"spec.topology.gpusPerNode: Input should be a valid integer (got '{'x' * 56}...); "
        "spec.policy: Input should be 'plan-wins' or 'user-wins' (got 3); "
        "spec.job.target: Input should be 'rayjob', 'pytorchjob' or 'trainjob' (got 'slurm'); "
        "spec.job.tolerations[0]: Input should be a valid dictionary (got 'gpu'); "
        "spec.bogus: unknown field (check its spelling in `kubectl explain optimenv.spec`)"
    )
    with pytest.raises(ConfigError, match=r"^nodes: .*; gpus_per_node: Input should be a valid integer"):
        parse_model(Topology, {"nodes": 0, "gpus_per_node": "2x"})


def test_errors_past_ten_are_counted() -> None:
    keys = [
        "bf16",
        "fp16",
        "fp8",
        "tf32",
        "torch_compile",
        "ddp_timeout",
        "tensor_parallel_size",
        "dp_shard_size",
        "dp_replicate_size",
        "context_parallel_size",
        "expert_parallel_size",
        "micro_batch_size",
        "batch_size",
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(dict.fromkeys(keys, "bad"))
    text = str(info.value)
    assert text.count(": ") >= 10 and text.endswith("; ... and 3 more") and "\n" not in text


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"fsdp_version": 3}, "fsdp_version"),
        ({"fsdp_config": {"fsdp_version": 3}}, "fsdp_config.fsdp_version"),
    ],
)
def test_an_fsdp_version_error_is_named_once_where_written(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == f"{field}: must be 1 or 2, got 3"


def test_a_preset_typo_lists_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"deepspeed": "zero9"}, base_dirs=(tmp_path, tmp_path))
    text = str(info.value)
    assert text.startswith(
        "deepspeed: unknown preset 'zero9'; presets are zero1, zero2, zero3, zero3_offload_all,"
    )
    with pytest.raises(ConfigError) as info:
        parse_config({"deepspeed": "configs/ds.json"}, base_dirs=(tmp_path, tmp_path))
    assert str(info.value).count(str(tmp_path)) == 1  # each folder looked in is named once


# ---- recognising the format ---------------------------------------------------------------------------


def test_the_format_is_recognised_by_its_keys() -> None:
    assert config_format(ACCELERATE) == "accelerate"
    assert config_format({"fsdp_config": {"fsdp_offload_params": True}, "bf16": True}) == "axolotl"
    assert config_format({"debug": True}) == "axolotl"  # a key both formats may have decides nothing
    assert load_config(EXAMPLE).launch is not None
    for path in (REPO / "examples").glob("*.yaml"):
        assert (load_config(path).launch is not None) == (path.stem == "accelerate-fsdp2"), path


def test_a_file_mixing_both_formats_needs_format(cli: Cli) -> None:
    text = yaml.safe_dump({**ACCELERATE, "base_model": "x", "bf16": True})
    code, _, err = _call(cli, "plan", "-", stdin=text)
    assert code == 1 and err.startswith(
        "error: config: mixes keys of an accelerate config file (distributed_type"
    )
    assert "pass --format accelerate or --format axolotl" in err
    code, out, _ = _call(cli, "plan", "--format", "axolotl", "-", "-o", "json", stdin=text)
    # Axolotl's format reads bf16 and fsdp_config, not mixed_precision or num_processes.
    assert code == 0 and '"ACCELERATE_MIXED_PRECISION": "bf16"' in out and '"bf16_auto"' not in out
    assert '"ACCELERATE_MIXED_PRECISION": "bf16"' in out.split('"sources"')[1]
    code, _, err = _call(cli, "validate", "--format", "accelerate", "-", stdin=text)
    assert code == 1 and err.startswith("error: base_model: unknown key")
    with reading_as("accelerate"), pytest.raises(ConfigError, match=r"^bf16: unknown key"):
        parse_config({**ACCELERATE, "bf16": True})


# ---- what accelerate launch refuses, and what optimenv does not plan -----------------------------------


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"distributed_type": None}, "distributed_type", "is required"),  # config_args.py:109-110
        ({"distributed_type": "MULTI_CPU"}, "distributed_type", "not planned"),
        ({"use_cpu": True}, "use_cpu", "CPU runs"),
        ({"compute_environment": "AMAZON_SAGEMAKER"}, "compute_environment", "not planned"),
        ({"fp8_config": {"backend": "TE"}}, "fp8_config", "not planned"),
        ({"num_machines": 3}, "num_processes", "not a multiple of num_machines"),
        (
            {"fsdp_config": {"fsdp_offload_parms": True}},
            "fsdp_config.fsdp_offload_parms",
            "did you mean 'offload_params'",
        ),
        ({"mixed_precison": "bf16"}, "mixed_precison", "did you mean 'mixed_precision'"),
        # utils/launch.py:306-307: the launcher refuses it.
        (
            {"fsdp_config": {"fsdp_cpu_ram_efficient_loading": True, "fsdp_sync_module_states": False}},
            "fsdp_config.fsdp_sync_module_states",
            "must be true",
        ),
        (
            {"parallelism_config": {"parallelism_config_sp_size": 2}},
            "parallelism_config.parallelism_config_sp_size",
            "sequence",
        ),
        (
            {"parallelism_config": {"tp_size": 2}},
            "parallelism_config.tp_size",
            "did you mean 'parallelism_config_tp_size'",
        ),
    ],
)
def test_accelerate_files_refused_with_one_line(extra: dict[str, Any], field: str, says: str) -> None:
    error = refused({**ACCELERATE, **extra})
    assert error.field == field and says in str(error) and "\n" not in str(error)


@pytest.mark.parametrize(
    ("section", "top", "field"),
    [
        (
            {"deepspeed_config_file": "ds.json", "gradient_accumulation_steps": 4},
            {},
            "deepspeed_config.gradient_accumulation_steps",
        ),
        (
            {"deepspeed_config_file": "ds.json", "zero3_init_flag": True},
            {"mixed_precision": "no"},
            "mixed_precision",
        ),
        ({"zero_stage": 3, "offload_param_device": "nvme"}, {}, "deepspeed_config.offload_param_device"),
    ],
)
def test_deepspeed_settings_accelerate_refuses(
    section: dict[str, Any], top: dict[str, Any], field: str, tmp_path: Path
) -> None:
    """DeepSpeedPlugin._deepspeed_config_checks (utils/dataclasses.py:1507-1533) refuses launcher
    settings beside a file; the launcher never passes the NVMe paths (utils/launch.py:566-586)."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    data = {"distributed_type": "DEEPSPEED", "num_processes": 2, "deepspeed_config": section, **top}
    assert refused(data, base_dirs=(tmp_path,)).field == field


def test_accelerate_errors_and_sources_name_the_files_keys() -> None:
    error = refused({**ACCELERATE, "num_processes": None}, hardware=Hardware(bf16_supported=False))
    assert error.field == "mixed_precision" and "do not support bf16" in error.reason
    result = plan(load_config(EXAMPLE))
    assert result.sources["ACCELERATE_MIXED_PRECISION"] == "mixed_precision"
    assert result.sources["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "fsdp_config.fsdp_transformer_layer_cls_to_wrap"
    defaulted = plan(parse_config({"distributed_type": "FSDP", "num_processes": 2})).sources
    assert defaulted["FSDP_USE_ORIG_PARAMS"] == "accelerate launch default (fsdp_use_orig_params)"


def test_accelerate_files_get_no_axolotl_inference() -> None:
    """Accelerate builds ParallelismConfig from the sizes as written (utils/launch.py:403-427)."""
    data = {**ACCELERATE, "parallelism_config": {"parallelism_config_tp_size": 2}}
    error = refused(data)
    assert (
        error.field == "parallelism_config.parallelism_config_tp_size"
        and "equal the 4 processes" in error.reason
    )
    ones = plan(parse_config({**ACCELERATE, "parallelism_config": {}})).env_dict
    assert ones["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"  # launch.py:1248: any section turns it on


# ---- num_processes / num_machines are the topology ----------------------------------------------------


def test_num_processes_is_the_topology(cli: Cli) -> None:
    code, _, err = _call(cli, "plan", EXAMPLE, "--nodes", "2", "--gpus-per-node", "4")
    assert (code, err) == (0, "")
    code, _, err = _call(cli, "plan", EXAMPLE, "--gpus-per-node", "8")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(
        "error: num_processes: the file asks for 8 processes on 2 machine(s), but the target is "
        "2 node(s) x 8 GPU(s)"
    )
    code, out, _ = _call(
        cli,
        "render",
        EXAMPLE,
        "--target",
        "pytorchjob",
        "--name",
        "a",
        "--image",
        "i",
        "--",
        "python",
        "t.py",
    )
    job = next(d for d in yaml.safe_load_all(out) if d["kind"] == "PyTorchJob")
    assert code == 0 and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] + 1 == 2
    assert job["spec"]["nprocPerNode"] == "4"


def test_run_refuses_workers_that_disagree(cli: Cli) -> None:
    """optimenv run plans for --workers processes on one machine; the file says 8."""
    code, out, err = _call(cli, "run", EXAMPLE, "--workers", "2")
    assert (code, out) == (1, "") and err.startswith("error: num_processes: the file asks for 8 processes")


# ---- the OptimEnv resource -----------------------------------------------------------------------------


def _resource(spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "ft", "namespace": "ml", "uid": "u-1", "generation": 1}
    return {"apiVersion": "optimenv.dev/v1alpha1", "kind": "OptimEnv", "metadata": meta, "spec": spec}


def test_the_resource_takes_an_accelerate_config() -> None:
    inline = yaml.safe_load(EXAMPLE.read_text())
    topology = {"nodes": 2, "gpusPerNode": 4}
    result = desired(_resource({"config": inline, "topology": topology}))
    assert isinstance(result, Desired)
    ref = {"configMapRef": {"name": "cfg"}, "topology": topology}
    referenced = {"data": {"config.yaml": EXAMPLE.read_text()}}
    assert isinstance(desired(_resource(ref), referenced), Desired)
    wrong = desired(_resource({"config": inline}))
    assert isinstance(wrong, Invalid) and wrong.message.startswith(
        "spec.config.num_processes: the file asks for 8"
    )
    with_file = {
        **inline,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": "ds.json"},
    }
    del with_file["fsdp_config"]
    invalid = desired(_resource({"config": with_file, "topology": topology}))
    assert (
        isinstance(invalid, Invalid) and "is a file path, which the controller cannot read" in invalid.message
    )
