"""The files ``optimenv spec`` writes work as written with the bootstrap and with ``ray-launch``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bootstrap.support import BIN, PRINT_ENV, bootstrap, child_env, clean_env, ray_launch, run

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _spec(example: str, out: Path) -> Path:
    result = run([str(BIN / "optimenv"), "spec", str(EXAMPLES / example), "-o", str(out)])
    assert result.returncode == 0, result.stderr
    return out / "spec.json"


def test_bootstrap_applies_the_written_spec_and_finds_its_deepspeed_json(tmp_path: Path) -> None:
    spec = _spec("zero3-gpu.yaml", tmp_path / "spec")
    # From another working directory: the paths in the spec are absolute.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = bootstrap("--spec", str(spec), "--", *PRINT_ENV, cwd=elsewhere)
    env = child_env(result)
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(tmp_path / "spec" / "deepspeed.json")
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3" and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["OPTIMENV_SPEC"] == str(spec)


@pytest.mark.timeout(300)
def test_ray_launch_runs_a_script_with_the_written_spec(ray_address: str, tmp_path: Path) -> None:
    spec = _spec("fsdp2-cpu.yaml", tmp_path / "spec")
    script = tmp_path / "train.py"
    script.write_text(
        "import os\nfrom accelerate import Accelerator\n"
        "from optimenv.bootstrap.ray import report\n"
        "state = Accelerator().state\n"
        "report(0, fsdp=os.environ['ACCELERATE_USE_FSDP'], processes=state.num_processes)\n"
    )
    result = ray_launch(spec, tmp_path, script, env=clean_env(RAY_ADDRESS=ray_address))
    assert result.returncode == 0, result.stderr[-4000:]
    workers = json.loads((tmp_path / "report.json").read_text())["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    planned = {e["name"]: e["value"] for e in json.loads(spec.read_text())["env"]}
    for w in workers:
        applied = {v["name"]: v["value"] for v in w["applied"]["assigned"]}
        assert {name: applied[name] for name in planned} == planned
        assert w["metrics"][0]["metrics"] == {"fsdp": "true", "processes": 2}
