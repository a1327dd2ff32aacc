"""Microbenchmark of ``render()`` per target, against ``plan()`` of the same config in the same run.

Run: ``.venv/bin/python bench/render_bench.py [--repeat N] [--number N]``. Prints one table to
stdout: µs per call (min and median over ``repeat`` timings of ``number`` calls each) and the
ratio to ``plan()`` (the baseline: the step before rendering, which every caller pays anyway).
``compile()`` (plan, spec and render together, what every front end calls) and ``to_yaml`` (what
``optimenv render -o yaml`` adds) are shown for scale. The controller renders
once per reconcile of an ``OptimEnv``, so this is its per-object CPU cost beside the API calls.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from _timing import print_table, time_cases

from optimenv.compiler import compile
from optimenv.config import TrainingConfig, parse_config
from optimenv.plan import plan
from optimenv.render import Request, render, to_yaml
from optimenv.workload import TARGETS, JobSpec, Target, Topology

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Example -> (nodes, GPUs per node); HSDP 2x2 needs exactly 4 processes.
CASES = {
    "FSDP2": ("fsdp2-gpu.yaml", 2, 8),
    "ZeRO-3": ("zero3-gpu.yaml", 2, 8),
    "HSDP 2x2": ("parallel-gpu.yaml", 2, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--number", type=int, default=500)
    args = parser.parse_args()

    rows: list[tuple[str, float, float, float]] = []
    for name, (file, nodes, gpus) in CASES.items():
        topology = Topology(nodes=nodes, gpus_per_node=gpus, bf16_supported=True)
        config = parse_config(yaml.safe_load((EXAMPLES / file).read_text()), base_dirs=(EXAMPLES,))
        hardware = topology.hardware()
        timed: dict[str, tuple[Callable[[], object], int]] = {
            "plan() (baseline)": (lambda c=config, h=hardware: plan(c, h), args.number),
        }
        for target in TARGETS:
            request = _request(config, topology, target)
            planned = plan(config, topology.hardware(request.launch))
            render(planned, request)  # warm
            timed[f"render {target}"] = (lambda p=planned, r=request: render(p, r), args.number)
        job = compile(config, topology, _job("trainjob"), name="ft")
        timed["compile() trainjob"] = (
            lambda c=config, t=topology: compile(c, t, _job("trainjob"), name="ft"),
            args.number,
        )
        timed["to_yaml(trainjob objects)"] = (lambda o=job.objects: to_yaml(o), max(args.number // 10, 1))
        rows += time_cases(name, timed, args.repeat)

    print_table(
        rows,
        packages=("optimenv", "pydantic", "pyyaml"),
        note=f"repeat={args.repeat} number={args.number} (to_yaml /10)",
        ratio="x plan()",
        width=40,
    )


def _job(target: Target) -> Target | JobSpec:
    if target == "configmaps":
        return target
    return JobSpec(target=target, image="registry.example.com/train:1.0", command=["python", "train.py"])


def _request(config: TrainingConfig, topology: Topology, target: Target) -> Request:
    """What compile() hands the renderer for ``target``, so render() alone is timed."""
    job = _job(target)
    done = compile(config, topology, job)
    return Request(
        target, "ft", "default", {}, job if isinstance(job, JobSpec) else None, done.launch, done.spec
    )


if __name__ == "__main__":
    sys.exit(main())
