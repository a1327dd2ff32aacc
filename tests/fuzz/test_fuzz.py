"""Seeded fuzzing of every entry point (issue 20): success, or one line of OptimEnvError; never more.

The cases are the same on every run (fixed seed); a breach names its case index, and
``generate(SEED, index + 1)`` rebuilds it. ``bench/fuzz_bench.py`` runs the larger fuzz with memory
caps and hang detection; this one runs in the test process, small enough for CI.
"""

from __future__ import annotations

import collections
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import Case, check, generate, write_worker_files

SEED = 20
COUNT = 4000
SCRIPT = Path(sys.executable).with_name("optimenv")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz")
    write_worker_files(path)
    return path


def test_cases_are_the_same_on_every_run() -> None:
    first = [(c.text, c.hardware, c.target, c.options, c.spec_seed) for c in generate(SEED, 200)]
    again = [(c.text, c.hardware, c.target, c.options, c.spec_seed) for c in generate(SEED, 200)]
    assert first == again
    assert len({text for text, *_ in first}) > 150  # and they differ from each other


@pytest.mark.timeout(300)
def test_every_entry_point_keeps_the_one_line_contract(folder: Path) -> None:
    breaches: list[str] = []
    outcomes: collections.Counter[str] = collections.Counter()
    for case in generate(SEED, COUNT):
        report = check(case, folder)
        breaches += [f"case {case.index}: {b}" for b in report.breaches]
        outcomes.update(f"{step} passed" for step in report.passed)
        outcomes.update(f"{step} refused" for step in report.refused)
    assert not breaches, "\n".join(breaches[:20])
    # The mix is worth running: every entry point both accepts and refuses a share of the cases.
    for step, share in (("validate", 0.1), ("render", 0.05), ("apply", 0.03)):
        assert outcomes[f"{step} passed"] > COUNT * share, outcomes
        assert outcomes[f"{step} refused"] > COUNT * share / 10, outcomes
    assert outcomes["desired-ref passed"] == COUNT  # desired() answered every case


def _sample(count: int) -> list[Case]:
    """Every 40th case: a spread of seeds and mutations."""
    return list(itertools.islice(generate(SEED, COUNT), 0, None, 40))[:count]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", _sample(8), ids=lambda c: f"case{c.index}")
def test_the_console_script_keeps_the_contract(case: Case, folder: Path) -> None:
    path = folder / f"case{case.index}.yaml"
    path.write_text(case.text, encoding="utf-8")
    for command in (
        ["plan", str(path), "-o", "json"],
        ["render", str(path), "--target", "configmaps", "--name", "ft"],
    ):
        done = subprocess.run(
            [str(SCRIPT), *command], capture_output=True, text=True, cwd=folder, timeout=60, check=False
        )
        assert done.returncode in (0, 1), done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        if done.returncode == 1:
            assert done.stdout == ""
            assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr[
                :2000
            ]
