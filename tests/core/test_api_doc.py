"""docs/api.md's Python examples run as shown, each in a fresh interpreter from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

API_DOC = REPO / "docs" / "api.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", API_DOC.read_text(encoding="utf-8"), re.M | re.S)


def test_the_page_has_an_example() -> None:
    assert BLOCKS and "optimenv.compile(" in BLOCKS[0] and "apply(" in BLOCKS[0]


@pytest.mark.parametrize("code", BLOCKS, ids=lambda code: f"block-{BLOCKS.index(code)}")
def test_example_runs(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIMENV_", "ACCELERATE_", "PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
