"""bench/gpu: what can be checked without a GPU.

The launches the GPU runner builds (path A is the rendered PyTorchJob's container, path B
``accelerate launch`` with the hand-written configs), that both carry the same settings as Accelerate
itself parses them, the 4-GPU layouts' meshes (issue 9), the statistics, and one end-to-end run on
CPUs through a test-only shim (Accelerate enables FSDP/DeepSpeed only on accelerators).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from optimenv.config import load_config
from optimenv.plan import Hardware, plan
from optimenv.spec import verify_spec

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "gpu"
SHIM = Path(__file__).resolve().parent / "cpu_shim"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"gpu_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load("run")
ray_bare = _load("ray_bare")

# Set by `accelerate launch` for every FSDP config: FSDP1-only switches that FSDP2 ignores
# (accelerate-env.md section 1.5); the GPU runs show the plugin state is identical regardless.
FSDP1_ONLY = {
    "FSDP_SHARDING_STRATEGY",
    "FSDP_SYNC_MODULE_STATES",
    "FSDP_USE_ORIG_PARAMS",
    "FSDP_FORWARD_PREFETCH",
    "FSDP_MIN_NUM_PARAMS",
}
PAIRED = [(name, g) for name, s in run.SCENARIOS.items() if s.accelerate for g in s.gpus]


def _planned(name: str, gpus: int, ds_path: str = "/etc/optimenv/deepspeed.json") -> Any:
    config = load_config(BENCH / "configs" / run.SCENARIOS[name].config)
    return plan(config, Hardware(nodes=1, gpus_per_node=gpus), deepspeed_path=ds_path)


def _accelerate_env(launch: Any) -> dict[str, str]:
    """The environment `accelerate launch` gives the training processes, computed by Accelerate."""
    return dict(ray_bare.accelerate_env(launch.cmd[2:]))  # after "accelerate launch"


@pytest.mark.parametrize(("name", "gpus"), PAIRED)
def test_path_a_runs_the_rendered_pytorchjob_container(name: str, gpus: int, tmp_path: Path) -> None:
    launch = run.build(name, "optimenv", 0, gpus, 30000, run.TrainArgs(), tmp_path / "work", str(tmp_path))
    spec_path = str(tmp_path / "etc/optimenv/spec.json")
    per_rank = ["python3", "-m", "optimenv.bootstrap", "run"] if run.SCENARIOS[name].zero3 else ["python3"]
    head = ["optimenv-bootstrap", "--spec", spec_path, "--", "torchrun", "--no-python", *per_rank, run.TRAIN]
    assert launch.cmd[: len(head)] == head
    # The operator's variables for a one-replica PyTorchJob with nprocPerNode=gpus; no LOCAL_RANK.
    env = launch.env
    assert (env["PET_NPROC_PER_NODE"], env["WORLD_SIZE"], env["RANK"], env["PET_NNODES"]) == (
        str(gpus),
        str(gpus),
        "0",
        "1",
    )
    assert env["PET_MASTER_PORT"] == env["MASTER_PORT"] == "30000"
    assert "LOCAL_RANK" not in env
    assert env["OPTIMENV_SPEC"] == spec_path
    planned = _planned(name, gpus, ds_path=str(tmp_path / "etc/optimenv/deepspeed.json"))
    assert {k: env[k] for k in planned.env_dict} == planned.env_dict
    spec = verify_spec(json.loads(launch.files[spec_path]))
    assert spec["env"] == [
        {"name": v.name, "value": v.value, "source": v.source, "mode": v.mode} for v in planned.env
    ]
    if planned.deepspeed is not None:
        assert json.loads(launch.files[planned.deepspeed_path]) == planned.deepspeed


@pytest.mark.parametrize(("name", "gpus"), PAIRED)
def test_hand_written_accelerate_config_carries_the_planned_settings(
    name: str, gpus: int, tmp_path: Path
) -> None:
    launch = run.build(name, "accelerate", 0, gpus, 30001, run.TrainArgs(), tmp_path, "/")
    env = _accelerate_env(launch)
    planned = _planned(name, gpus)
    assert env.get("ACCELERATE_NUM_PROCESSES", str(gpus)) == str(gpus)
    for key, value in planned.env_dict.items():
        if key == "ACCELERATE_DEEPSPEED_CONFIG_FILE":
            hand_written = json.loads((REPO / env[key]).read_text())
            assert hand_written == planned.deepspeed, "ds_zero3.json must equal the planned DeepSpeed JSON"
        elif key == "ACCELERATE_DEEPSPEED_ZERO_STAGE":
            assert json.loads((REPO / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())[
                "zero_optimization"
            ]["stage"] == int(value)
        else:
            assert env.get(key) == value, (
                f"{key}: accelerate launch gives {env.get(key)!r}, the plan {value!r}"
            )
    for key, value in env.items():
        if key.startswith("FSDP_") and key not in planned.env_dict and key not in FSDP1_ONLY:
            assert value == "false", f"{key}={value} is set only by the hand-written config"
        if key.startswith("PARALLELISM_CONFIG_") and key not in planned.env_dict:
            assert value in ("1", "torch", "deepspeed"), (
                f"{key}={value} is set only by the hand-written config"
            )


@pytest.mark.parametrize("name", ["fsdp2-hsdp", "fsdp2-tp"])
def test_4gpu_layouts_give_the_mesh_the_config_asks_for(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9, as far as a CPU goes: Accelerate's ParallelismConfig from either path's env."""
    from accelerate.parallelism_config import ParallelismConfig

    scenario = run.SCENARIOS[name]
    assert scenario.mesh is not None
    a = run.build(name, "optimenv", 0, 4, 30002, run.TrainArgs(), tmp_path, str(tmp_path))
    b_env = _accelerate_env(run.build(name, "accelerate", 0, 4, 30003, run.TrainArgs(), tmp_path, "/"))
    meshes = []
    for env in (a.env, b_env):
        for key in [k for k in os.environ if k.startswith("PARALLELISM_CONFIG_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("PARALLELISM_CONFIG_"):
                monkeypatch.setenv(key, value)
        assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
        pc = ParallelismConfig()
        assert pc.total_size == 4
        names, shape = pc._get_mesh()
        meshes.append((tuple(names), tuple(shape)))
    assert meshes == [(scenario.mesh[0], scenario.mesh[1])] * 2


def test_dry_run_prints_every_4gpu_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--gpus", "4", "--scenarios", "fsdp2-hsdp,fsdp2-tp,zero3", "--reps", "2", "--dry-run"]
    assert run.main([*argv, "--work", str(tmp_path), "--mount-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 3 * 2 * 2
    assert sum("optimenv-bootstrap --spec" in c and "PET_NPROC_PER_NODE=4" in c for c in commands) == 6
    assert (
        sum(c.startswith("accelerate launch --config_file bench/gpu/configs/accelerate/") for c in commands)
        == 6
    )
    assert sum("--model-dir" in c for c in commands) == 4  # tensor parallelism loads a saved model


def test_scenario_outside_its_gpu_counts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="defined for"):
        run.build("fsdp2-tp", "optimenv", 0, 2, 30004, run.TrainArgs(), tmp_path, str(tmp_path))


def test_schedule_alternates_and_puts_semantic_runs_last() -> None:
    order = run.schedule(["fsdp2", "zero3"], ["fsdp2-ac"], 2)
    assert order == [
        ("fsdp2", "optimenv", 0),
        ("fsdp2", "accelerate", 0),
        ("zero3", "optimenv", 0),
        ("zero3", "accelerate", 0),
        ("fsdp2", "accelerate", 1),
        ("fsdp2", "optimenv", 1),
        ("zero3", "accelerate", 1),
        ("zero3", "optimenv", 1),
        ("fsdp2-ac", "optimenv", 0),
    ]


def _record(path: str, rep: int, tokens: float, losses: list[float], state: dict[str, Any]) -> dict[str, Any]:
    rank = {
        "rank": 0,
        "tokens_per_s": tokens,
        "tokens_per_step_global": 100.0,
        "step_end": [0.0, 1.0, 2.0, 3.0],
        "args": {"warmup": 1},
        "first_step_from_launch_s": 20.0,
        "accelerate_state": state,
        "losses": losses,
        "mem_train": {"max_allocated": 2**30},
        "params": {"local_bytes": 10},
    }
    return {"path": path, "rep": rep, "wall_s": 30.0, "ranks": [rank]}


def test_compare_paths_reports_ratio_state_and_loss_differences() -> None:
    state = {"distributed_type": "FSDP", "fsdp_plugin": {"reshard_after_forward": True}}
    other = {"distributed_type": "FSDP", "fsdp_plugin": {"reshard_after_forward": False}}
    a = [_record("optimenv", i, t, [10.0, 9.0], state) for i, t in enumerate([99.0, 97.0, 101.0])]
    b = [_record("accelerate", i, t, [10.0, 9.01], state) for i, t in enumerate([100.0, 100.0, 100.0])]
    same = run.compare_paths(a, b)
    assert same["ratio_median_tokens_per_s"] == pytest.approx(0.99)
    assert same["ratio_ok"] and same["state_identical"] and same["losses_ok"]
    assert same["paired_ratios"] == [0.99, 0.97, 1.01]
    worse = run.compare_paths(
        [_record("optimenv", 0, 90.0, [10.0, 9.5], other)],
        [_record("accelerate", 0, 100.0, [10.0, 9.0], state)],
    )
    assert not worse["ratio_ok"] and not worse["state_identical"] and not worse["losses_ok"]
    assert "fsdp_plugin.reshard_after_forward" in worse["state_differences"][0]


def test_ratio_interval_is_seeded_and_brackets_the_ratio() -> None:
    a, b = [99.0, 97.0, 101.0, 100.0], [100.0, 102.0, 98.0, 100.0]
    low, high = run.ratio_interval(a, b) or (0.0, 0.0)
    assert low <= statistics.median(a) / statistics.median(b) <= high
    assert run.ratio_interval(a, b) == (low, high)  # same results, same interval
    tight = run.ratio_interval([100.0] * 5, [100.0] * 5)
    assert tight == (1.0, 1.0)
    wide = run.ratio_interval([80.0, 100.0, 120.0], [100.0, 100.0, 100.0]) or (1.0, 1.0)
    assert wide[0] < 0.9 and wide[1] > 1.1
    assert run.ratio_interval([], b) is None


def test_extra_contexts_counts_ranks_on_foreign_gpus() -> None:
    def launch(apps: list[list[str]]) -> dict[str, Any]:
        ranks = [
            {"rank": 0, "gpu_snapshot": {"pid": 11, "apps": apps}},
            {"rank": 1, "gpu_snapshot": {"pid": 12}},
        ]
        return {"ranks": ranks}

    own = [["11", "GPU-a", "900"], ["12", "GPU-b", "900"], ["99", "GPU-a", "10"]]  # 99: not ours
    assert run._extra_contexts(launch(own)) == 0
    assert run._extra_contexts(launch([*own, ["12", "GPU-a", "500"]])) == 1
    assert run._extra_contexts({"ranks": [{"rank": 0}]}) is None  # recorded before the snapshot existed


def _launch(path: str, rep: int, tokens: float, micro_batch: int, device: str) -> dict[str, Any]:
    state = {"distributed_type": "DEEPSPEED"}
    rec = _record(path, rep, tokens, [10.0, 9.0], state)
    rec["ranks"][0]["args"] = {
        "warmup": 1,
        "model": "llama-270m",
        "micro_batch": micro_batch,
        "seq_len": 1024,
    }
    rec["ranks"][0]["device_name"] = device
    return {**rec, "scenario": "zero3", "gpus": 1, "ok": True}


def test_summary_never_pools_different_workloads_or_gpu_models() -> None:
    machine: dict[str, Any] = {"machine": {"versions": {}}}
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    launches = [
        _launch("optimenv", 0, 100.0, 8, h100),
        _launch("accelerate", 0, 100.0, 8, h100),
        _launch("optimenv", 0, 50.0, 32, h100),
        _launch("accelerate", 0, 60.0, 32, h100),
        _launch("optimenv", 0, 70.0, 32, h200),
        _launch("accelerate", 0, 70.0, 32, h200),
    ]
    summary = run.summarise([{"meta": machine, "launches": launches}])
    ratios = {k: c["ratio_median_tokens_per_s"] for k, c in summary["comparisons"].items()}
    assert ratios == {
        "zero3-g1-llama-270m-mb8-seq1024-H100": 1.0,
        "zero3-g1-llama-270m-mb32-seq1024-H100": pytest.approx(50 / 60),
        "zero3-g1-llama-270m-mb32-seq1024-H200": 1.0,
    }
    one = run.summarise([{"meta": machine, "launches": launches[:2]}])
    assert set(one["comparisons"]) == {"zero3-g1"}  # a single workload keeps the short key


def _results(session: str, pattern: str = "call*.json") -> list[dict[str, Any]]:
    docs = [json.loads(p.read_text()) for p in sorted((BENCH / "results" / session).glob(pattern))]
    assert docs, f"bench/gpu/results/{session}/ holds the raw GPU results of docs/gpu.md"
    return docs


def test_recorded_gpu_results_hold_the_semantic_checks() -> None:
    """Session 1 (micro-batch 8): every semantic check passes and the paths agree."""
    summary = run.summarise(_results("session1"))
    assert {"fsdp2-g1", "fsdp2-g2", "zero3-g1", "zero3-g2"} <= set(summary["comparisons"])
    for key, c in summary["comparisons"].items():
        assert c["state_identical"], (key, c["state_differences"])
        assert c["losses_ok"], (key, c["loss_max_abs_diff_between_paths"])
    checks = summary["semantic"] + summary["layouts"]
    assert len(summary["semantic"]) == 7  # halving x2, AC, offload, fp32, ZeRO-3 init x2
    assert all(check["ok"] for check in checks), [c for c in checks if not c["ok"]]
    assert not summary["failed"]


def test_recorded_gpu_comparison_runs_agree_between_paths() -> None:
    """Sessions 2 and 3 (micro-batch 32): state and losses agree, one CUDA context per rank.

    The tokens/s ratios are what docs/gpu.md reports; they are measured, not asserted here.
    """
    summary = run.summarise(_results("session2") + _results("session3", "call*-g1.json"))
    keys = set(summary["comparisons"])
    for cell in ("fsdp2-g1", "fsdp2-g2", "zero3-g1", "zero3-g2"):
        assert f"{cell}-llama-270m-mb32-seq1024-H100" in keys
    for key, c in summary["comparisons"].items():
        assert c["state_identical"], (key, c["state_differences"])
        assert c["losses_ok"], (key, c["loss_max_abs_diff_between_paths"])
        assert all(n == 0 for runs in c["extra_gpu_contexts"].values() for n in runs), key
    assert all(check["ok"] for check in summary["semantic"] + summary["layouts"])
    assert not summary["failed"]


def test_recorded_4gpu_layouts_build_the_planned_mesh_and_shards() -> None:
    """Session 3 (issue 9, 4 GPUs of one host): mesh, per-rank share, state and losses, both paths."""
    summary = run.summarise(_results("session3", "call*-g4.json"))
    assert set(summary["comparisons"]) == {"fsdp2-hsdp-g4", "fsdp2-tp-g4", "zero3-g4"}
    for key, c in summary["comparisons"].items():
        assert c["state_identical"], (key, c["state_differences"])
        assert c["losses_ok"], (key, c["loss_max_abs_diff_between_paths"])
    layouts = summary["layouts"]
    # per path: HSDP and TP a mesh and a share check, ZeRO-3 a share check
    assert len(layouts) == 10 and all(check["ok"] for check in layouts), layouts
    tp_share = [c for c in layouts if c["check"].startswith("fsdp2-tp g4")]
    assert all(0.30 < f < 0.32 for c in tp_share for f in c["observed"])
    assert not summary["failed"]


def _tp_record(local: int, full: int, in_plan: int) -> dict[str, Any]:
    rank = {
        "accelerate_state": {"device_mesh": {"dim_names": ["dp_shard", "tp"], "shape": [2, 2]}},
        "params": {"local_bytes": local, "full_bytes": full},
        "creation": {"tp_plan_full_bytes": in_plan},
    }
    return {"scenario": "fsdp2-tp", "gpus": 4, "path": "optimenv", "ranks": [rank] * 4}


def test_tp_share_halves_everything_and_the_tp_plan_again() -> None:
    """dp_shard 2 x tp 2: what the model's TP plan names is split 4 ways, the rest (embeddings) 2."""
    full, in_plan = 1000, 600
    expected = (full - in_plan) // 2 + in_plan // 4  # 200 + 150
    (mesh, share) = run.layout_checks([_tp_record(expected, full, in_plan)])
    assert mesh["ok"] and share["ok"], share
    assert "0.3500" in share["check"]
    (_, only_dp) = run.layout_checks([_tp_record(full // 2, full, in_plan)])  # TP did not shard
    assert not only_dp["ok"]
    (_, quarter) = run.layout_checks([_tp_record(full // 4, full, in_plan)])  # all split 4 ways
    assert not quarter["ok"]


def _run_on_cpus(
    tmp_path: Path, gpus: int, scenarios: str, base_port: int, launcher: str = "torchrun"
) -> dict[str, Any]:
    """The real runner with ``gpus`` gloo processes on CPUs (test shim); its summary and results."""
    env = {
        **os.environ,
        "GPU_BENCH_CPU_SHIM": "1",
        "PYTHONPATH": str(SHIM),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = tmp_path / "out"
    argv = [
        sys.executable, str(BENCH / "run.py"), "--gpus", str(gpus), "--scenarios", scenarios,
        "--reps", "1", "--model", "llama-tiny", "--steps", "3", "--warmup", "1", "--seq-len", "32",
        "--micro-batch", "2",
        "--mount-root", str(tmp_path / "mnt"), "--work", str(tmp_path / "work"), "--out", str(out),
        "--base-port", str(base_port), "--launch-timeout", "180", "--launcher", launcher,
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "summary": json.loads((out / "summary.json").read_text()),
        "results": json.loads((out / "results.json").read_text()),
    }


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_both_paths_train_alike_on_cpus(tmp_path: Path) -> None:
    """FSDP2 and ZeRO-3 over 2 processes, both paths, through the real runner (gloo, test shim)."""
    ran = _run_on_cpus(tmp_path, 2, "fsdp2,zero3", 31456)
    summary = ran["summary"]
    for key in ("fsdp2-g2", "zero3-g2"):
        c = summary["comparisons"][key]
        assert c["state_identical"], c["state_differences"]
        assert c["loss_max_abs_diff_between_paths"] == 0.0
        assert c["param_local_bytes_rank0"]["optimenv"] == c["param_local_bytes_rank0"]["accelerate"]
    for launch in ran["results"]["launches"]:
        kind = "zero3_partition" if launch["scenario"] == "zero3" else "dtensor"
        for rank in launch["ranks"]:
            assert rank["params"]["kinds"] == [kind]
            assert rank["params"]["local_bytes"] * 2 == rank["params"]["full_bytes"]
        if launch["scenario"] == "zero3":
            assert all(r["creation"]["zero3_enabled_at_creation"] for r in launch["ranks"])
            assert all(r["creation"]["created_partitioned"] for r in launch["ranks"])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_4rank_layouts_shard_as_planned_on_cpus(tmp_path: Path) -> None:
    """Issue 9 on CPUs: HSDP 2 x 2 and ZeRO-3 over 4 ranks, both paths, mesh and shares as planned."""
    summary = _run_on_cpus(tmp_path, 4, "fsdp2-hsdp,zero3", 32456)["summary"]
    for key in ("fsdp2-hsdp-g4", "zero3-g4"):
        assert summary["comparisons"][key]["state_identical"], summary["comparisons"][key][
            "state_differences"
        ]
    layouts = summary["layouts"]
    assert len(layouts) == 6  # HSDP: mesh + share, per path; ZeRO-3: share, per path
    assert all(check["ok"] for check in layouts), layouts


@pytest.mark.parametrize("path", ["optimenv", "accelerate"])
def test_ray_launches_are_optimenv_run_and_a_bare_ray_trainer(path: str, tmp_path: Path) -> None:
    launch = run.build("zero3", path, 0, 2, 0, run.TrainArgs(), tmp_path, "/", "ray")
    assert launch.launcher == "ray" and not launch.files
    train_at = launch.cmd.index(run.TRAIN)
    assert launch.cmd[train_at - 1] == "--"
    if path == "optimenv":
        assert launch.cmd[3:8] == ["run", "bench/gpu/configs/zero3.yaml", "--workers", "2", "-o"]
        assert launch.cmd[-1] != "--no-hard-exit"  # optimenv run copes with the script's os._exit
    else:
        assert launch.cmd[1:4] == ["bench/gpu/ray_bare.py", "--workers", "2"]
        assert launch.cmd[-1] == "--no-hard-exit"
        # The bare path's Accelerate variables are what accelerate launch derives from the same file.
        flags = launch.cmd[4:train_at - 1]
        env = ray_bare.accelerate_env([*flags, "--num_processes", "2", run.TRAIN])
        torchrun = run.build("zero3", "accelerate", 0, 2, 30004, run.TrainArgs(), tmp_path, "/")
        assert env == _accelerate_env(torchrun)


def test_ray_comparisons_stay_apart_and_end_the_output_with_one_line_each() -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    torchrun = [_launch("optimenv", 0, 100.0, 8, h100), _launch("accelerate", 0, 100.0, 8, h100)]
    ray = [
        {**_launch("optimenv", 0, 99.0, 8, h100), "launcher": "ray"},
        {**_launch("accelerate", 0, 100.0, 8, h100), "launcher": "ray"},
    ]
    summary = run.summarise([{"meta": {"machine": {"versions": {}}}, "launches": [*torchrun, *ray]}])
    assert set(summary["comparisons"]) == {"zero3-g1", "zero3-ray-g1"}
    assert run.ray_lines(summary) == [
        "ray-gpu: zero3-g1 ratio 0.990 0.990 to 0.990 (ok), launches 1/1, state identical, losses equal"
    ]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_workers_train_like_a_bare_ray_trainer_on_cpus(tmp_path: Path) -> None:
    """Issue 14 on CPUs: ZeRO-3 over 2 Ray Train workers, optimenv run vs a bare TorchTrainer."""
    ran = _run_on_cpus(tmp_path, 2, "zero3", 0, launcher="ray")
    c = ran["summary"]["comparisons"]["zero3-ray-g2"]
    assert c["state_identical"], c["state_differences"]
    assert c["loss_max_abs_diff_between_paths"] == 0.0
    for launch in ran["results"]["launches"]:
        assert launch["ok"] and launch["launcher"] == "ray"
        for rank in launch["ranks"]:
            assert rank["params"]["local_bytes"] * 2 == rank["params"]["full_bytes"]
            assert rank["creation"]["created_partitioned"]


def test_trimmed_wheel_drops_the_folders_and_their_record_rows(tmp_path: Path) -> None:
    import zipfile

    trim_wheel = _load("trim_wheel")
    src, dst = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "out" / "pkg-1.0-py3-none-any.whl"
    dst.parent.mkdir()
    rows = ["pkg/__init__.py,sha256=a,1", "pkg/jars/big.jar,sha256=b,2", "pkg/web/build/x.js,sha256=c,3"]
    with zipfile.ZipFile(src, "w") as whl:
        for row in rows:
            whl.writestr(row.split(",")[0], "x")
        whl.writestr("pkg-1.0.dist-info/RECORD", "\n".join([*rows, "pkg-1.0.dist-info/RECORD,,"]) + "\n")
    assert trim_wheel.trim(src, dst, ["pkg/jars/", "pkg/web/build/"]) == (2, 2)
    with zipfile.ZipFile(dst) as whl:
        assert sorted(whl.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        assert whl.read("pkg-1.0.dist-info/RECORD").decode().splitlines() == [
            "pkg/__init__.py,sha256=a,1",
            "pkg-1.0.dist-info/RECORD,,",
        ]
