"""Fixtures shared by every test folder. Subsystem fixtures live in each folder's conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The upstream reference material (Axolotl's example corpus, the operators' CRDs) that some tests
# compare against: ../shared beside the checkout, or OPTIMENV_SHARED. Without it those tests skip,
# so a fresh clone tests green; .ci/run sets OPTIMENV_REQUIRE_SHARED=1, which makes them fail instead.
SHARED = Path(os.environ.get("OPTIMENV_SHARED", REPO.parent / "shared"))
REQUIRE_SHARED = os.environ.get("OPTIMENV_REQUIRE_SHARED") == "1"
SHARED_MISSING = (
    f"needs the upstream reference material, not found at {SHARED} "
    "(lay it beside the checkout as ../shared or set OPTIMENV_SHARED)"
)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Test clusters listen on 127.0.0.1 only; with Ray's default token auth, a second driver connecting
# to the session cluster (ray_address) would need the token file Ray writes into ~/.ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def require_shared() -> Path:
    """The reference material; without it the calling test skips (fails when CI requires it)."""
    if SHARED.is_dir():
        return SHARED
    if REQUIRE_SHARED:
        pytest.fail(f"OPTIMENV_REQUIRE_SHARED=1: {SHARED_MISSING}")
    pytest.skip(SHARED_MISSING)


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def corpus(shared: Path) -> Path:
    return shared / "corpus" / "axolotl"


# Started in its own process so the test process never imports Ray; stopping it = closing stdin.
_RAY_HEAD = """
import sys, ray
ctx = ray.init(
    address="local", num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1], configure_logging=False
)
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


@contextlib.contextmanager
def ray_cluster_process(
    code: str, temp: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``code``, a Python script that starts a Ray cluster, prints its address and waits on stdin;
    yield the address. Stopped by closing stdin; ``temp`` (its log and Ray's files) removed after."""
    log = Path(temp, "cluster.log")
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    assert proc.stdout is not None and proc.stdin is not None
    address = proc.stdout.readline().strip()
    try:
        if not address:
            proc.kill()
            pytest.fail(f"the test's Ray cluster did not start:\n{log.read_text()[-3000:]}")
        yield address
    finally:
        proc.stdin.close()
        proc.stdout.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A local Ray cluster with 2 CPUs for the whole session; its address (pass it as RAY_ADDRESS).

    Drivers started by tests connect with ``RAY_AUTH_MODE=disabled`` (set above; children inherit it).
    """
    # Short path under /tmp: Ray's socket paths must stay under the 107-character limit.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    with ray_cluster_process(_RAY_HEAD, temp, (temp,)) as address:
        yield address
