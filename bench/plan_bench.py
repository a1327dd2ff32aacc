"""Microbenchmark of ``plan()`` in a warm process, against baselines measured in the same run.

Run: ``.venv/bin/python bench/plan_bench.py [--repeat N] [--number N]``. Prints one table to
stdout: µs per call (min and median over ``repeat`` timings of ``number`` calls each) and each
row's ratio to the ``dict deepcopy`` baseline (copying the parsed YAML mapping, the cheapest thing
any config pipeline does). ``parse_config`` (pydantic validation) is shown for scale: the CLI and
the controller pay it once per config, before planning.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import yaml

from optimenv.config import parse_config
from optimenv.plan import Hardware, plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = {
    "FSDP2": ("fsdp2-gpu.yaml", Hardware(nodes=2, gpus_per_node=8, bf16_supported=True)),
    "ZeRO-3": ("zero3-gpu.yaml", Hardware(nodes=2, gpus_per_node=8, bf16_supported=True)),
    "parallelism (HSDP 2x2)": ("parallel-gpu.yaml", Hardware(nodes=1, gpus_per_node=4, bf16_supported=True)),
}


def _time(func: Callable[[], object], repeat: int, number: int) -> tuple[float, float]:
    """(min, median) µs per call."""
    runs = timeit.repeat(func, repeat=repeat, number=number)
    per_call = [t / number * 1e6 for t in runs]
    return min(per_call), statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()

    rows: list[tuple[str, float, float, float]] = []  # label, min, median, baseline min
    for name, (file, hardware) in CASES.items():
        data = yaml.safe_load((EXAMPLES / file).read_text())
        config = parse_config(data, base_dirs=(EXAMPLES,))
        plan(config, hardware).to_json()  # warm: the first call pays lazy imports

        def parse(d: object = data) -> object:
            return parse_config(d, base_dirs=(EXAMPLES,))

        timed = {
            "dict deepcopy (baseline)": (lambda d=data: copy.deepcopy(d), args.number),
            "parse_config": (parse, args.number // 4),
            "plan()": (lambda c=config, h=hardware: plan(c, h), args.number),
            "plan().to_json()": (lambda c=config, h=hardware: plan(c, h).to_json(), args.number // 2),
        }
        base = 0.0
        for label, (func, number) in timed.items():
            best, median = _time(func, args.repeat, number)
            base = base or best
            rows.append((f"{name}: {label}", best, median, base))

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("optimenv", "pydantic", "pydantic-core"))
    cpu = platform.processor() or platform.machine()
    print(f"# Python {platform.python_version()} on {cpu}, {os.cpu_count()} CPUs, {versions}")
    print(f"# repeat={args.repeat} number={args.number} (parse_config /4, to_json /2)")
    print(f"{'case':48} {'min µs':>9} {'median µs':>10} {'x baseline':>11}")
    for label, best, median, base in rows:
        print(f"{label:48} {best:9.2f} {median:10.2f} {best / base:11.1f}")


if __name__ == "__main__":
    sys.exit(main())
