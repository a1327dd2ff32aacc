"""Ray mode: ``optimenv ray-launch`` on the session's local Ray cluster with 2 CPU workers.

Each worker applies the spec after Ray Train set its ranks, runs the script, and reports back its
rank, the variables applied, Accelerate's state and the script's per-step metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from optimenv.spec import deepspeed_text
from tests.bootstrap.support import BIN, FSDP2, ZERO3, MakeSpec, clean_env, ray_launch, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TRAIN = """\
import os
import sys

if "--fail" in sys.argv and os.environ["RANK"] == "1":
    sys.exit(3)  # Ray Train set RANK before the script started

import torch
from accelerate import Accelerator
from transformers.integrations import is_deepspeed_zero3_enabled
from optimenv.bootstrap.ray import report

zero3 = is_deepspeed_zero3_enabled()  # the bootstrap holds the config in this worker process
accelerator = Accelerator()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
model, optimizer = accelerator.prepare(model, optimizer)
for step in range(int(sys.argv[sys.argv.index("--steps") + 1])):
    x = torch.randn(8, 4)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    report(step, loss=loss.detach(), zero3=zero3)
"""


@pytest.fixture(scope="module")
def launch_env(ray_address: str) -> dict[str, str]:
    return clean_env(RAY_ADDRESS=ray_address)


def _launch(tmp_path: Path, spec: Path, env: dict[str, str], *script_args: str) -> tuple[Any, dict[str, Any]]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    report = tmp_path / "report.json"
    result = ray_launch(spec, tmp_path, script, *script_args, env=env)
    assert report.is_file(), result.stderr[-4000:]
    return result, json.loads(report.read_text())


def test_each_worker_applies_the_plan_before_accelerate(
    make_spec: MakeSpec, launch_env: dict[str, str], tmp_path: Path
) -> None:
    # The spec points at the in-pod path, which does not exist here: workers write their own copy.
    files = make_spec(ZERO3, deepspeed_path="/etc/optimenv/deepspeed.json", write_deepspeed=False)
    result, report = _launch(tmp_path, files.spec, launch_env, "--steps", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    workers = report["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    for w in workers:
        assert w["exitCode"] == 0 and w["error"] is None
        assert w["worldSize"] == 2 and w["localRank"] == w["rank"] and w["nodeRank"] == 0
        applied = {v["name"]: v for v in w["applied"]["assigned"]}
        for entry in files.doc["env"]:
            if entry["name"] != "ACCELERATE_DEEPSPEED_CONFIG_FILE":
                assert applied[entry["name"]]["value"] == entry["value"]
        local = applied["ACCELERATE_DEEPSPEED_CONFIG_FILE"]["value"]
        assert local != "/etc/optimenv/deepspeed.json" and w["applied"]["deepspeedPath"] == local
        assert Path(local).read_text() == deepspeed_text(files.doc["deepspeed"])
        assert applied["ACCELERATE_USE_CPU"] == {
            "name": "ACCELERATE_USE_CPU",
            "value": "true",
            "planned": "true",
            "source": "ray: CPU workers",
            "reason": "planned",
        }
        assert applied["ACCELERATE_MIXED_PRECISION"]["value"] == "no"
        decisions = {d["kind"]: d for d in w["applied"]["decisions"]}
        assert decisions["single_gpu_rendezvous_defaults"]["reason"] == "WORLD_SIZE=2 set by the launcher"
        assert "is_deepspeed_zero3_enabled() is true" in decisions["deepspeed_zero3_config"]["reason"]
        assert w["applied"]["zero3ConfigAlive"] is True
        # Accelerate joined Ray's gloo group: one MULTI_CPU run of 2 processes, this worker = its rank.
        acc = w["accelerate"]
        assert acc["distributed_type"] == "MULTI_CPU"
        assert acc["num_processes"] == 2
        assert acc["process_index"] == w["rank"] and acc["local_process_index"] == w["rank"]
        assert acc["backend"] == "gloo"
        assert acc["mixed_precision"] == "no"
        assert [m["step"] for m in w["metrics"]] == [0, 1, 2]
        assert all(m["rank"] == w["rank"] and isinstance(m["metrics"]["loss"], float) for m in w["metrics"])
        assert all(m["metrics"]["zero3"] is True for m in w["metrics"])
    assert "worker 1: ok, 7 variables set, accelerate MULTI_CPU, 3 reports" in result.stderr
    # --progress: every report() reached the driver while the run went on, once.
    for w in workers:
        for m in w["metrics"]:
            line = f"worker {w['rank']} step {m['step']}: loss={m['metrics']['loss']} zero3=True"
            assert result.stderr.count(line) == 1


def test_a_failing_worker_surfaces_with_its_traceback_and_exit_code(
    make_spec: MakeSpec, launch_env: dict[str, str], tmp_path: Path
) -> None:
    files = make_spec(FSDP2)
    result, report = _launch(tmp_path, files.spec, launch_env, "--steps", "1", "--fail")
    assert result.returncode == 3, result.stderr[-4000:]
    # sys.exit(3) is a deliberate exit: its code and no traceback, as `python train.py` shows it.
    assert "--- worker 1 (exit 3) ---\nthe script exited with 3\n" in result.stderr
    assert "Traceback" not in result.stderr and "SystemExit" not in result.stderr
    assert "error: worker 1 failed first (exit 3)" in result.stderr
    failed = report["workers"][1]
    assert failed["exitCode"] == 3 and failed["error"] == "the script exited with 3"
    assert failed["metrics"] == [] and failed["applied"]["assigned"]  # applied, then the script failed


@pytest.mark.timeout(60)
def test_a_bad_spec_is_refused_before_ray_starts(make_spec: MakeSpec, tmp_path: Path) -> None:
    files = make_spec(FSDP2)
    files.spec.write_text(files.spec.read_text().replace('"FSDP_VERSION"', '"FSDP_VERSIO"'))
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit(9)\n")
    result = run([str(BIN / "optimenv"), "ray-launch", "--spec", str(files.spec), "--", str(script)])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: spec: content hash mismatch")
