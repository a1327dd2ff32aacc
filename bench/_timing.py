"""Shared by the microbenchmarks: time callables and print one table against a baseline row."""

from __future__ import annotations

import os
import platform
import statistics
import timeit
from collections.abc import Callable, Iterable
from importlib import metadata

Row = tuple[str, float, float, float]  # label, min µs, median µs, baseline min µs


def time_call(func: Callable[[], object], repeat: int, number: int) -> tuple[float, float]:
    """(min, median) µs per call over ``repeat`` timings of ``number`` calls."""
    runs = timeit.repeat(func, repeat=repeat, number=number)
    per_call = [t / number * 1e6 for t in runs]
    return min(per_call), statistics.median(per_call)


def time_cases(name: str, timed: dict[str, tuple[Callable[[], object], int]], repeat: int) -> list[Row]:
    """Time each case; the first one is the baseline the others are divided by."""
    rows: list[Row] = []
    base = 0.0
    for label, (func, number) in timed.items():
        best, median = time_call(func, repeat, max(number, 1))
        base = base or best
        rows.append((f"{name}: {label}", best, median, base))
    return rows


def print_table(rows: Iterable[Row], *, packages: tuple[str, ...], note: str, ratio: str, width: int) -> None:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    cpu = platform.processor() or platform.machine()
    print(f"# Python {platform.python_version()} on {cpu}, {os.cpu_count()} CPUs, {versions}")
    print(f"# {note}")
    print(f"{'case':{width}} {'min µs':>9} {'median µs':>10} {ratio:>11}")
    for label, best, median, base in rows:
        print(f"{label:{width}} {best:9.2f} {median:10.2f} {best / base:11.1f}")
