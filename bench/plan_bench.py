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
import sys
from pathlib import Path

import yaml
from _timing import print_table, time_cases

from optimenv.config import parse_config
from optimenv.plan import Hardware, plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = {
    "FSDP2": ("fsdp2-gpu.yaml", Hardware(nodes=2, gpus_per_node=8, bf16_supported=True)),
    "ZeRO-3": ("zero3-gpu.yaml", Hardware(nodes=2, gpus_per_node=8, bf16_supported=True)),
    "parallelism (HSDP 2x2)": ("parallel-gpu.yaml", Hardware(nodes=1, gpus_per_node=4, bf16_supported=True)),
}


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
        rows += time_cases(name, timed, args.repeat)

    print_table(
        rows,
        packages=("optimenv", "pydantic", "pydantic-core"),
        note=f"repeat={args.repeat} number={args.number} (parse_config /4, to_json /2)",
        ratio="x baseline",
        width=48,
    )


if __name__ == "__main__":
    sys.exit(main())
