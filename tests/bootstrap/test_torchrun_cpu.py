"""Exec mode on a CPU-only machine: the processes torchrun starts form one Accelerate run (gloo).

``optimenv-bootstrap --spec S -- torchrun --nproc-per-node 2 ...`` with the spec written by
``optimenv spec``: real torchrun, real Accelerate, real DDP; each rank writes what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bootstrap.support import BIN, clean_env, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]

# The same initial weights on every rank, different data per rank: the weights stay equal after
# the steps only if the gradients were averaged across the two processes.
TRAIN = """\
import json, os, sys
import torch
from accelerate import Accelerator

accelerator = Accelerator()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
torch.manual_seed(1 + int(os.environ["RANK"]))
for _ in range(3):
    x = torch.randn(8, 4)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
state = accelerator.state
record = {
    "rank": int(os.environ["RANK"]),
    "distributed_type": str(state.distributed_type),
    "num_processes": state.num_processes,
    "process_index": state.process_index,
    "backend": state.backend,
    "use_cpu": os.environ.get("ACCELERATE_USE_CPU"),
    "use_fsdp": os.environ.get("ACCELERATE_USE_FSDP"),
    "weights": accelerator.unwrap_model(model).weight.detach().flatten().tolist(),
}
with open(os.path.join(sys.argv[1], f"rank{record['rank']}.json"), "w") as fh:
    json.dump(record, fh)
accelerator.end_training()
os._exit(0)  # machine-notes: avoids a rare abort at interpreter exit after torchrun + Accelerate
"""


def _torchrun(tmp_path: Path, label: str, **env: str) -> tuple[Any, list[dict[str, Any]]]:
    spec_dir = tmp_path / "spec"
    if not (spec_dir / "spec.json").is_file():
        written = run(
            [str(BIN / "optimenv"), "spec", str(REPO / "examples" / "fsdp2-cpu.yaml"), "-o", str(spec_dir)]
        )
        assert written.returncode == 0, written.stderr
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out = tmp_path / label
    out.mkdir()
    result = run(
        [
            str(BIN / "optimenv-bootstrap"),
            "--spec",
            str(spec_dir / "spec.json"),
            "--",
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            sys.executable,
            str(script),
            str(out),
        ],
        env=clean_env(OMP_NUM_THREADS="1", **env),
        cwd=tmp_path,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_exec_mode_on_cpu_makes_torchrun_processes_one_gloo_run(tmp_path: Path) -> None:
    result, ranks = _torchrun(tmp_path, "bootstrap")
    assert "ACCELERATE_USE_CPU" not in clean_env()  # the bootstrap set it, not the test
    for rank in ranks:
        assert rank["use_cpu"] == "true" and rank["use_fsdp"] == "true"
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU"
        assert rank["num_processes"] == 2 and rank["process_index"] == rank["rank"]
        assert rank["backend"] == "gloo"
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged across the ranks
    summary = result.stderr.splitlines()[0]
    assert summary.startswith("optimenv-bootstrap: spec ") and "exec " in summary


def test_without_it_each_process_trains_alone(tmp_path: Path) -> None:
    """The opt-out (ACCELERATE_USE_CPU already set) shows what the variable is for."""
    _, ranks = _torchrun(tmp_path, "alone", ACCELERATE_USE_CPU="false")
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.NO"
        assert rank["num_processes"] == 1 and rank["process_index"] == 0
    assert ranks[0]["weights"] != ranks[1]["weights"]  # each rank saw only its own data
