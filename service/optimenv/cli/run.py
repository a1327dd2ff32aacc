"""``optimenv run``: the whole path on one machine, through a local Ray cluster."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from optimenv._console import default_log_path, owned_stderr
from optimenv._ray_driver import exits_when_interrupted
from optimenv.cli._common import log_option, read_config
from optimenv.compiler import compile
from optimenv.config import TrainingConfig
from optimenv.errors import OptimEnvError
from optimenv.local_run import RunRequest, Timings, build_report, format_report, run_workers
from optimenv.train_tiny import DEFAULT_STEPS
from optimenv.workload import DEFAULT_LOCAL_WORKERS, local_topology

DEFAULT_SCRIPT = "optimenv.train_tiny"


@click.command(name="run")
@click.argument("config")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help=f"Ray Train workers (default: the config's ray_num_workers, else {DEFAULT_LOCAL_WORKERS}).",
)
@click.option(
    "--steps", type=click.IntRange(min=1), help=f"Steps of the shipped example (default {DEFAULT_STEPS})."
)
@click.option("--cpu", is_flag=True, help="CPU workers even if the cluster has GPUs.")
@log_option
@click.option(
    "-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text", show_default=True
)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run_command(
    config: str,
    workers: int | None,
    steps: int | None,
    cpu: bool,
    log_path: Path | None,
    output: str,
    script_args: tuple[str, ...],
) -> None:
    """Train CONFIG on this machine: a local Ray cluster (or $RAY_ADDRESS), N workers, the plan in each.

    Without `-- SCRIPT ARGS...` it trains the shipped tiny Llama (nothing is downloaded).
    Exit status: 0 when every worker succeeded; the failing script's exit code; 130 after Ctrl-C,
    143 after SIGTERM.
    """
    cfg = read_config(config)
    target, args, module = _script(cfg, script_args, steps)
    timings = Timings()
    log = log_path or default_log_path("run")
    with exits_when_interrupted(), tempfile.TemporaryDirectory(prefix="optimenv-run-") as tmp:
        # Planned like a RayJob on one node of this machine; the driver imports no torch (it starts
        # faster), so the GPUs' capabilities are left to the bootstrap in each worker.
        job = compile(
            cfg, local_topology(cfg, workers), "rayjob", deepspeed_path=str(Path(tmp) / "deepspeed.json")
        )
        assert job.workers is not None  # a job target always has a size
        with owned_stderr(log) as console:
            for warning in job.plan.warnings:
                console.say(f"warning: {warning}")
            launched = RunRequest(job.spec, target, args, module, job.workers, cpu, steps or DEFAULT_STEPS)
            reports, use_gpu = run_workers(launched, console, timings)
    timings.total_s = time.perf_counter() - timings.started
    report = build_report(job.plan, reports, timings, use_gpu, log)
    click.echo(format_report(report, output), nl=False)


def _script(
    cfg: TrainingConfig, script_args: tuple[str, ...], steps: int | None
) -> tuple[str, list[str], bool]:
    """What each worker runs: the given script and its arguments, or the shipped example (a module)."""
    if script_args and steps is not None:
        raise OptimEnvError(
            "--steps: applies to the shipped example only; give your script its own arguments"
        )
    if script_args and not Path(script_args[0]).is_file():
        raise OptimEnvError(f"script: {script_args[0]}: no such file")
    if script_args:
        return script_args[0], list(script_args[1:]), False
    mbs = str(cfg.micro_batch_size or 1)
    return DEFAULT_SCRIPT, ["--steps", str(steps or DEFAULT_STEPS), "--micro-batch-size", mbs], True
