"""A spec or DeepSpeed file that is not UTF-8 is a one-line refusal, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from optimenv import Hardware, parse_config, plan
from optimenv.spec import build_spec, spec_text

BOOTSTRAP = [sys.executable, "-m", "optimenv.bootstrap"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPTIMENV_SPEC"}
    return subprocess.run([*BOOTSTRAP, *args], capture_output=True, text=True, env=env, timeout=60)


def test_spec_that_is_not_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_bytes(b"\xff\xfe{}")
    proc = _run("--spec", str(spec), "--", "true")
    assert proc.returncode == 1
    expected = f"optimenv-bootstrap: error: spec: {spec} (from --spec) is not UTF-8 text"
    assert proc.stderr.strip().splitlines() == [f"{expected}; render it again with optimenv"]


def test_deepspeed_json_that_is_not_utf8(tmp_path: Path) -> None:
    ds_path = tmp_path / "deepspeed.json"
    planned = plan(parse_config({"deepspeed": "zero2"}), Hardware(1, 2), deepspeed_path=str(ds_path))
    spec = tmp_path / "spec.json"
    spec.write_text(spec_text(build_spec(planned)))
    ds_path.write_bytes(b"\xff" + json.dumps(planned.deepspeed).encode())
    proc = _run("--spec", str(spec), "--", "true")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"optimenv-bootstrap: error: deepspeed: {ds_path} is not UTF-8"
    )
