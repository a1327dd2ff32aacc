"""Every front end compiles the same job: ``optimenv render``, the controller, ``run``, ``ray-launch``.

For every example and every upstream corpus config, on a few topologies and for every target: the
CLI's output (in process) equals the controller's children before it adds ownership, both refuse
alike when they refuse, and what the job launches (the spec the bootstrap reads at its mount, the
planned variables, the DeepSpeed JSON, the worker count in the launch line) is what
:func:`optimenv.compile` says. ``optimenv run`` with the RayJob's worker count launches the same
spec. A corpus config naming a DeepSpeed file gets its JSON inline, so the controller (which cannot
read the workers' files) sees the same config as the CLI.

The deferred steps too: the bootstrap reads back the planner's typed steps from the mounted spec,
and a worker decides them as the planner decides when it is told what the worker knows.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimenv.cli import main
from optimenv.cli import run as cli_run
from optimenv.cli.ray_launch import ray_launch_command
from optimenv.compiler import Job, compile
from optimenv.config import load_config, parse_config
from optimenv.deepspeed import PRESETS
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.local_run import RunRequest
from optimenv.render import CONTENT_HASH_ANNOTATION
from optimenv.resource import API_VERSION, KIND
from optimenv.spec import SPEC_PATH, content_hash, verify_spec
from optimenv.steps import Worker, read_step
from optimenv.workload import TARGETS, JobSpec, Target, Topology, local_topology
from optimenv_controller import reconcile as rc
from tests.conftest import REPO, SHARED
from tests.machine import Machine

NAME, NAMESPACE = "par", "ml"
IMAGE = "registry.example.com/train:1.0"
COMMAND = ["python", "train.py", "--lr", "1e-5"]
TOPOLOGIES = ((1, 1), (1, 4), (2, 4), (2, 8))
# What the controller puts on every child; the CLI gets the same labels with -l.
CONTROLLER_LABELS = {rc.MANAGED_BY: "optimenv", rc.NAME_LABEL: NAME}


def _examples() -> list[Path]:
    return sorted((REPO / "examples").glob("*.yaml"))


def _corpus() -> list[Path]:
    # Collection needs the names before fixtures exist; the corpus fixture skips without it.
    return sorted((SHARED / "corpus" / "axolotl" / "examples").rglob("*.y*ml"))


def _inline(path: Path, root: Path) -> dict[str, Any]:
    """The config as a mapping, a DeepSpeed file's JSON inline (resolved from the config's root)."""
    data = yaml.safe_load(path.read_text())
    ds = data.get("deepspeed") if isinstance(data, dict) else None
    if isinstance(ds, str) and ds not in PRESETS:
        data["deepspeed"] = json.loads((root / ds).read_text())
    return data  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Outcome:
    """A front end's answer: the objects, or the one-line refusal."""

    objects: list[dict[str, Any]] | None = None
    error: str | None = None


def _cli(path: Path, target: Target, nodes: int, gpus: int, capsys: pytest.CaptureFixture[str]) -> Outcome:
    argv = ["render", str(path), "--target", target, "--name", NAME, "-n", NAMESPACE, "-o", "json"]
    argv += ["--nodes", str(nodes), "--gpus-per-node", str(gpus)]
    argv += [f"-l{key}={value}" for key, value in CONTROLLER_LABELS.items()]
    if target != "configmaps":
        argv += ["--image", IMAGE, "--", *COMMAND]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    if info.value.code == 0:
        return Outcome(objects=json.loads(out)["items"])
    assert (info.value.code, out) == (1, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return Outcome(error=err.removeprefix("error: ").rstrip("\n"))


def _controller(config: Any, target: Target, nodes: int, gpus: int) -> tuple[Outcome, dict[str, Any]]:
    spec: dict[str, Any] = {"config": config, "topology": {"nodes": nodes, "gpusPerNode": gpus}}
    if target != "configmaps":
        spec["job"] = {"target": target, "image": IMAGE, "command": COMMAND}
    meta = {"name": NAME, "namespace": NAMESPACE, "uid": "uid-1", "generation": 1}
    want = rc.desired({"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec})
    if isinstance(want, rc.Invalid):
        assert want.reason == "InvalidConfig"
        # The controller names a config key where the object has it: under spec.config.
        return Outcome(error=want.message.replace("spec.config.", "", 1)), {}
    return Outcome(objects=[_unowned(child) for child in want.children]), want.summary.model_dump(
        exclude_none=True
    )


def _unowned(child: dict[str, Any]) -> dict[str, Any]:
    """A child as the renderer made it: without the owner reference and the job's own hash stamp."""
    body = copy.deepcopy(child)
    meta = body["metadata"]
    assert meta.pop("ownerReferences")[0]["uid"] == "uid-1"
    if body["kind"] != "ConfigMap":
        stamp = meta["annotations"].pop(CONTENT_HASH_ANNOTATION)
        assert stamp == content_hash({**body, "metadata": {**meta, "annotations": {}}})
        if not meta["annotations"]:
            del meta["annotations"]
    return body


def _job(config: Any, target: Target, nodes: int, gpus: int) -> Job | ConfigError:
    where: Target | JobSpec = target
    if target != "configmaps":
        where = JobSpec(target=target, image=IMAGE, command=COMMAND)
    try:
        return compile(
            parse_config(config),
            Topology(nodes=nodes, gpus_per_node=gpus),
            where,
            name=NAME,
            namespace=NAMESPACE,
            labels=CONTROLLER_LABELS,
        )
    except ConfigError as exc:
        return exc


def _configmap(objects: list[dict[str, Any]], name: str | None) -> dict[str, str] | None:
    found = [o["data"] for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return found[0] if found else None


def _pods(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = job["spec"]
    if job["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        yield cluster["headGroupSpec"]["template"]
        yield from (group["template"] for group in cluster["workerGroupSpecs"])
    elif job["kind"] == "PyTorchJob":
        yield from (replica["template"] for replica in spec["pytorchReplicaSpecs"].values())


def _launched_workers(job: dict[str, Any]) -> int:
    """The training processes the job's own launch line or sizes start."""
    spec = job["spec"]
    if job["kind"] == "RayJob":
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["optimenv", "ray-launch"]
        params = ray_launch_command.make_context("ray-launch", argv[2:]).params  # the real parser
        assert params["spec"] == Path(SPEC_PATH)
        return int(params["workers"])
    if job["kind"] == "PyTorchJob":
        replicas = sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())
        return replicas * int(spec["nprocPerNode"])
    trainer = spec["trainer"]
    return int(trainer["numNodes"] * trainer["numProcPerNode"])


def _check_launch(job: Job, objects: list[dict[str, Any]]) -> None:
    """What the job launches is what compile() derived: spec, variables, DeepSpeed JSON, workers."""
    spec_cm = _configmap(objects, job.spec_configmap)
    assert spec_cm is not None and verify_spec(json.loads(spec_cm["spec.json"])) == job.spec
    # The bootstrap reads back the very steps the planner made, field for field.
    read = [read_step(entry, i) for i, entry in enumerate(json.loads(spec_cm["spec.json"])["deferred"])]
    assert read == list(job.plan.deferred)
    assert (
        _configmap(objects, job.env_configmap) == job.env == {e["name"]: e["value"] for e in job.spec["env"]}
    )
    ds = _configmap(objects, job.deepspeed_configmap)
    assert (ds or {}).get("deepspeed.json") == job.deepspeed_json
    if job.target == "configmaps":
        return
    for pod in _pods(objects[-1]):
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v.get("configMap", {}).get("name") for v in pod["spec"]["volumes"]}
        assert volumes[mounts[SPEC_PATH]] == job.spec_configmap  # the bootstrap reads this spec
    assert _launched_workers(objects[-1]) == job.workers


def _check_run(config: Any, job: Job) -> None:
    """``optimenv run --workers N`` for the RayJob's N workers launches the RayJob's spec."""
    local = compile(
        parse_config(config),
        local_topology(parse_config(config), job.workers),
        "rayjob",
        deepspeed_path=job.plan.deepspeed_path or "/etc/optimenv/deepspeed.json",
    )
    assert (local.workers, local.spec) == (job.workers, job.spec)


def _check(config: Any, path: Path, capsys: pytest.CaptureFixture[str]) -> int:
    """Every target on every topology; the number of cases that rendered."""
    rendered = 0
    for (nodes, gpus), target in ((t, x) for t in TOPOLOGIES for x in TARGETS):
        case = f"{path.name} {target} {nodes}x{gpus}"
        cli = _cli(path, target, nodes, gpus, capsys)
        controller, summary = _controller(config, target, nodes, gpus)
        assert cli == controller, case
        job = _job(config, target, nodes, gpus)
        if isinstance(job, ConfigError):
            assert cli.error == str(job), case
            continue
        assert cli.objects == job.manifests(), case
        assert summary["hash"] == job.hash and summary.get("target") == (
            target if target != "configmaps" else None
        )
        _check_launch(job, cli.objects)
        if target == "rayjob":
            _check_run(config, job)
        rendered += 1
    return rendered


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.stem)
def test_examples_compile_alike_everywhere(
    path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = _inline(path, path.parent)
    assert _check(config, path, capsys) >= len(TARGETS)  # each example renders on some topology


def test_corpus_compiles_alike_everywhere(
    corpus: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    paths = _corpus()
    assert paths, f"no configs under {corpus / 'examples'}"
    rendered = 0
    for index, path in enumerate(paths):
        inlined = tmp_path / f"{index}-{path.name}"
        config = _inline(path, corpus)
        inlined.write_text(json.dumps(config))  # JSON is YAML: the CLI reads the very same mapping
        rendered += _check(config, inlined, capsys)
    assert rendered > len(paths)  # most of the corpus renders somewhere, not only refusals


@pytest.mark.parametrize(
    ("config", "workers"),
    [
        ({"bf16": True, "use_ray": True, "ray_num_workers": 2}, 2),
        # The drift: the CLI planned 2 processes and rendered a job, the controller 4 and refused.
        (
            {"bf16": True, "ray_num_workers": 2, "dp_shard_size": 2, "fsdp_version": 2, "fsdp_config": {}},
            2,
        ),
        ({"bf16": True, "use_ray": True}, 4),  # without ray_num_workers: one worker per GPU
    ],
)
def test_ray_workers_follow_one_rule(
    config: dict[str, Any], workers: int, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "ray.yaml"
    path.write_text(json.dumps(config))
    cli = _cli(path, "rayjob", 1, 4, capsys)
    controller, _ = _controller(config, "rayjob", 1, 4)
    assert cli == controller and cli.objects is not None, cli.error
    assert _launched_workers(cli.objects[-1]) == workers
    job = _job(config, "rayjob", 1, 4)
    assert isinstance(job, Job) and job.workers == workers


@pytest.mark.slow
@pytest.mark.parametrize(("example", "target"), [("zero3-gpu", "rayjob"), ("parallel-gpu", "trainjob")])
def test_the_installed_command_prints_what_compile_renders(example: str, target: Target) -> None:
    """The console script, as `optimenv render ... | kubectl apply -f -` runs it."""
    exe = Path(sys.executable).with_name("optimenv")
    argv = [
        str(exe),
        "render",
        f"examples/{example}.yaml",
        "--target",
        target,
        "--name",
        NAME,
        "-n",
        NAMESPACE,
    ]
    argv += ["--nodes", "2", "--gpus-per-node", "2", "--image", IMAGE, "--", *COMMAND]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    job = compile(
        load_config(REPO / "examples" / f"{example}.yaml"),
        Topology(nodes=2, gpus_per_node=2),
        JobSpec(target=target, image=IMAGE, command=COMMAND),
        name=NAME,
        namespace=NAMESPACE,
    )
    assert done.stdout == job.to_yaml()


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.stem)
def test_run_launches_what_compile_derives(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real ``optimenv run`` up to Ray: the request it hands the Ray launch (Ray itself is not
    started; tests/run runs the whole path)."""
    asked: list[RunRequest] = []

    def record(request: RunRequest, console: Any, timings: Any) -> tuple[list[Any], bool]:
        asked.append(request)
        return [], False

    monkeypatch.setattr(cli_run, "run_workers", record)
    argv = ["run", str(path), "--workers", "4", "--cpu", "--log", str(tmp_path / "run.log"), "-o", "json"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    if info.value.code != 0:  # refused before launching: as compile() refuses for 4 Ray Train workers
        with pytest.raises(ConfigError) as refused:
            compile(load_config(path), Topology(nodes=1, gpus_per_node=4), "rayjob")
        assert err == f"error: {refused.value}\n"
        return
    (request,) = asked
    job = compile(
        load_config(path),
        Topology(nodes=1, gpus_per_node=4),
        "rayjob",
        deepspeed_path=request.spec["deepspeedPath"] or "/x",
    )
    assert (request.workers, request.spec, request.cpu) == (4, job.spec, True)
    assert json.loads(out)["planned"] == sorted(job.env)


# Workers of each topology: what the planner may or may not have been told about them.
MACHINES = (Machine(bf16=True, torch="2.7.1"), Machine(bf16=False, torch="2.5.1rc1"))


def _on_worker(job: Job, machine: Machine, environ: dict[str, str]) -> dict[str, str] | str:
    """The job's variables once a worker of ``machine`` has decided its steps (or why it refuses)."""
    env = dict(job.env)
    worker = Worker(environ, machine, True, job.plan.deepspeed_path)
    try:
        for step in job.plan.deferred:
            for setting in step.decide(worker)[1]:
                assert setting.name not in env, setting  # the bootstrap refuses a variable planned twice
                if setting.mode == "set" or setting.name not in environ:
                    env[setting.name] = setting.value
    except OptimEnvError as exc:
        return str(exc)
    return env


def _decides_alike(config: Any) -> int:
    """A plan told the machines, decided on them, sets what a plan told nothing, decided there, sets;
    the number of cases compared."""
    try:
        blind = compile(parse_config(config), Topology(nodes=None, gpus_per_node=None), "configmaps")
    except ConfigError:
        return 0
    compared = 0
    for (nodes, gpus), machine in ((t, m) for t in TOPOLOGIES for m in MACHINES):
        told = Topology(
            nodes=nodes, gpus_per_node=gpus, bf16_supported=machine.bf16, torch_version=machine.torch
        )
        try:
            known = compile(parse_config(config), told, "configmaps")
        except ConfigError:
            continue  # refused when planned: what the worker does with it is never asked
        environ = {"WORLD_SIZE": str(nodes * gpus), "LOCAL_WORLD_SIZE": str(gpus)}
        worker = machine._replace(gpus=gpus)
        assert _on_worker(blind, worker, environ) == _on_worker(known, worker, environ), (nodes, gpus)
        compared += 1
    return compared


def test_workers_decide_as_the_planner_would(corpus: Path) -> None:
    """Every deferred step is decided on the worker by the planner's own rules: for every example and
    corpus config, what the worker sets equals what planning with the worker's facts sets."""
    configs = [_inline(p, p.parent) for p in _examples()] + [_inline(p, corpus) for p in _corpus()]
    assert sum(_decides_alike(config) for config in configs) > len(configs)
