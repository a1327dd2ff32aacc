"""The one-definition pieces under compile(): exports, versions, launcher variables, targets, sizes."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import optimenv
from optimenv.bootstrap._apply import apply_spec
from optimenv.cli import main
from optimenv.compiler import compile
from optimenv.config import parse_config
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import EnvVar, Hardware, plan
from optimenv.render import _JOBS, Request, render
from optimenv.resource import crd_manifest
from optimenv.spec import LAUNCHER_PREFIXES, LAUNCHER_VARIABLES, SpecError, build_spec, content_hash
from optimenv.versions import at_least, parse_version
from optimenv.workload import JOB_KINDS, JOB_TARGETS, TARGETS, Launch, Topology, local_topology
from optimenv_controller import reconcile as rc

# ---- lazy exports --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    ["import optimenv.render", "import optimenv.plan", "import optimenv.compiler", "import optimenv.cli"],
)
def test_an_export_wins_over_its_submodule_whatever_is_imported_first(first: str) -> None:
    """``import optimenv.render`` binds the submodule optimenv.plan; ``from optimenv import plan``
    must still give the function (a fresh interpreter, so the import order is the one named)."""
    code = (
        f"{first}\n"
        "import types, optimenv\n"
        "from optimenv import plan, compile, Job, Topology, JobSpec\n"
        "assert isinstance(plan, types.FunctionType) and plan.__module__ == 'optimenv.plan', plan\n"
        "assert optimenv.plan is plan and isinstance(compile, types.FunctionType)\n"
        "assert (Job.__name__, Topology.__name__, JobSpec.__name__) == ('Job', 'Topology', 'JobSpec')\n"
        "import sys; assert isinstance(sys.modules['optimenv.plan'], types.ModuleType)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_exports_in_this_process() -> None:
    assert isinstance(optimenv.plan, types.FunctionType)
    assert optimenv.compile.__module__ == "optimenv.compiler"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = optimenv.nothing  # type: ignore[attr-defined]
    assert set(optimenv.__all__) >= {"compile", "Job", "Topology", "JobSpec", "plan"}


# ---- one version parser ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "minimum", "expected"),
    [
        ("2.5.0rc1", "2.5.0", False),  # a pre-release is below its release
        ("2.5.1rc1", "2.5.1", False),
        ("2.5.0rc1", "2.5.1", False),  # once read as 2.5.1 by the planner
        ("2.5.1+cu124", "2.5.1", True),  # a local build is its release
        ("2.8.0.dev20250401+cu126", "2.7", True),
        ("2.6.0", "2.7", False),
        ("2.13.0", "2.5.1", True),
        ("2.6.0\n", "2.5.1", None),
        ("abc", "2.5.1", None),
    ],
)
def test_versions_compare_as_pep_440(version: str, minimum: str, expected: bool | None) -> None:
    assert at_least(version, minimum) is expected


def test_the_planner_and_the_bootstrap_read_a_pre_release_alike() -> None:
    config = parse_config({"torch_compile": "auto"})
    # Known on the planner side: 2.5.1rc1 is below the 2.5.1 that torch_compile: auto needs.
    for version, planned in (("2.5.1rc1", False), ("2.5.1", True), ("2.5.1+cu124", True)):
        env = plan(config, Hardware(torch_version=version)).env_dict
        assert ("ACCELERATE_DYNAMO_BACKEND" in env) is planned, version
    assert parse_version("2.5.1rc1") is not None
    # Left to the worker: the bootstrap compares the installed torch (2.13) with the same parser.
    spec = build_spec(plan(config))
    (step,) = [s for s in spec["deferred"] if s["kind"] == "torch_compile_auto"]
    assert step["detail"]["min_torch"] == "2.5.1"
    for minimum, decided in (("2.13.0rc1", "INDUCTOR"), ("2.13.0", "INDUCTOR"), ("999.0", None)):
        environ: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""}
        applied = apply_spec(_with_min_torch(spec, minimum), environ, in_process=False)
        assert environ.get("ACCELERATE_DYNAMO_BACKEND") == decided, minimum
        (decision,) = [d for d in applied.decisions if d.kind == "torch_compile_auto"]
        assert decision.reason.startswith("torch 2.13"), decision


def _with_min_torch(spec: Any, minimum: str) -> dict[str, Any]:
    steps = [
        {**s, "detail": {**s["detail"], "min_torch": minimum}} if s["kind"] == "torch_compile_auto" else s
        for s in spec["deferred"]
    ]
    body = {k: v for k, v in spec.items() if k != "hash"} | {"deferred": steps}
    return {**body, "hash": content_hash(body)}


# ---- one list of launcher variables ---------------------------------------------------------------

LAUNCHER_NAMES = sorted(LAUNCHER_VARIABLES) + [f"{prefix}X" for prefix in LAUNCHER_PREFIXES]


@pytest.mark.parametrize("name", LAUNCHER_NAMES)
def test_the_renderers_and_the_bootstrap_refuse_the_same_launcher_variables(name: str) -> None:
    planned = plan(parse_config({"bf16": True}), Hardware(nodes=1, gpus_per_node=1))
    forged = type(planned)(**{**planned.__dict__, "env": (*planned.env, EnvVar(name, "1", "forged"))})
    spec = build_spec(forged)
    with pytest.raises(OptimEnvError, match=f"plan: {name} is a rendezvous variable"):
        render(forged, Request("configmaps", "ft", "default", {}, None, None, spec))
    with pytest.raises(SpecError, match=f"{name} is a rendezvous variable that only the launcher sets"):
        apply_spec(spec, {}, in_process=False)


# ---- the targets, listed once ----------------------------------------------------------------------


def test_every_listing_of_the_targets_is_the_one_list() -> None:
    assert (*JOB_TARGETS, "configmaps") == TARGETS
    assert tuple(JOB_KINDS) == tuple(_JOBS) == tuple(rc.JOB_RESOURCES) == JOB_TARGETS
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert (
        tuple(schema["properties"]["spec"]["properties"]["job"]["properties"]["target"]["enum"])
        == JOB_TARGETS
    )


# ---- one sizing rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "target", "topology", "launch"),
    [
        ({}, "configmaps", Topology(nodes=None, gpus_per_node=None), None),
        ({}, "configmaps", Topology(nodes=2, gpus_per_node=None), None),
        ({}, "configmaps", Topology(nodes=2, gpus_per_node=4), Launch(2, 4, 8)),
        ({}, "pytorchjob", Topology(nodes=None, gpus_per_node=None), Launch(1, 1, 1)),  # a job's default
        ({}, "trainjob", Topology(nodes=2, gpus_per_node=4), Launch(2, 4, 8)),
        ({"ray_num_workers": 3}, "trainjob", Topology(nodes=2, gpus_per_node=4), Launch(2, 4, 8)),
        ({}, "rayjob", Topology(nodes=2, gpus_per_node=4), Launch(2, 4, 8)),  # one worker per GPU
        ({"ray_num_workers": 1}, "rayjob", Topology(nodes=2, gpus_per_node=4), Launch(2, 4, 1)),
        ({"ray_num_workers": 3}, "rayjob", Topology(nodes=2, gpus_per_node=4), Launch(2, 4, 3)),
    ],
)
def test_the_launch_of_a_target(
    config: dict[str, Any], target: Any, topology: Topology, launch: Launch | None
) -> None:
    assert topology.launch(target, parse_config(config)) == launch


def test_the_planner_is_told_the_processes_of_the_launch() -> None:
    topology = Topology(nodes=2, gpus_per_node=4, bf16_supported=True)
    assert topology.hardware() == Hardware(nodes=2, gpus_per_node=4, bf16_supported=True)
    assert topology.hardware(Launch(2, 4, 8)).world_size == 8
    assert topology.hardware(Launch(2, 4, 3)) == Hardware(nodes=1, gpus_per_node=3, bf16_supported=True)


def test_a_local_run_takes_its_workers_from_the_option_or_the_config() -> None:
    plain, asked = parse_config({}), parse_config({"ray_num_workers": 3})
    assert (local_topology(plain).gpus_per_node, local_topology(plain, 4).gpus_per_node) == (2, 4)
    assert (local_topology(asked).gpus_per_node, local_topology(asked, 3).gpus_per_node) == (3, 3)
    with pytest.raises(ConfigError, match=r"^--workers: 4 disagrees with the config's ray_num_workers: 3"):
        local_topology(asked, 4)


def test_ray_launch_refuses_workers_the_spec_was_not_planned_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before Ray starts: a RayJob line always matches (compile() writes both); a hand-typed one may not."""
    hsdp = {"bf16": True, "fsdp_version": 2, "fsdp_config": {}, "dp_shard_size": 2, "dp_replicate_size": 2}
    job = compile(parse_config(hsdp), Topology(nodes=1, gpus_per_node=4), "rayjob")
    spec, script = tmp_path / "spec.json", tmp_path / "train.py"
    spec.write_text(job.spec_json)
    script.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["ray-launch", "--spec", str(spec), "--workers", "2", "--", str(script)])
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (1, "")
    assert err == (
        "error: --workers: 2 Ray Train workers, but the spec's parallelism sizes multiply to 4 "
        "(dp_shard_size); pass --workers 4, or render the spec for 2\n"
    )
