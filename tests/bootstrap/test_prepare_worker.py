"""``prepare_worker``: the bootstrap in a Ray Train worker, without Ray (each case in a child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from optimenv.config import parse_config
from optimenv.plan import Hardware, plan
from optimenv.spec import build_spec
from tests.bootstrap.support import ZERO3, clean_env

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from optimenv.bootstrap.ray import prepare_worker
    from optimenv.errors import OptimEnvError
    spec = json.loads(sys.argv[1])
    try:
        applied = prepare_worker(spec)
    except OptimEnvError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"env": applied.env, "cpu": os.environ.get("ACCELERATE_USE_CPU")}))
    """
)


def _prepare(spec: dict[str, object], **env: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return out


def _zero3_spec(tmp_path: Path) -> dict[str, object]:
    # Planned for a path that does not exist on this "node": the JSON is written to a local file.
    missing = str(tmp_path / "none.json")
    return build_spec(plan(parse_config(ZERO3), Hardware(nodes=1, gpus_per_node=1), deepspeed_path=missing))


def test_the_deepspeed_json_goes_to_a_local_file_when_the_planned_path_is_missing(tmp_path: Path) -> None:
    out = _prepare(_zero3_spec(tmp_path), TMPDIR=str(tmp_path))
    assert isinstance(out["env"], dict)
    local = Path(out["env"]["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert local.parent.parent == tmp_path
    assert json.loads(local.read_text())["zero_optimization"]["stage"] == 3


def test_an_unwritable_temp_dir_is_one_line_naming_tmpdir(tmp_path: Path) -> None:
    spec = _zero3_spec(tmp_path)
    # The worker-local folder cannot be made (a file holds its name): the same OSError family as a
    # read-only or missing temp dir, which root-run tests cannot produce.
    (tmp_path / f"optimenv-{str(spec['hash']).removeprefix('sha256:')[:16]}").write_text("in the way")
    out = _prepare(spec, TMPDIR=str(tmp_path))
    error = str(out.get("error"))
    assert error.startswith("deepspeed: cannot write the DeepSpeed JSON to a local file")
    assert "TMPDIR" in error and "\n" not in error


def test_cpu_workers_get_accelerate_use_cpu_unless_the_environment_sets_it(tmp_path: Path) -> None:
    fsdp = build_spec(plan(parse_config({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}})))
    assert _prepare(fsdp, CUDA_VISIBLE_DEVICES="")["cpu"] == "true"
    # Set by the user (here to opt out): kept, never a conflict.
    assert _prepare(fsdp, CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="false")["cpu"] == "false"
