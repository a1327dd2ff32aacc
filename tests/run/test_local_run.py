"""``optimenv run``: the whole path on one machine through a local Ray cluster (issue 7)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from optimenv import Hardware, load_config, plan

pytestmark = pytest.mark.slow
OPTIMENV = [sys.executable, "-c", "from optimenv.cli import main; main()"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.mark.timeout(300)
def test_two_cpu_workers_train_with_the_plan_applied(repo: Path) -> None:
    # README's main command, as written there (2 workers, 3 steps by default), with a JSON report.
    readme = (repo / "README.md").read_text()
    command = re.search(r"&& \.venv/bin/optimenv (run [^\n`]+)", readme)
    assert command, "README.md lost its main command"
    args = shlex.split(command.group(1))
    config = repo / args[1]
    proc = subprocess.run(
        [*OPTIMENV, *args, "-o", "json"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=repo,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # stdout is data only
    workers = report["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    planned = plan(load_config(config), Hardware(nodes=1, gpus_per_node=2)).env_dict
    for worker in workers:
        assert {k: worker["applied"].get(k) for k in planned} == planned
        # bf16: auto is decided on the worker; a CPU worker has no bf16 GPU.
        assert worker["applied"]["ACCELERATE_MIXED_PRECISION"] == "no"
        assert len(worker["losses"]) == 3
        assert all(isinstance(x, float) and math.isfinite(x) for x in worker["losses"])
        assert worker["requested"]["mode"] == "FSDP2"
        assert worker["effective"]["mode"] == "MULTI_CPU"
        assert any("Accelerate runs MULTI_CPU" in note for note in worker["differences"])
    timings = report["timings"]
    assert 0 < timings["cluster_start_s"] <= timings["first_step_s"] <= timings["total_s"]
    assert "training" in proc.stderr  # the progress bar went to stderr


@pytest.mark.timeout(240)
def test_a_failing_script_surfaces_its_traceback_and_exit_code(
    repo: Path, tmp_path: Path, ray_address: str
) -> None:
    script = tmp_path / "fails.py"
    script.write_text(
        "import os, sys\n"
        "print('a print of the script')  # must not reach the driver's stdout (data only)\n"
        "if os.environ['RANK'] == '1':\n"
        "    raise ValueError('boom from rank 1')\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.run(
        [*OPTIMENV, "run", str(repo / "examples" / "fsdp2-cpu.yaml"), "--workers", "2", "--", str(script)],
        capture_output=True,
        text=True,
        env=_env(RAY_ADDRESS=ray_address),
        cwd=repo,
        timeout=220,
    )
    assert proc.returncode == 1
    assert "ValueError: boom from rank 1" in proc.stderr
    assert "--- worker 1 (exit 1) ---" in proc.stderr
    assert proc.stdout == ""
    assert "a print of the script" in proc.stderr


def test_a_missing_script_is_refused_before_ray_starts(repo: Path) -> None:
    proc = subprocess.run(
        [*OPTIMENV, "run", str(repo / "examples" / "fsdp2-cpu.yaml"), "--", "no/such/script.py"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=repo,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: script: no/such/script.py: no such file"]


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_workers_and_the_local_cluster(repo: Path) -> None:
    # Ray's temp dir shows in every process it starts: a short private one identifies them.
    ray_tmp = tempfile.mkdtemp(prefix="oer-", dir="/tmp")
    with subprocess.Popen(
        [*OPTIMENV, "run", str(repo / "examples" / "fsdp2-cpu.yaml"), "--workers", "2", "--steps", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(RAY_TMPDIR=ray_tmp),
        cwd=repo,
    ) as proc:
        seen = threading.Event()
        lines: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "step 1 loss" in line:
                    seen.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert seen.wait(240), "training never started:\n" + "".join(lines[-40:])
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        reader.join(timeout=10)
    assert code == 130, "".join(lines[-40:])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _processes_under(ray_tmp):
        time.sleep(0.5)
    assert _processes_under(ray_tmp) == []


def _processes_under(folder: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found
