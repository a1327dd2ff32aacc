"""``optimenv run``: the whole path on one machine, through a local Ray cluster.

config → plan (with this machine's hardware) → worker spec → each Ray Train worker applies it →
Accelerate → training steps; then a report of what was asked and what Accelerate really did.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from optimenv.cli import read_config
from optimenv.errors import OptimEnvError
from optimenv.plan import Hardware, Plan, plan
from optimenv.spec import build_spec

DEFAULT_SCRIPT = "optimenv.train_tiny"


@dataclass
class Timings:
    started: float = field(default_factory=time.perf_counter)
    cluster_s: float | None = None
    first_step_s: float | None = None
    total_s: float | None = None


def requested_setup(result: Plan) -> dict[str, Any]:
    """What the plan asks Accelerate for, in the words of Accelerate's state."""
    env = result.env_dict
    if env.get("ACCELERATE_USE_FSDP") == "true":
        mode = f"FSDP{result.fsdp_version or 1}"
    elif env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        mode = f"DEEPSPEED (ZeRO-{result.zero_stage})" if result.zero_stage is not None else "DEEPSPEED"
    else:
        mode = "DDP"
    return {"mode": mode, "mixed_precision": result.mixed_precision or "auto (decided on the worker)"}


def effective_setup(accelerate: dict[str, Any] | None) -> dict[str, Any]:
    if not accelerate:
        return {"mode": "unknown (Accelerate was not started)", "mixed_precision": None}
    kind = str(accelerate.get("distributed_type"))
    if kind == "FSDP":
        mode = f"FSDP{accelerate.get('fsdp_version') or 1}"
    elif kind == "DEEPSPEED":
        stages = [p.get("zero_stage") for p in (accelerate.get("deepspeed") or {}).values()]
        mode = f"DEEPSPEED (ZeRO-{stages[0]})" if stages else "DEEPSPEED"
    else:
        mode = kind
    return {"mode": mode, "mixed_precision": accelerate.get("mixed_precision")}


def _differences(requested: dict[str, Any], effective: dict[str, Any], use_gpu: bool) -> list[str]:
    notes = []
    if requested["mode"] != effective["mode"] and not (
        requested["mode"] == "DDP" and effective["mode"] in ("MULTI_CPU", "MULTI_GPU", "NO")
    ):
        why = "" if use_gpu else " (on CPU, Accelerate turns on neither FSDP nor DeepSpeed)"
        notes.append(f"asked for {requested['mode']}, Accelerate runs {effective['mode']}{why}")
    asked = requested["mixed_precision"]
    got = effective["mixed_precision"]
    if got is not None and not asked.startswith("auto") and asked != got:
        notes.append(f"asked for mixed precision {asked}, Accelerate uses {got}")
    return notes


def build_report(result: Plan, reports: list[Any], timings: Timings, use_gpu: bool) -> dict[str, Any]:
    requested = requested_setup(result)
    workers = []
    for r in reports:
        effective = effective_setup(r.accelerate)
        applied = r.applied or {}
        losses = [m.metrics.get("loss") for m in sorted(r.metrics, key=lambda m: m.step or 0)]
        workers.append(
            {
                "rank": r.rank,
                "requested": requested,
                "effective": effective,
                "differences": _differences(requested, effective, use_gpu),
                "applied": {
                    v["name"]: v["value"] for v in [*applied.get("assigned", []), *applied.get("kept", [])]
                },
                "decisions": applied.get("decisions", []),
                "losses": losses,
                "exit_code": r.exit_code,
            }
        )
    return {
        "planned": sorted(result.env_dict),
        "workers": workers,
        "device": "gpu" if use_gpu else "cpu",
        "timings": {
            "cluster_start_s": timings.cluster_s,
            "first_step_s": timings.first_step_s,
            "total_s": timings.total_s,
        },
    }


def report_text(report: dict[str, Any]) -> str:
    lines = []
    t = report["timings"]
    for w in report["workers"]:
        req, eff = w["requested"], w["effective"]
        losses = ", ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in w["losses"])
        lines.append(f"rank {w['rank']}:")
        lines.append(f"  requested  {req['mode']}, mixed precision {req['mixed_precision']}")
        lines.append(f"  effective  {eff['mode']}, mixed precision {eff['mixed_precision']}")
        for note in w["differences"]:
            lines.append(f"  NOTE       {note}")
        planned = sum(1 for name in w["applied"] if name in report["planned"])
        lines.append(
            f"  applied    {len(w['applied'])} variables: {planned} from the plan, "
            f"{len(w['applied']) - planned} decided on the worker"
        )
        for d in w["decisions"]:
            value = (
                f"{d['variable']}={d['value']}" if d.get("variable") and d.get("value") is not None else "-"
            )
            lines.append(f"  decided    {d['kind']}: {value} ({d['reason']})")
        lines.append(f"  losses     {losses}")
    lines.append(
        "timings: cluster start {}, first step {}, total {}".format(
            *(
                f"{v:.1f}s" if v is not None else "-"
                for v in (t["cluster_start_s"], t["first_step_s"], t["total_s"])
            )
        )
    )
    return "\n".join(lines) + "\n"


@click.command(name="run")
@click.argument("config")
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Ray Train workers."
)
@click.option("--steps", type=click.IntRange(min=1), help="Steps of the shipped example (default 3).")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run_command(
    config: str, workers: int, steps: int | None, output: str, script_args: tuple[str, ...]
) -> None:
    """Train CONFIG on this machine: a local Ray cluster (or $RAY_ADDRESS), N workers, the plan in each.

    Without `-- SCRIPT ARGS...` it trains the shipped tiny Llama (nothing is downloaded).
    """
    cfg = read_config(config)
    if script_args and steps is not None:
        raise OptimEnvError(
            "--steps: applies to the shipped example only; give your script its own arguments"
        )
    if script_args and not Path(script_args[0]).is_file():
        raise OptimEnvError(f"script: {script_args[0]}: no such file")
    timings = Timings()
    # One node, one process per worker. Whether the GPUs do bf16/fp8 and which torch the workers
    # have is left to the bootstrap in each worker (the driver imports no torch: it starts faster).
    hardware = Hardware(nodes=1, gpus_per_node=workers)
    with tempfile.TemporaryDirectory(prefix="optimenv-run-") as tmp:
        result = plan(cfg, hardware, deepspeed_path=str(Path(tmp) / "deepspeed.json"))
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        spec = build_spec(result)
        if script_args:
            target, args, module = script_args[0], list(script_args[1:]), False
        else:
            mbs = str(cfg.micro_batch_size or 1)
            target, args, module = (
                DEFAULT_SCRIPT,
                ["--steps", str(steps or 3), "--micro-batch-size", mbs],
                True,
            )
        reports, use_gpu = _launch(spec, target, args, module, workers, timings, steps or 3)
    timings.total_s = time.perf_counter() - timings.started
    report = build_report(result, reports, timings, use_gpu)
    if output == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(report_text(report), nl=False)


def _launch(
    spec: dict[str, Any],
    target: str,
    args: list[str],
    module: bool,
    workers: int,
    timings: Timings,
    steps: int,
) -> tuple[list[Any], bool]:
    # Keep a local cluster on loopback and quiet; a user's own settings win.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from tqdm import tqdm

    from optimenv.bootstrap.ray import LaunchError, MetricsRecord, launch

    click.echo(
        "starting Ray ..." if not os.environ.get("RAY_ADDRESS") else "joining $RAY_ADDRESS ...", err=True
    )
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    try:
        timings.cluster_s = time.perf_counter() - timings.started
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus >= workers
        if 0 < gpus < workers:
            click.echo(f"warning: {gpus:g} GPU(s) for {workers} workers: training on CPU workers", err=True)
        bar = tqdm(total=steps if module else None, desc="training", unit="step", file=sys.stderr)

        def on_report(record: MetricsRecord) -> None:
            if timings.first_step_s is None:
                timings.first_step_s = time.perf_counter() - timings.started
            if record.rank == 0:
                loss = record.metrics.get("loss")
                if isinstance(loss, float):
                    bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)

        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["reports"] = launch(
                    spec,
                    target,
                    args,
                    workers=workers,
                    use_gpu=use_gpu,
                    module=module,
                    on_report=on_report,
                    poll_s=0.2,
                )
            except BaseException as exc:  # handed to the main thread below
                outcome["error"] = exc

        # Ray Train installs its own SIGINT handler when fit() runs on the main thread (a graceful
        # abort that exits 0 or 1); on a helper thread Ctrl-C stays ours: stop everything, exit 130.
        runner = threading.Thread(target=fit, name="optimenv-fit", daemon=True)
        runner.start()
        try:
            while runner.is_alive():
                runner.join(0.2)
        except KeyboardInterrupt:
            bar.close()
            click.echo("interrupted: stopping the workers and the local Ray cluster", err=True)
            raise click.exceptions.Exit(130) from None
        finally:
            bar.close()
        error = outcome.get("error")
        if isinstance(error, LaunchError):
            for r in error.reports:
                if r.exit_code != 0:
                    click.echo(
                        f"--- worker {r.rank} (exit {r.exit_code}) ---\n{(r.error or '').rstrip()}", err=True
                    )
            click.echo(f"error: {error}", err=True)
            raise click.exceptions.Exit(error.exit_code)
        if error is not None:
            raise error
        reports: list[Any] = outcome["reports"]
        return reports, use_gpu
    finally:
        ray.shutdown()
