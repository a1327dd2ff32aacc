"""A newcomer's first hour: a fresh clone tests green, a base install plans, extras are named.

The clone is the repository's files as a fresh clone has them (tracked and not ignored, as they
are in this working tree), in a folder with nothing beside it: no ``../shared``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from optimenv.config import load_config
from optimenv.plan import plan
from tests.conftest import REPO, SHARED_MISSING

CONSTRAINTS = REPO / "constraints.txt"
# Started by the subprocesses below; never the reference material or CI's demand for it.
_DROP = ("OPTIMENV_SHARED", "OPTIMENV_REQUIRE_SHARED", "PYTHONPATH", "VIRTUAL_ENV")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("PYTEST_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _run(argv: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float) -> Any:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _fresh_clone(parent: Path) -> Path:
    """Copy what a clone would hold into ``parent/optimenv``; ``parent`` holds nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    clone = parent / "optimenv"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a file deleted in the working tree is listed but gone
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    assert sorted(p.name for p in parent.iterdir()) == ["optimenv"]
    return clone


def _pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "[" not in name, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[name.lower()] = version
    return pins


def test_every_extra_installs_at_the_tested_versions() -> None:
    """README installs with -c constraints.txt: each dependency of each extra must be pinned there."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    assert {"run", "worker", "controller", "dev"} <= set(extras)
    pins = _pinned()
    for extra, requirements in {"": project["dependencies"], **extras}.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9._-]+", requirement)
            assert name is not None
            if name.group().lower() != "optimenv":
                assert name.group().lower() in pins, f"[{extra}] {requirement} has no pin in constraints.txt"
    # Only this exact pin takes the CPU wheel; anything looser may fetch a multi-GB CUDA build.
    assert pins["torch"] == "2.13.0"
    assert (REPO / "requirements-test.txt").read_text().splitlines()[-2:] == [
        "-c constraints.txt",
        "-e .[dev]",
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fresh_clone_with_nothing_beside_it_tests_green(tmp_path: Path) -> None:
    clone = _fresh_clone(tmp_path)
    # The clone's own code, not this checkout's editable install.
    env = _env(PYTHONPATH=os.pathsep.join([str(clone / "service"), str(clone / "operators")]))
    where = _run(
        [sys.executable, "-c", "import optimenv; print(optimenv.__file__)"], cwd=clone, env=env, timeout=60
    )
    assert where.stdout.strip() == str(clone / "service" / "optimenv" / "__init__.py"), where.stderr

    pytest_cmd: list[str | Path] = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    collected = _run([*pytest_cmd, "--collect-only", "-q"], cwd=clone, env=env, timeout=200)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    count = re.search(r"^(\d+) tests collected", collected.stdout, re.M)
    assert count and int(count.group(1)) > 700, collected.stdout[-500:]

    # A fast subset: tests that need the reference material skip with the one reason, the rest pass.
    subset = ["tests/core/test_cli.py", "tests/core/test_conformance.py", "tests/core/test_corpus.py"]
    ran = _run([*pytest_cmd, "-q", "-rs", "-m", "not slow", *subset], cwd=clone, env=env, timeout=200)
    assert ran.returncode == 0, ran.stdout[-3000:]
    summary = ran.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, \d+ skipped(, \d+ deselected)? in .*", summary), summary
    reasons = {line.split(": ", 1)[1] for line in ran.stdout.splitlines() if line.startswith("SKIPPED")}
    assert reasons == {SHARED_MISSING.replace(str(REPO.parent / "shared"), str(tmp_path / "shared"))}


def _offline_pip_env() -> dict[str, str]:
    """pip's configuration, with only its local package sources (file:// indexes, find-links)."""
    shown = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    urls = []
    for line in shown.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("index-url", "extra-index-url")):
            urls += [u for u in value.strip("'\"").split() if u.startswith("file:")]
    if not urls:
        return _env()  # no local index: pip's own configuration as it is
    return _env(PIP_INDEX_URL=urls[0], PIP_EXTRA_INDEX_URL=" ".join(urls[1:]), PIP_NO_INPUT="1")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_base_install_plans_and_names_the_extra_for_the_rest(tmp_path: Path) -> None:
    clone = _fresh_clone(tmp_path / "src")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=_env(), timeout=120).returncode == 0
    installed = _run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", clone],
        cwd=tmp_path,
        env=_offline_pip_env(),
        timeout=330,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = _env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def optimenv(*args: str | Path) -> Any:
        return _run([venv / "bin" / "optimenv", *args], cwd=clone, env=env, timeout=60)

    listing = optimenv("--help")
    assert listing.returncode == 0 and listing.stderr == ""
    for command, extra in (("run", "run"), ("ray-launch", "run"), ("controller", "controller")):
        assert re.search(
            rf"^  {command} +\(not installed: needs the '{extra}' extra\)$", listing.stdout, re.M
        )
    assert optimenv("validate", "examples/zero3-gpu.yaml").returncode == 0
    planned = optimenv("plan", "examples/zero3-gpu.yaml", "-o", "json")
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout == plan(load_config(clone / "examples" / "zero3-gpu.yaml")).to_json()
    rendered = optimenv("render", "examples/fsdp2-gpu.yaml", "--target", "configmaps", "--name", "ft")
    assert rendered.returncode == 0 and "kind: ConfigMap" in rendered.stdout
    assert optimenv("spec", "examples/zero3-gpu.yaml", "-o", tmp_path / "spec").returncode == 0
    assert (
        optimenv("crd").stdout == (clone / "manifests" / "crds" / "optimenv.dev_optimenvs.yaml").read_text()
    )

    for command, extra, args in (
        ("run", "run", ["examples/fsdp2-cpu.yaml"]),
        ("ray-launch", "run", ["--spec", str(tmp_path / "spec" / "spec.json"), "--", "train.py"]),
        ("controller", "controller", ["--help"]),
    ):
        refused = optimenv(command, *args)
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
        lines = refused.stderr.splitlines()
        assert len(lines) == 1, refused.stderr
        assert lines[0].startswith(f"error: optimenv {command} needs the '{extra}' extra, and ")
        assert lines[0].endswith(
            f"install it from the optimenv checkout: pip install -c constraints.txt -e '.[{extra}]'"
        )
    # The base install is the planner only: none of the heavy libraries came with it.
    listed = _run([venv / "bin" / "python", "-m", "pip", "list"], cwd=tmp_path, env=env, timeout=60).stdout
    assert not re.search(r"^(torch|ray|kopf|accelerate) ", listed, re.M | re.I), listed
