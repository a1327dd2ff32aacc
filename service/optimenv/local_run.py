"""``optimenv run`` (the command is :mod:`optimenv.cli.run`): launch on a local Ray cluster, report.

config → :func:`optimenv.compile` (this machine as the topology) → worker spec → each Ray Train
worker applies it → Accelerate → training steps; then a report of what was asked and what
Accelerate really did.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from optimenv._console import Console
from optimenv._ray_driver import ray_cluster, wait_for
from optimenv.plan import Plan
from optimenv.spec import WorkerSpec


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


def loss_summary(losses: list[Any]) -> dict[str, Any] | None:
    """First and last reported loss and the relative change, or None without numeric losses."""
    numbers = [float(x) for x in losses if isinstance(x, int | float)]
    if not numbers:
        return None
    first, last = numbers[0], numbers[-1]
    change = (last - first) / first if first else None
    return {"first": first, "last": last, "change": change, "steps": len(numbers)}


def build_report(
    result: Plan, reports: list[Any], timings: Timings, use_gpu: bool, log_path: Path | None = None
) -> dict[str, Any]:
    requested = requested_setup(result)
    nodes = len({r.node_rank for r in reports if r.node_rank is not None})
    workers = []
    for r in reports:
        effective = effective_setup(r.accelerate)
        applied = r.applied or {}
        losses = [m.metrics.get("loss") for m in sorted(r.metrics, key=lambda m: m.step or 0)]
        workers.append(
            {
                "rank": r.rank,
                "local_rank": r.local_rank,
                "node_rank": r.node_rank,
                "nodes": nodes,
                "requested": requested,
                "effective": effective,
                "differences": _differences(requested, effective, use_gpu),
                "applied": {
                    v["name"]: v["value"] for v in [*applied.get("assigned", []), *applied.get("kept", [])]
                },
                "decisions": applied.get("decisions", []),
                "losses": losses,
                "loss": loss_summary(losses),
                "exit_code": r.exit_code,
            }
        )
    return {
        "planned": sorted(result.env_dict),
        "workers": workers,
        "device": "gpu" if use_gpu else "cpu",
        "log": str(log_path) if log_path else None,
        "timings": {
            "cluster_start_s": timings.cluster_s,
            "first_step_s": timings.first_step_s,
            "total_s": timings.total_s,
        },
    }


def _loss_line(loss: dict[str, Any] | None) -> str:
    if loss is None:
        return "- (the script reported none: optimenv.bootstrap.ray.report(step, loss=...))"
    change = f" ({loss['change']:+.1%})" if loss["change"] is not None else ""
    return f"{loss['first']:.4f} -> {loss['last']:.4f}{change} over {loss['steps']} steps"


def format_report(report: dict[str, Any], output: str) -> str:
    """The report as ``output`` says: ``text`` for a person, ``json`` or ``yaml`` (the same data)."""
    if output == "json":
        return json.dumps(report, indent=2, sort_keys=True) + "\n"
    if output == "yaml":
        dumped: str = yaml.safe_dump(report, sort_keys=True, allow_unicode=True)
        return dumped
    return report_text(report)


def report_text(report: dict[str, Any]) -> str:
    """The report for a person: workers that agree on everything but their ranks share one section."""
    lines = []
    for group in _alike(report["workers"]):
        lines.append(f"{_who(group)}:")
        lines.extend(_worker_lines(group[0], report["planned"]))
    if report.get("log"):
        lines.append(f"log: {report['log']} (Ray's messages and every worker's output)")
    t = report["timings"]
    lines.append(
        "timings: cluster start {}, first step {}, total {}".format(
            *(
                f"{v:.1f}s" if v is not None else "-"
                for v in (t["cluster_start_s"], t["first_step_s"], t["total_s"])
            )
        )
    )
    return "\n".join(lines) + "\n"


_RANKS = ("rank", "local_rank", "node_rank", "exit_code")


def _alike(workers: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        key = json.dumps({k: v for k, v in w.items() if k not in _RANKS}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(w)
    return list(groups.values())


def _who(group: list[dict[str, Any]]) -> str:
    ranks = ", ".join(str(w["rank"]) for w in group)
    nodes = sorted({w["node_rank"] for w in group if w.get("node_rank") is not None})
    where = ""
    if nodes:
        label = "node" if len(nodes) == 1 else "nodes"
        where = f" ({label} {', '.join(map(str, nodes))} of {group[0]['nodes']})"
    return f"{'rank' if len(group) == 1 else 'ranks'} {ranks}{where}"


def _worker_lines(w: dict[str, Any], planned: list[str]) -> list[str]:
    req, eff = w["requested"], w["effective"]
    lines = [
        f"  requested  {req['mode']}, mixed precision {req['mixed_precision']}",
        f"  effective  {eff['mode']}, mixed precision {eff['mixed_precision']}",
    ]
    lines += [f"  NOTE       {note}" for note in w["differences"]]
    from_plan = sum(1 for name in w["applied"] if name in planned)
    lines.append(
        f"  applied    {len(w['applied'])} variables: {from_plan} from the plan, "
        f"{len(w['applied']) - from_plan} decided on the worker"
    )
    for d in w["decisions"]:
        value = f"{d['variable']}={d['value']}" if d.get("variable") and d.get("value") is not None else "-"
        lines.append(f"  decided    {d['kind']}: {value} ({d['reason']})")
    lines.append(f"  loss       {_loss_line(w['loss'])}")
    return lines


@dataclass(frozen=True)
class RunRequest:
    """What ``run`` asks of Ray: the spec, the script and how many workers."""

    spec: WorkerSpec
    target: str
    args: list[str]
    module: bool  # the shipped example (a module, whose steps are known) rather than a script
    workers: int
    cpu: bool
    steps: int


def run_workers(launch: RunRequest, console: Console, timings: Timings) -> tuple[list[Any], bool]:
    from optimenv.bootstrap.ray import LaunchError, MetricsRecord
    from optimenv.bootstrap.ray import launch as ray_launch

    with ray_cluster(console) as ray:
        timings.cluster_s = time.perf_counter() - timings.started
        use_gpu = not launch.cpu and ray.cluster_resources().get("GPU", 0) > 0
        bar = console.progress(launch.steps if launch.module else None, "training")

        def on_report(record: MetricsRecord) -> None:
            if timings.first_step_s is None:
                timings.first_step_s = time.perf_counter() - timings.started
            if record.rank == 0:
                loss = record.metrics.get("loss")
                if isinstance(loss, float):
                    bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)

        def fit() -> list[Any]:
            return ray_launch(
                launch.spec,
                launch.target,
                launch.args,
                workers=launch.workers,
                use_gpu=use_gpu,
                module=launch.module,
                on_report=on_report,
                on_output=console.show,
                poll_s=0.2,
            )

        try:
            return wait_for(fit, console, on_stop=bar.close), use_gpu
        except LaunchError as error:
            bar.close()
            for line in error.failure_lines():
                console.say(line)
            console.say(f"error: {error}")
            console.say(f"log: {console.log_path}")
            raise click.exceptions.Exit(error.exit_code) from None
        finally:
            bar.close()
