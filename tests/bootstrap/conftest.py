"""Fixtures of the bootstrap tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bootstrap.support import MakeSpec, spec_maker


@pytest.fixture
def make_spec(tmp_path: Path) -> MakeSpec:
    """Plan a config and write its spec (and DeepSpeed JSON) into the test's folder."""
    return spec_maker(tmp_path)
