"""What exec mode costs before a pod's command starts, against a bare interpreter start.

    .venv/bin/python bench/bootstrap_bench.py [--runs 40]

Measured in one run, alternating the commands so load changes hit all of them alike:

* ``bare``: ``python -c pass`` (the baseline);
* ``bootstrap``: ``optimenv-bootstrap --spec S -- true`` — the bootstrap process alone (start,
  read and verify the spec, check the DeepSpeed JSON, decide the deferred steps, exec);
* ``bootstrap + python``: ``optimenv-bootstrap --spec S -- python -c pass`` — what a pod pays.

The spec is a ZeRO-3 DeepSpeed plan with ``bf16: auto`` (four deferred steps), the common case.
Also: the import time of ``optimenv.bootstrap`` (``python -X importtime``, cumulative) and which
heavy packages exec mode loaded (it must load none). Prints a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from optimenv.config import parse_config
from optimenv.plan import Hardware, plan
from optimenv.spec import build_spec, deepspeed_text, spec_text

PY = sys.executable
BOOTSTRAP = str(Path(sys.executable).parent / "optimenv-bootstrap")
HEAVY = ("torch", "accelerate", "transformers", "deepspeed", "ray", "pydantic", "yaml", "click")


def _spec(folder: Path) -> Path:
    ds = folder / "deepspeed.json"
    config = {"base_model": "m", "deepspeed": "zero3", "gradient_accumulation_steps": 4}
    doc = build_spec(plan(parse_config(config), Hardware(), deepspeed_path=str(ds)))
    ds.write_text(deepspeed_text(doc["deepspeed"]))
    spec = folder / "spec.json"
    spec.write_text(spec_text(doc))
    return spec


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _import_ms(env: dict[str, str], runs: int) -> float:
    """Median cumulative import time of the exec-mode modules, in ms."""
    values = []
    for _ in range(runs):
        out = subprocess.run(
            [PY, "-X", "importtime", "-c", "import optimenv.bootstrap.__main__, optimenv.bootstrap._apply"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        total = 0
        for line in out.splitlines():
            parts = line.split("|")
            # Top-level modules (no indentation) that this import pulled in, cumulative each.
            if len(parts) == 3 and parts[2].strip().startswith("optimenv") and not parts[2].startswith("  "):
                total += int(parts[1])
        values.append(total / 1000)
    return statistics.median(values)


def _heavy_loaded(spec: Path, env: dict[str, str]) -> list[str]:
    code = (
        "import os, sys\n"
        "from optimenv.bootstrap._apply import apply_spec\n"
        f"apply_spec({str(spec)!r}, dict(os.environ), in_process=False)\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    return subprocess.run(
        [PY, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    # Compiled bytecode, as an installed wheel has it (the warm-up runs write the .pyc files).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "FSDP_", "OPTIMENV_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(Path(tmp))
        commands = {
            "bare `python -c pass`": [PY, "-c", "pass"],
            "`optimenv-bootstrap -- true`": [BOOTSTRAP, "-q", "--spec", str(spec), "--", "true"],
            "`optimenv-bootstrap -- python -c pass`": [
                BOOTSTRAP,
                "-q",
                "--spec",
                str(spec),
                "--",
                PY,
                "-c",
                "pass",
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(3):  # warm the page cache and .pyc files
            for cmd in commands.values():
                _time(cmd, env)
        for _ in range(args.runs):
            for name, cmd in commands.items():
                times[name].append(_time(cmd, env))
        imports = _import_ms(env, max(5, args.runs // 4))
        heavy = _heavy_loaded(spec, env)

    base = statistics.median(times["bare `python -c pass`"])
    print(f"runs per command: {args.runs} (alternating), medians; {os.cpu_count()} CPUs")
    print()
    print("| command | median ms | ratio to bare python |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.1f} | {median / base:.2f}x |")
    added = statistics.median(times["`optimenv-bootstrap -- python -c pass`"]) - base
    print()
    print(f"time exec mode adds before the command: {added * 1000:.1f} ms")
    print(f"import time of optimenv.bootstrap (exec path, -X importtime, cumulative): {imports:.1f} ms")
    print(f"heavy packages loaded by exec mode: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
