"""``optimenv run``: the whole path on one machine through a local Ray cluster, as a user sees it."""

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
SHIM = Path(__file__).resolve().parents[1] / "gpu_bench" / "cpu_shim"
# What stderr may hold after a successful run: optimenv's own lines and the progress.
OWN_LINE = re.compile(r"^(starting Ray \.\.\.|joining Ray at \S+ \.\.\.|training: \d+(/\d+)? steps(, .*)?)$")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _run(
    repo: Path, *args: str, env: dict[str, str], timeout: float = 220
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPTIMENV, "run", *args], capture_output=True, text=True, env=env, cwd=repo, timeout=timeout
    )


@pytest.mark.timeout(300)
def test_readme_main_command_trains_visibly_and_keeps_stderr_clean(repo: Path) -> None:
    # README's main command, as written there, with a JSON report. Ray's token authentication is
    # left on, so Ray has its warning to print: it must end up in the log, not on stderr.
    readme = (repo / "README.md").read_text()
    command = re.search(r"&& \.venv/bin/optimenv (run [^\n`]+)", readme)
    assert command, "README.md lost its main command"
    args = shlex.split(command.group(1))
    env = {k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"}
    proc = _run(repo, *args[1:], "-o", "json", env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # stdout is data only
    workers = report["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    planned = plan(load_config(repo / args[1]), Hardware(nodes=1, gpus_per_node=2)).env_dict
    for worker in workers:
        assert {k: worker["applied"].get(k) for k in planned} == planned
        # bf16: auto is decided on the worker; a CPU worker has no bf16 GPU.
        assert worker["applied"]["ACCELERATE_MIXED_PRECISION"] == "no"
        assert worker["effective"]["mode"] == "MULTI_CPU"
        losses = worker["losses"]
        assert len(losses) == 30 and all(isinstance(x, float) and math.isfinite(x) for x in losses)
        # The shipped example learns: at least 30% lower after its default steps.
        assert worker["loss"]["last"] <= 0.7 * worker["loss"]["first"], worker["loss"]
    assert workers[0]["losses"] == workers[1]["losses"]  # the mean over ranks, reported by each
    timings = report["timings"]
    assert 0 < timings["cluster_start_s"] <= timings["first_step_s"] <= timings["total_s"]
    lines = proc.stderr.splitlines()
    assert all(OWN_LINE.match(line) for line in lines), lines
    assert any(line.startswith("training: 30/30 steps") for line in lines)
    log = Path(report["log"]).read_text()
    assert "Ray's own logs: " in log
    assert "\x1b" not in proc.stderr + log


@pytest.mark.timeout(240)
def test_a_failing_script_shows_its_traceback_once(repo: Path, tmp_path: Path, ray_address: str) -> None:
    script = tmp_path / "fails.py"
    script.write_text(
        "print('a print of the script')  # must not reach the driver's stdout (data only)\n"
        "def load():\n"
        "    raise ValueError('boom')\n"
        "load()\n"
    )
    env = _env(RAY_ADDRESS=ray_address)
    proc = _run(repo, "examples/fsdp2-cpu.yaml", "--workers", "2", "--", str(script), env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr
    # Both ranks failed the same way: one section, the script's frames only.
    assert err.count("Traceback (most recent call last):") == 1
    assert "--- workers 0, 1 (exit 1) ---" in err
    assert f'File "{script}", line 4, in <module>' in err
    assert "ValueError: boom" in err
    assert "runpy" not in err and "optimenv/bootstrap" not in err
    assert len(re.findall(r"^\[rank \d\] a print of the script$", err, flags=re.M)) == 1


@pytest.mark.timeout(240)
def test_sys_exit_gives_its_code_without_a_traceback(repo: Path, tmp_path: Path, ray_address: str) -> None:
    script = tmp_path / "exits.py"
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n    sys.exit(3)\n")
    proc = _run(repo, "examples/fsdp2-cpu.yaml", "--", str(script), env=_env(RAY_ADDRESS=ray_address))
    assert proc.returncode == 3, proc.stderr
    assert "--- worker 1 (exit 3) ---\nthe script exited with 3\n" in proc.stderr
    assert "Traceback" not in proc.stderr and "SystemExit" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 6, proc.stderr


@pytest.mark.timeout(240)
def test_a_script_ending_with_os_exit_succeeds(repo: Path, tmp_path: Path, ray_address: str) -> None:
    # bench/gpu/train.py ends so (a clean exit under torchrun); in a Ray worker it killed the worker.
    script = tmp_path / "ends_hard.py"
    script.write_text(
        "import os\nfrom optimenv.bootstrap.ray import report\n"
        "report(0, loss=1.5)\nprint('done', flush=True)\nos._exit(0)\n"
    )
    proc = _run(
        repo, "examples/fsdp2-cpu.yaml", "-o", "json", "--", str(script), env=_env(RAY_ADDRESS=ray_address)
    )
    assert proc.returncode == 0, proc.stderr
    workers = json.loads(proc.stdout)["workers"]
    assert [(w["exit_code"], w["losses"]) for w in workers] == [(0, [1.5]), (0, [1.5])]


def test_more_workers_than_cpus_are_refused_at_once(repo: Path, ray_address: str) -> None:
    started = time.monotonic()
    env = _env(RAY_ADDRESS=ray_address)
    proc = _run(repo, "examples/fsdp2-cpu.yaml", "--workers", "3", env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "error: workers: 3 CPU workers need 3 CPUs (one each), but the Ray cluster has 2; "
        "use --workers 2 or fewer, or join a larger cluster ($RAY_ADDRESS)"
    )
    assert time.monotonic() - started < 45  # Ray would have waited for a third CPU forever


def test_a_missing_script_is_refused_before_ray_starts(repo: Path) -> None:
    proc = _run(repo, "examples/fsdp2-cpu.yaml", "--", "no/such/script.py", env=_env(), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: script: no/such/script.py: no such file"]


@pytest.mark.timeout(300)
def test_zero3_reports_accelerates_deepspeed_state(repo: Path) -> None:
    # On GPUs this run trained, then failed reading Accelerate's single DeepSpeedPlugin. The CPU shim
    # (tests only) lets Accelerate turn DeepSpeed on in the Ray workers as it does on GPUs.
    env = _env(PYTHONPATH=str(SHIM), GPU_BENCH_CPU_SHIM="1")
    proc = _run(repo, "examples/zero3-gpu.yaml", "--workers", "1", "--steps", "3", "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (worker,) = json.loads(proc.stdout)["workers"]
    assert worker["requested"]["mode"] == worker["effective"]["mode"] == "DEEPSPEED (ZeRO-3)"
    assert worker["decisions"][-1]["kind"] == "deepspeed_zero3_config"
    assert len(worker["losses"]) == 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_and_every_ray_process(repo: Path, sig: int, code: int) -> None:
    # Ray's temp dir shows in every process it starts: a short private one identifies them.
    ray_tmp = tempfile.mkdtemp(prefix="oer-", dir="/tmp")
    with subprocess.Popen(
        [*OPTIMENV, "run", "examples/fsdp2-cpu.yaml", "--steps", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(RAY_TMPDIR=ray_tmp),
        cwd=repo,
    ) as proc:
        lines = _watch(proc, "training: ")
        assert lines.started.wait(240), "training never started:\n" + "".join(lines.seen[-40:])
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code, "".join(lines.seen[-40:])
        ended = time.monotonic()
    time.sleep(max(0.0, 5.0 - (time.monotonic() - ended)))
    assert _processes_under(ray_tmp) == []
    # One cluster, ever: a Ray call after the signal must not start a second one.
    assert len(list(Path(ray_tmp, "ray").glob("session_2*"))) == 1


class _Lines:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.started = threading.Event()


def _watch(proc: subprocess.Popen[str], marker: str) -> _Lines:
    lines = _Lines()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.seen.append(line)
            if line.startswith(marker):
                lines.started.set()

    threading.Thread(target=read, daemon=True).start()
    return lines


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
