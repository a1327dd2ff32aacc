"""Fuzz benchmark: hostile configs and worker specs through every entry point, under a memory cap.

Cases come from tests/fuzz/harness.py (the in-suite fuzz runs a small share of the same generator)
at full size: megabyte aliases, 1.5 million values, 100,000-deep nesting. Each worker process runs
its share of the cases in-process (validate, plan, render, the bootstrap's apply, the controller's
``desired()``) under RLIMIT_AS (default: the chart's 512 MiB); a case that does not finish within
``--hang-seconds`` is a hang (the worker is killed and replaced), one that runs out of memory is
"over memory", any other exception or a refusal of more than one line is a traceback. Then a sample
runs through the installed console script. Baseline in the same run: the median time of a case.

    .venv/bin/python bench/fuzz_bench.py [--count 12000] [--workers 2] [--cli 200]

The last line is ``fuzz: <G> generated, <T> tracebacks, <H> hangs, <M> over memory``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzz.harness import check, generate, write_worker_files  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus" / "axolotl" / "examples"
BIN = Path(sys.executable).parent


def _corpus(folder: Path | None) -> tuple[Path, ...]:
    return tuple(sorted(folder.rglob("*.yaml"))) if folder and folder.is_dir() else ()


def _folder(args: argparse.Namespace) -> Path:
    """A folder with the files the cases name, and the corpus's DeepSpeed JSONs its configs name."""
    folder = Path(tempfile.mkdtemp(prefix="optimenv-fuzz-"))
    write_worker_files(folder)
    shipped = args.corpus.parent / "deepspeed_configs" if args.corpus else None
    if shipped and shipped.is_dir():
        shutil.copytree(shipped, folder / "deepspeed_configs")
    return folder


def _cap(mib: int) -> None:
    limit = mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(args: argparse.Namespace) -> None:
    """Run cases ``index % workers == worker_id`` from ``--start``; one JSON line per event on stdout."""
    _cap(args.memory_mib)
    folder = _folder(args)
    for case in generate(args.seed, args.count, scale=args.scale, extra_seeds=_corpus(args.corpus)):
        if case.index < args.start or case.index % args.workers != args.worker_id:
            continue
        print(json.dumps({"start": case.index}), flush=True)
        began = time.perf_counter()
        report = check(case, folder)
        print(
            json.dumps(
                {
                    "index": case.index,
                    "breaches": report.breaches,
                    "over_memory": report.over_memory,
                    "seconds": time.perf_counter() - began,
                    "steps": [f"{s} passed" for s in report.passed]
                    + [f"{s} refused" for s in report.refused],
                }
            ),
            flush=True,
        )


class Tally:
    def __init__(self) -> None:
        self.generated = 0
        self.tracebacks: list[str] = []
        self.hangs: list[int] = []
        self.over_memory: list[int] = []
        self.seconds: list[float] = []
        self.steps: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.slowest = (0.0, -1)  # (seconds, case index)

    def add(self, result: dict[str, Any]) -> None:
        with self.lock:
            self.generated += 1
            self.seconds.append(result["seconds"])
            self.slowest = max(self.slowest, (result["seconds"], result["index"]))
            self.steps.update(result["steps"])
            if result["over_memory"]:
                self.over_memory.append(result["index"])
            else:
                self.tracebacks += [f"case {result['index']}: {b}" for b in result["breaches"]]
            if self.generated % 1000 == 0:
                print(f"{self.generated} cases", file=sys.stderr, flush=True)

    def lost(self, index: int, hung: bool, code: int, err: str) -> None:
        """A worker killed as hung, or dead on a case (out of memory, or a crash below Python)."""
        with self.lock:
            self.generated += 1
            if hung:
                self.hangs.append(index)
            elif "MemoryError" in err or code < 0:
                self.over_memory.append(index)
            else:
                self.tracebacks.append(f"case {index}: worker died ({code}): {err[-300:]}")


def _spawn(args: argparse.Namespace, worker_id: int, start: int, err: Any) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--worker", "--worker-id", str(worker_id), "--start", str(start)]
    for name in ("count", "seed", "workers", "scale", "memory_mib"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.corpus:
        argv += ["--corpus", str(args.corpus)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)


class _Lines:
    """Lines of a pipe with a timeout (select on the raw descriptor: nothing hides in a buffer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def next(self, timeout: float) -> str | None:
        """The next line; "" at the end; None when nothing came within ``timeout`` seconds."""
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return ""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def _drive_all(args: argparse.Namespace, tally: Tally, worker_id: int) -> None:
    start: int | None = worker_id
    while start is not None:
        start = _drive(args, tally, worker_id, start)


def _drive(args: argparse.Namespace, tally: Tally, worker_id: int, start: int) -> int | None:
    """One worker process from case ``start``; the case to restart at, or None when it finished."""
    with tempfile.TemporaryFile() as err:
        proc = _spawn(args, worker_id, start, err)
        assert proc.stdout is not None
        lines = _Lines(proc.stdout.fileno())
        current: int | None = None
        while True:
            # Between cases the worker may be generating up to ``start``: give that its own time.
            line = lines.next(args.hang_seconds if current is not None else args.hang_seconds + 300)
            if line:
                event = json.loads(line)
                current = event.get("start")
                if "index" in event:
                    tally.add(event)
                continue
            if line is None:
                proc.kill()
            code = proc.wait()
            if current is None:
                return None  # finished (or died between cases: nothing to charge)
            err.seek(0)
            tally.lost(current, line is None, code, err.read().decode(errors="replace"))
            return current + args.workers


def run_cli_sample(args: argparse.Namespace, tally: Tally) -> int:
    """Every n-th case through ``optimenv plan -o json`` and ``render`` as a user runs them."""
    folder = _folder(args)
    step = max(1, args.count // max(args.cli, 1))
    cases = [
        c
        for c in generate(args.seed, args.count, scale=args.scale, extra_seeds=_corpus(args.corpus))
        if c.index % step == 0
    ][: args.cli]

    def one(case: Any) -> list[str]:
        path = folder / f"case{case.index}.yaml"
        path.write_text(case.text, encoding="utf-8")
        found = []
        for command in (
            ["plan", str(path), "-o", "json"],
            ["render", str(path), "--target", "configmaps", "--name", "ft"],
        ):
            try:
                done = subprocess.run(
                    [str(BIN / "optimenv"), *command],
                    capture_output=True,
                    text=True,
                    cwd=folder,
                    timeout=args.hang_seconds,
                    check=False,
                    preexec_fn=lambda: _cap(args.memory_mib),
                )
            except subprocess.TimeoutExpired:
                tally.hangs.append(case.index)
                continue
            lines = done.stderr.splitlines()
            if "MemoryError" in done.stderr:
                tally.over_memory.append(case.index)
            elif (
                done.returncode not in (0, 1)
                or "Traceback" in done.stderr
                or (done.returncode == 1 and (len(lines) != 1 or done.stdout))
            ):
                found.append(
                    f"cli case {case.index} {command[0]}: exit {done.returncode}: {done.stderr[-300:]}"
                )
        return found

    with ThreadPoolExecutor(args.workers) as pool:
        for found in pool.map(one, cases):
            tally.tracebacks += found
    tally.generated += len(cases)
    return len(cases)


def time_loaders(args: argparse.Namespace) -> list[str]:
    """The bounded YAML loader against PyYAML's own loaders, on real configs and on 99,990 values."""
    import timeit

    import yaml

    from optimenv.config import parse_yaml

    files = sorted((REPO / "examples").glob("*.yaml")) + list(_corpus(args.corpus))
    texts = [p.read_text() for p in files]
    bulk = "x: [" + ",".join(["1"] * 99_990) + "]\n"
    loaders = {
        "yaml.safe_load (baseline)": lambda t: yaml.safe_load(t),
        "yaml CSafeLoader": lambda t: yaml.load(t, Loader=yaml.CSafeLoader),
        "optimenv parse_yaml": parse_yaml,
    }
    lines = [f"YAML loaders: {len(texts)} configs (µs per config) and one document of 99,990 values (ms)"]
    base: tuple[float, float] | None = None
    for name, load in loaders.items():
        configs = min(timeit.repeat(lambda ld=load: [ld(t) for t in texts], number=3, repeat=5)) / 3
        values = min(timeit.repeat(lambda ld=load: ld(bulk), number=1, repeat=3))
        base = base or (configs, values)
        lines.append(
            f"  {name:26} {configs / len(texts) * 1e6:8.0f} µs {configs / base[0]:5.2f}x"
            f" {values * 1e3:8.0f} ms {values / base[1]:5.2f}x"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--scale", type=float, default=1.0, help="size of the hostile documents")
    parser.add_argument("--cli", type=int, default=200, help="cases also run through the console script")
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--corpus", type=Path, default=CORPUS if CORPUS.is_dir() else None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    tally = Tally()
    began = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:  # one driver thread per worker process
        list(pool.map(lambda w: _drive_all(args, tally, w), range(args.workers)))
    in_process = time.perf_counter() - began
    cli = run_cli_sample(args, tally) if args.cli else 0
    _print(args, tally, in_process, cli, time_loaders(args))


def _print(args: argparse.Namespace, tally: Tally, seconds: float, cli: int, loaders: list[str]) -> None:
    median = statistics.median(tally.seconds) if tally.seconds else 0.0
    slowest, slowest_case = tally.slowest
    print(
        f"# Python {platform.python_version()}, {os.cpu_count()} CPUs, {args.workers} workers, "
        f"RLIMIT_AS {args.memory_mib} MiB, hang after {args.hang_seconds:.0f} s, seed {args.seed}, "
        f"scale {args.scale}, corpus {'yes' if args.corpus else 'no'}"
    )
    print("\n".join(loaders))
    print(
        f"in-process: {len(tally.seconds)} cases in {seconds:.0f} s; median case {median * 1000:.1f} ms "
        f"(baseline), slowest {slowest:.2f} s, case {slowest_case} "
        f"({slowest / median if median else 0:.0f}x the median)"
    )
    for step in sorted({s.rsplit(" ", 1)[0] for s in tally.steps}):
        print(
            f"  {step:16} {tally.steps[step + ' passed']:6} passed {tally.steps[step + ' refused']:6} refused"
        )
    print(f"console script: {cli} cases x 2 commands")
    for line in tally.tracebacks[:20]:
        print(f"  {line}")
    for name, cases in (("hangs", tally.hangs), ("over memory", tally.over_memory)):
        if cases:
            print(f"  {name}: cases {sorted(cases)[:20]}")
    print(
        f"fuzz: {tally.generated} generated, {len(tally.tracebacks)} tracebacks, {len(tally.hangs)} hangs, "
        f"{len(tally.over_memory)} over memory"
    )


if __name__ == "__main__":
    main()
