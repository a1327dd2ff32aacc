"""A controller no user can crash (issue 20): ``desired()`` answers Invalid, one line, bounded memory.

Anyone allowed to create an OptimEnv and a ConfigMap controls the input of the shared controller:
every hostile row must come back as ``Invalid`` (never an exception), and the alias amplification
that once took 3 GB must stay within the chart's own memory limit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimenv_controller import reconcile as rc
from tests.controller.conftest import optimenv

REPO = Path(__file__).resolve().parents[2]
HUGE_HEX = "0x" + "f" * 3600
BOMB = 'a: &a "' + "x" * 1_000_000 + '"\nb: [' + ",".join(["*a"] * 3000) + "]\n"


def _obj(**spec: Any) -> dict[str, Any]:
    body = optimenv(**spec)
    body["metadata"].update(uid="uid-1", generation=1)
    return body


def _by_ref(text: Any) -> rc.Desired | rc.Invalid:
    obj = _obj(spec={"configMapRef": {"name": "cm"}})
    return rc.desired(obj, {"data": {"config.yaml": text}})


def _invalid(want: rc.Desired | rc.Invalid, starts: str, says: str = "") -> None:
    assert isinstance(want, rc.Invalid), want
    assert "\n" not in want.message and len(want.message) < 600, want.message[:700]
    assert want.message.startswith(starts), want.message
    assert says in want.message, want.message


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (f"ddp_timeout: {HUGE_HEX}\n", "ddp_timeout"),
        ("ddp_timeout: " + "1" * 5000 + "\n", "ddp_timeout"),
        (f"dp_shard_size: {HUGE_HEX}\n", "dp_shard_size"),
        (
            f"deepspeed:\n  zero_optimization: {{stage: 2}}\n  train_batch_size: {HUGE_HEX}\n",
            "deepspeed.train_batch_size",
        ),
        ("optimizer: [adamw_torch]\n", "optimizer"),
        ("optimizer: {name: adamw_torch}\n", "optimizer"),
        ("true: 1\n", "config"),
        ("a: " + "[" * 2000 + "]" * 2000 + "\n", "config"),
        ("x: [" + ",".join(["1"] * 200_000) + "]\n", "config"),
        ("bf16: " + "x" * 1_000_000 + "\n", "bf16"),
    ],
    ids=[
        "hex",
        "decimal",
        "parallel-size",
        "inline-deepspeed",
        "optimizer-list",
        "optimizer-map",
        "bool-key",
        "deep",
        "many-values",
        "long-value",
    ],
)
def test_config_map_rows_are_invalid_with_one_line(config: str, field: str) -> None:
    _invalid(_by_ref(config), f"ConfigMap cm key config.yaml: {field}: ")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"ddp_timeout": 10**5000}, "spec.config.ddp_timeout"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}, "x": [2**64]}}, "spec.config.deepspeed.x[0]"),
        ({"optimizer": ["adamw_torch"]}, "spec.config.optimizer"),
        ({"notes": ["x" * 1_000_000] * 20}, "spec"),
    ],
    ids=["huge-int", "inline-deepspeed", "optimizer-list", "shared-text"],
)
def test_inline_rows_are_invalid_with_one_line(config: dict[str, Any], field: str) -> None:
    _invalid(rc.desired(_obj(spec={"config": config})), f"{field}: ")


def test_topology_beyond_64_bits_is_invalid() -> None:
    obj = _obj(spec={"config": {"bf16": True}, "topology": {"nodes": 2**70}})
    _invalid(rc.desired(obj), "spec.topology.nodes: ", "out of range")


@pytest.mark.parametrize("data", [None, ["config.yaml"], {"config.yaml": 7}], ids=["none", "list", "int"])
def test_a_config_map_of_the_wrong_shape_is_invalid(data: Any) -> None:
    want = rc.desired(_obj(spec={"configMapRef": {"name": "cm"}}), {"data": data})
    assert isinstance(want, rc.Invalid)
    assert "\n" not in want.message


def test_the_controller_keeps_planning_after_a_hostile_object() -> None:
    _invalid(_by_ref(BOMB), "ConfigMap cm key config.yaml: config: ", "expands to more than")
    assert isinstance(_by_ref("bf16: true\nmicro_batch_size: 2\n"), rc.Desired)


def _chart_memory_limit() -> int:
    values = yaml.safe_load((REPO / "helm" / "optimenv" / "values.yaml").read_text())
    limit = values["resources"]["limits"]["memory"]
    match = re.fullmatch(r"(\d+)Mi", limit)
    assert match, limit
    return int(match.group(1)) * 1024 * 1024


_UNDER_CAP = """
import json, resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from optimenv_controller import reconcile as rc
obj = {"apiVersion": "optimenv.dev/v1alpha1", "kind": "OptimEnv",
       "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": 1},
       "spec": {"configMapRef": {"name": "cm"}}}
want = rc.desired(obj, {"data": {"config.yaml": sys.stdin.read()}})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"kind": type(want).__name__, "message": getattr(want, "message", ""), "peak": peak}))
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_alias_amplification_stays_within_the_charts_memory_limit() -> None:
    cap = _chart_memory_limit()
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_CAP, str(cap)],
        input=BOMB,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["kind"] == "Invalid"
    assert report["message"].startswith("ConfigMap cm key config.yaml: config: expands to more than")
    assert "\n" not in report["message"]
    assert report["peak"] < cap
