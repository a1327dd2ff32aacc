"""``optimenv ray-launch``: run a training script in Ray Train workers with the plan applied in each.

The RayJob's entrypoint: compile() writes its ``--spec`` and ``--workers``, this command takes them
as given and checks the count against the spec before Ray starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from optimenv._files import write_atomically
from optimenv.cli._common import log_option
from optimenv.errors import OptimEnvError
from optimenv.plan import ProcessCountError, check_world_size
from optimenv.spec import SPEC_ENV

if TYPE_CHECKING:
    from optimenv._console import Console
    from optimenv.bootstrap.ray import WorkerReport


@click.command(
    name="ray-launch",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--spec",
    "spec",
    envvar=SPEC_ENV,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Worker spec (JSON rendered by optimenv); default $OPTIMENV_SPEC.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Ray Train workers."
)
@click.option(
    "--cpu", is_flag=True, help="CPU workers (gloo; ACCELERATE_USE_CPU=true) even if the cluster has GPUs."
)
@click.option("-m", "--module", "module", is_flag=True, help="SCRIPT is a module name (like python -m).")
@click.option("--address", help="Ray cluster address; default $RAY_ADDRESS, else a local Ray.")
@click.option("--storage-path", help="Ray Train storage path (RunConfig.storage_path).")
@click.option("--name", help="Ray Train run name.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write every worker's report (rank, applied variables, Accelerate state, metrics) as JSON.",
)
@click.option("--progress", is_flag=True, help="Print every report() of the script on stderr as it arrives.")
@log_option
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def ray_launch_command(
    spec: Path,
    workers: int,
    cpu: bool,
    module: bool,
    address: str | None,
    storage_path: str | None,
    name: str | None,
    report_path: Path | None,
    progress: bool,
    log_path: Path | None,
    script: str,
    args: tuple[str, ...],
) -> None:
    """Run SCRIPT [ARGS...] in Ray Train (V2) workers, applying the spec in each before it starts.

    stderr shows optimenv's lines and what the script prints (a line printed by several ranks once);
    Ray's own messages go to the log file (--log). Exit status: 0 when every worker succeeded; else
    the failing script's exit code (1 for an exception or a refusal), with its traceback on stderr;
    130 after Ctrl-C, 143 after SIGTERM.
    """
    from optimenv._console import default_log_path, owned_stderr
    from optimenv._ray_driver import exits_when_interrupted
    from optimenv.bootstrap.ray import MetricsRecord, checked_launch, launch

    doc, _ = checked_launch(spec, script, module=module, workers=workers)  # refused before Ray starts
    check_workers(doc, workers)
    if report_path is not None and not report_path.resolve().parent.is_dir():
        raise OptimEnvError(f"--report: folder {report_path.resolve().parent} does not exist")
    with exits_when_interrupted(), owned_stderr(log_path or default_log_path("ray-launch")) as console:

        def show(record: MetricsRecord) -> None:
            values = " ".join(f"{key}={value}" for key, value in record.metrics.items())
            console.say(f"worker {record.rank} step {record.step}: {values}")

        def fit() -> list[WorkerReport]:
            return launch(
                spec,
                script,
                args,
                workers=workers,
                use_gpu=False if cpu else None,
                module=module,
                storage_path=storage_path,
                name=name,
                on_report=show if progress else None,
                on_output=console.show,
            )

        for r in _fit(console, address, fit, report_path):
            state = (r.accelerate or {}).get("distributed_type", "-")
            n = len((r.applied or {}).get("assigned", []))
            reported = len(r.metrics)
            console.say(f"worker {r.rank}: ok, {n} variables set, accelerate {state}, {reported} reports")


def check_workers(spec: Mapping[str, Any], workers: int) -> None:
    """``--workers`` must be the processes the spec's parallelism sizes were planned for (C28).

    Inside a RayJob the launch line carries the count compile() planned for; by hand, a different
    count would fail in every worker once Accelerate builds its ParallelismConfig.
    """
    entries = [e for e in spec.get("env") or [] if isinstance(e, dict)]
    env = {str(e.get("name")): str(e.get("value")) for e in entries}
    sources = {str(e.get("name")): str(e.get("source")) for e in entries}
    try:
        check_world_size(env, sources, workers, f"--workers {workers}")
    except ProcessCountError as exc:
        raise OptimEnvError(
            f"--workers: {workers} Ray Train workers, but the spec's parallelism sizes multiply to "
            f"{exc.product} ({exc.field}); pass --workers {exc.product}, or render the spec for {workers}"
        ) from None


def _fit(
    console: Console, address: str | None, fit: Callable[[], list[WorkerReport]], report_path: Path | None
) -> list[WorkerReport]:
    """``fit()`` on a Ray cluster; every worker's report written to ``report_path`` either way."""
    from optimenv._ray_driver import ray_cluster, wait_for
    from optimenv.bootstrap.ray import LaunchError, reports_json

    with ray_cluster(console, address):
        try:
            reports = wait_for(fit, console)
        except LaunchError as exc:
            if report_path is not None:
                _write_report(report_path, reports_json(exc.reports))
            for line in exc.failure_lines():
                console.say(line)
            console.say(f"error: {exc}")
            console.say(f"log: {console.log_path}")
            raise click.exceptions.Exit(exc.exit_code) from None
    if report_path is not None:
        _write_report(report_path, reports_json(reports))
    return reports


def _write_report(path: Path, text: str) -> None:
    try:
        write_atomically(path, text)
    except OSError as exc:
        raise OptimEnvError(f"--report: cannot write {path}: {exc.strerror or exc}") from None
