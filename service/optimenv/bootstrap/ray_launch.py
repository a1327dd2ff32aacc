"""``optimenv ray-launch``: run a training script in Ray Train workers with the plan applied in each."""

from __future__ import annotations

from pathlib import Path

import click

from optimenv.spec import SPEC_ENV


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
    script: str,
    args: tuple[str, ...],
) -> None:
    """Run SCRIPT [ARGS...] in Ray Train (V2) workers, applying the spec in each before it starts.

    Exit status: 0 when every worker succeeded; else the failing script's exit code (1 for an
    exception or a refusal), with each failing worker's traceback on stderr.
    """
    from optimenv.bootstrap.ray import LaunchError, MetricsRecord, launch, reports_json

    def show(record: MetricsRecord) -> None:
        values = " ".join(f"{key}={value}" for key, value in record.metrics.items())
        click.echo(f"worker {record.rank} step {record.step}: {values}", err=True)

    try:
        reports = launch(
            spec,
            script,
            args,
            workers=workers,
            use_gpu=False if cpu else None,
            module=module,
            address=address,
            storage_path=storage_path,
            name=name,
            on_report=show if progress else None,
        )
    except LaunchError as exc:
        if report_path is not None:
            report_path.write_text(reports_json(exc.reports), encoding="utf-8")
        for r in exc.reports:
            if r.exit_code != 0 and r.finished_at is not None:
                click.echo(
                    f"--- worker {r.rank} (exit {r.exit_code}) ---\n{(r.error or '').rstrip()}", err=True
                )
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(exc.exit_code) from None
    if report_path is not None:
        report_path.write_text(reports_json(reports), encoding="utf-8")
    for r in reports:
        state = (r.accelerate or {}).get("distributed_type", "-")
        n = len((r.applied or {}).get("assigned", []))
        click.echo(
            f"worker {r.rank}: ok, {n} variables set, accelerate {state}, {len(r.metrics)} reports", err=True
        )
