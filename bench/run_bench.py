"""Time to first step: ``optimenv run`` vs a bare Ray ``TorchTrainer`` running the same script.

Both are started as fresh processes (each starts its own local Ray cluster), alternating, and
timed from the outside: from process start to the first line that says a step is done (the bare
script prints ``step 0 loss``; ``optimenv run`` shows ``training: 1/3 steps`` when rank 0's first
step reaches the driver). The ratio of the medians is what optimenv adds (plan, spec, bootstrap in
each worker).

    .venv/bin/python bench/run_bench.py [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BARE = """
import os, sys
import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

def loop(config):
    os.environ["ACCELERATE_USE_CPU"] = "true"  # what optimenv's Ray mode sets on CPU workers
    from optimenv.train_tiny import main
    main(["--steps", "3", "--micro-batch-size", "2"])

ray.init(address="local", include_dashboard=False)
TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=int(sys.argv[1]), use_gpu=False)).fit()
ray.shutdown()
"""


def time_to_first_step(cmd: list[str], marker: str) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    first = None
    with subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if first is None and marker in line:
                first = time.perf_counter() - started
        code = proc.wait()
    total = time.perf_counter() - started
    if code != 0 or first is None:
        raise SystemExit(f"{cmd[:4]} failed with exit code {code}")
    return first, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    optimenv_cmd = [
        sys.executable,
        "-m",
        "optimenv.cli",
        "run",
        "examples/fsdp2-cpu.yaml",
        "--workers",
        str(args.workers),
        "--steps",
        "3",
    ]
    bare_cmd = [sys.executable, "-c", BARE, str(args.workers)]
    results: dict[str, list[tuple[float, float]]] = {"optimenv run": [], "bare TorchTrainer": []}
    paths = (("optimenv run", optimenv_cmd, "training: 1/"), ("bare TorchTrainer", bare_cmd, "step 0 loss"))
    for i in range(args.repeats):
        for name, cmd, marker in paths:
            first, total = time_to_first_step(cmd, marker)
            results[name].append((first, total))
            print(f"run {i + 1} {name}: first step {first:.1f}s, total {total:.1f}s", file=sys.stderr)
    print(f"{'path':<20} {'first step min/median/max (s)':<32} {'total median (s)':>16}")
    medians = {}
    for name, runs in results.items():
        firsts = [r[0] for r in runs]
        medians[name] = statistics.median(firsts)
        print(
            f"{name:<20} {min(firsts):6.1f} / {medians[name]:6.1f} / {max(firsts):6.1f}"
            f"{'':<8} {statistics.median(r[1] for r in runs):16.1f}"
        )
    ratio = medians["optimenv run"] / medians["bare TorchTrainer"]
    print(f"ratio (optimenv / bare), median time to first step: {ratio:.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
