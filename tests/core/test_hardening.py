"""Inputs found by review that once hung, crashed or silently misplanned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optimenv import ConfigError, Hardware, parse_config, plan
from optimenv.config import MAX_CONFIG_VALUES, parse_yaml
from optimenv.deepspeed import PRESETS

BOMB = """
a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
deepspeed: {zero_optimization: {stage: 3}, x: *g}
"""


@pytest.mark.timeout(20)
def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    proc = subprocess.run(
        [sys.executable, "-m", "optimenv.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: config: expands to more than {MAX_CONFIG_VALUES:,} values (the alias *d at line 6 "
        "repeats 11,111 values and 10,000 bytes of text; YAML aliases that repeat large sections are "
        "not supported: write the values out)"
    )


def test_small_aliases_still_work() -> None:
    data = parse_yaml("base: &b {micro_batch_size: 2}\nother: *b\nmicro_batch_size: 2\n")
    assert parse_config(data).micro_batch_size == 2


@pytest.mark.parametrize(
    ("deepspeed", "field"),
    [
        ({"zero_optimization": {"stage": "²"}}, "deepspeed.zero_optimization.stage"),
        (
            {"zero_optimization": {"stage": 3}, "gradient_clipping": float("nan")},
            "deepspeed.gradient_clipping",
        ),
        ({"zero_optimization": {"stage": 3}, "x": [float("inf")]}, "deepspeed.x[0]"),
    ],
)
def test_deepspeed_values_json_cannot_hold_name_their_field(deepspeed: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"deepspeed": deepspeed})
    assert err.value.field == field


@pytest.mark.parametrize("version", ["abc", "", "2", "v2.6"])
def test_unparsable_torch_version_is_refused(version: str) -> None:
    with pytest.raises(ConfigError) as err:
        Hardware(torch_version=version)
    assert err.value.field == "hardware.torch_version"


def test_torch_version_with_local_suffix_is_accepted() -> None:
    config = parse_config({"torch_compile": "auto"})
    assert (
        plan(config, Hardware(torch_version="2.6.0+cu124")).env_dict["ACCELERATE_DYNAMO_BACKEND"]
        == "INDUCTOR"
    )


def test_sequence_parallel_degree_written_as_string_is_not_a_conflict() -> None:
    config = parse_config({"sequence_parallel_degree": "2", "context_parallel_size": 2})
    assert config.context_parallel_size == 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_offload_presets_accept_the_optimizer_users_pass(name: str) -> None:
    # DeepSpeed refuses a client optimizer with ZeRO-Offload unless zero_force_ds_cpu_optimizer is
    # false (default true: deepspeed/runtime/constants.py), and accelerate.prepare / the HF Trainer
    # pass torch's AdamW.
    from deepspeed.runtime.config import get_zero_force_ds_cpu_optimizer

    preset = PRESETS[name]
    zero = preset["zero_optimization"]
    offloads = "offload_optimizer" in zero or "offload_param" in zero
    assert get_zero_force_ds_cpu_optimizer(preset) is (not offloads)
    if offloads:
        assert preset["zero_allow_untested_optimizer"] is True
