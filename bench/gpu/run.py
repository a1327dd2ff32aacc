"""GPU proof: the same training launched through optimenv and through ``accelerate launch``, alternating.

Path A (optimenv) is what a PyTorchJob rendered by ``optimenv render --target pytorchjob`` runs in
its pod: the env ConfigMap as the container's environment, the spec and DeepSpeed ConfigMaps written
at their mount paths, the variables the Kubeflow operator injects (``MASTER_ADDR``/``MASTER_PORT``,
``WORLD_SIZE``, ``RANK`` = node rank, ``PET_*``), and the container command exactly as rendered:
``optimenv-bootstrap --spec … -- torchrun --no-python python3 train.py`` (exec mode; torchrun reads
``PET_*``). For ZeRO-3 each rank's command is ``python3 -m optimenv.bootstrap run train.py`` (the
in-process mode that holds transformers' ZeRO-3 config). Path B is ``accelerate launch
--config_file`` with a hand-written config of the same settings (``configs/accelerate/``).

Usage (on a GPU machine, from the repository root)::

    python3 bench/gpu/run.py --gpus 1 --scenarios fsdp2,zero3 --semantic --reps 3 --out OUT
    python3 bench/gpu/run.py --gpus 4 --scenarios fsdp2-hsdp,fsdp2-tp,zero3 --reps 3 --out OUT
    python3 bench/gpu/run.py report OUT1/results.json OUT2/results.json   # merge, check, print

Raw results go to ``OUT/results.json`` (every launch, every rank), the checks and statistics to
``OUT/summary.json`` and a table to ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIGS = HERE / "configs"
TRAIN = "bench/gpu/train.py"  # relative to the repository root, where every launch runs
# NVLink multicast stays off on shared hosts (KINDS.md); set for every launch, both paths.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# What the launcher or a previous run may have left in our own environment: never inherited.
_STRIP_PREFIXES = ("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_", "PET_", "OPTIMENV_", "TORCHELASTIC_")
_STRIP_NAMES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
BASE_PORT = 23456  # the PyTorchJob operator's default pytorchjob-port; one port per launch


@dataclass(frozen=True)
class Scenario:
    """One comparison: an optimenv config (path A) and the matching Accelerate config (path B)."""

    name: str
    config: str  # under configs/
    accelerate: str | None  # under configs/accelerate/, "{gpus}" filled in; None: path A only
    gpus: tuple[int, ...]  # GPU counts it is defined for
    zero3: bool = False  # ranks run `python -m optimenv.bootstrap run` (in-process mode)
    # Path B flags for what Accelerate refuses in a config that names a DeepSpeed file
    # (mixed_precision, gradient_accumulation_steps): the same values, on the command line.
    launch_flags: tuple[str, ...] = ()
    needs_model_dir: bool = False  # tensor parallelism loads a saved random model with tp_plan
    # Issue 9: the device mesh Accelerate must build, and the share of the model one rank holds.
    mesh: tuple[tuple[str, ...], tuple[int, ...]] | None = None
    shard_fraction: dict[int, float] = field(default_factory=dict)
    # Tensor parallelism splits the parameters in the model's TP plan a further tp_size ways;
    # the rest (embeddings, norms) stays whole across "tp".
    tp_size: int = 1


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("fsdp2", "fsdp2.yaml", "fsdp2-{gpus}gpu.yaml", (1, 2), shard_fraction={1: 1.0, 2: 0.5}),
        Scenario(
            "zero3",
            "zero3.yaml",
            "zero3-{gpus}gpu.yaml",
            (1, 2, 4),
            zero3=True,
            launch_flags=("--mixed_precision", "bf16", "--gradient_accumulation_steps", "1"),
            shard_fraction={1: 1.0, 2: 0.5, 4: 0.25},
        ),
        # Semantic checks, through optimenv only: each against "fsdp2" on the same GPU count.
        Scenario("fsdp2-ac", "fsdp2-ac.yaml", None, (1, 2)),
        Scenario("fsdp2-offload", "fsdp2-offload.yaml", None, (1, 2)),
        Scenario("fsdp2-fp32", "fsdp2-fp32.yaml", None, (1, 2)),
        # Issue 9 (4 GPUs of one host).
        Scenario(
            "fsdp2-hsdp",
            "fsdp2-hsdp.yaml",
            "fsdp2-hsdp-{gpus}gpu.yaml",
            (4,),
            mesh=(("dp_replicate", "dp_shard"), (2, 2)),
            shard_fraction={4: 0.5},
        ),
        Scenario(
            "fsdp2-tp",
            "fsdp2-tp.yaml",
            "fsdp2-tp-{gpus}gpu.yaml",
            (4,),
            needs_model_dir=True,
            mesh=(("dp_shard", "tp"), (2, 2)),
            shard_fraction={4: 0.5},
            tp_size=2,
        ),
    )
}
SEMANTIC = ("fsdp2-ac", "fsdp2-offload", "fsdp2-fp32")


@dataclass
class Launch:
    """One process tree to start: command, environment, and the files its 'pod' mounts."""

    scenario: str
    gpus: int
    path: str  # "optimenv" or "accelerate"
    rep: int
    cmd: list[str]
    env: dict[str, str]  # what this launch adds to the cleaned base environment
    files: dict[str, str]  # absolute path -> content, written just before the launch
    out_dir: str
    port: int
    launcher: str = "torchrun"  # or "ray": Ray Train workers (optimenv run / a bare TorchTrainer)


@dataclass(frozen=True)
class TrainArgs:
    model: str = "llama-270m"
    steps: int = 25
    warmup: int = 5
    micro_batch: int = 8
    seq_len: int = 1024
    seed: int = 1234
    model_dir: str | None = None

    def argv(self, out_dir: str, label: str) -> list[str]:
        argv = [
            "--model",
            self.model,
            "--steps",
            str(self.steps),
            "--warmup",
            str(self.warmup),
            "--micro-batch",
            str(self.micro_batch),
            "--seq-len",
            str(self.seq_len),
            "--seed",
            str(self.seed),
            "--out-dir",
            out_dir,
            "--label",
            label,
        ]
        if self.model_dir:
            argv += ["--model-dir", self.model_dir]
        return argv


def _mounted(path: str, mount_root: str) -> str:
    """Where a pod path lives on this machine (``mount_root`` "/" on the GPU machine); idempotent."""
    if mount_root in ("", "/") or path.startswith(mount_root.rstrip("/") + "/"):
        return path
    return str(Path(mount_root) / path.lstrip("/"))


def optimenv_launch(
    scenario: Scenario, gpus: int, rep: int, port: int, train: TrainArgs, work: Path, mount_root: str
) -> Launch:
    """Path A: render the PyTorchJob for this config and start its pod's container on this machine."""
    from optimenv import JobSpec, Topology, compile, load_config

    label = f"{scenario.name}-g{gpus}-optimenv-{rep}"
    out_dir = str(work / label)
    ds_path = _mounted("/etc/optimenv/deepspeed.json", mount_root)
    config = load_config(CONFIGS / scenario.config)
    per_rank = ["python3"]
    if scenario.zero3:
        per_rank += ["-m", "optimenv.bootstrap", "run"]
    per_rank += [TRAIN, *train.argv(out_dir, label)]
    job = JobSpec(target="pytorchjob", image="local", command=per_rank)
    topology = Topology(nodes=1, gpus_per_node=gpus)
    objects = compile(config, topology, job, name="gpu-bench", deepspeed_path=ds_path).manifests()
    cmd, env, files = pod(objects, "Master", 0, port, mount_root)
    return Launch(scenario.name, gpus, "optimenv", rep, cmd, env, files, out_dir, port)


def pod(
    objects: list[dict[str, Any]], replica: str, index: int, port: int, mount_root: str
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """One pod of a rendered PyTorchJob on this machine: its command, environment and mounted files.

    The environment is the env ConfigMap, the container's own variables, and what the Kubeflow
    operator injects (operators-env.md §3.2): the node rank is the pod's (Master 0, Worker i + 1),
    and the Service name <job>-master-0 resolves to this machine here.
    """
    from optimenv.spec import SPEC_PATH

    job = objects[-1]
    specs = job["spec"]["pytorchReplicaSpecs"]
    container = specs[replica]["template"]["spec"]["containers"][0]
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):  # the env ConfigMap
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        env[item["name"]] = (
            _mounted(item["value"], mount_root) if item["value"] == SPEC_PATH else item["value"]
        )
    files: dict[str, str] = {}
    volumes = specs[replica]["template"]["spec"]["volumes"]
    for mount in container.get("volumeMounts", []):  # ConfigMap files at their mount paths
        volume = next(v for v in volumes if v["name"] == mount["name"])
        if "configMap" in volume:
            data = configmaps[volume["configMap"]["name"]]["data"]
            files[_mounted(mount["mountPath"], mount_root)] = data[mount["subPath"]]
    nodes = sum(int(spec["replicas"]) for spec in specs.values())
    nproc = job["spec"]["nprocPerNode"]
    node_rank = index if replica == "Master" else index + 1
    env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PET_MASTER_PORT": str(port),
            "WORLD_SIZE": str(nodes * int(nproc)),
            "RANK": str(node_rank),
            "PET_NODE_RANK": str(node_rank),
            "PET_NNODES": str(nodes),
            "PET_NPROC_PER_NODE": nproc,
        }
    )
    cmd = [_mounted(a, mount_root) if a == SPEC_PATH else a for a in container["command"]]
    return cmd, env, files


def accelerate_launch(
    scenario: Scenario, gpus: int, rep: int, port: int, train: TrainArgs, work: Path
) -> Launch:
    """Path B: ``accelerate launch --config_file <hand-written config>``."""
    if scenario.accelerate is None:
        raise ValueError(f"{scenario.name} has no accelerate-launch counterpart")
    label = f"{scenario.name}-g{gpus}-accelerate-{rep}"
    out_dir = str(work / label)
    config = CONFIGS / "accelerate" / scenario.accelerate.format(gpus=gpus)
    if not config.is_file():
        raise ValueError(f"{scenario.name}: no hand-written Accelerate config for {gpus} GPU(s) ({config})")
    cmd = ["accelerate", "launch", "--config_file", str(config.relative_to(REPO))]
    cmd += scenario.launch_flags
    cmd += ["--main_process_port", str(port), TRAIN, *train.argv(out_dir, label)]
    return Launch(scenario.name, gpus, "accelerate", rep, cmd, {}, {}, out_dir, port)


def base_env(visible: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIP_PREFIXES) and k not in _STRIP_NAMES}
    env.update(NO_MULTICAST)
    env["PYTHONUNBUFFERED"] = "1"
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


def schedule(scenarios: list[str], semantic: list[str], reps: int) -> list[tuple[str, str, int]]:
    """(scenario, path, rep) in launch order: rounds over the scenarios, A/B then B/A, semantics last."""
    order: list[tuple[str, str, int]] = []
    for rep in range(reps):
        for name in scenarios:
            pair = ("optimenv", "accelerate") if rep % 2 == 0 else ("accelerate", "optimenv")
            order += [(name, path, rep) for path in pair]
    order += [(name, "optimenv", 0) for name in semantic]
    return order


def build(
    name: str,
    path: str,
    rep: int,
    gpus: int,
    port: int,
    train: TrainArgs,
    work: Path,
    mount_root: str,
    launcher: str = "torchrun",
) -> Launch:
    scenario = SCENARIOS[name]
    if gpus not in scenario.gpus:
        raise ValueError(f"{name} is defined for {scenario.gpus} GPUs, not {gpus}")
    if not scenario.needs_model_dir:  # the other layouts build the model from its config
        train = TrainArgs(**{**train.__dict__, "model_dir": None})
    if launcher == "ray":
        return ray_launch(scenario, path, gpus, rep, train, work)
    if path == "optimenv":
        return optimenv_launch(scenario, gpus, rep, port, train, work, mount_root)
    return accelerate_launch(scenario, gpus, rep, port, train, work)


def ray_launch(scenario: Scenario, path: str, gpus: int, rep: int, train: TrainArgs, work: Path) -> Launch:
    """Ray Train workers, one a GPU: ``optimenv run CONFIG -- train.py`` (A) or a bare ``TorchTrainer``
    with the hand-written Accelerate config (B, ``ray_bare.py``); both start a local Ray cluster."""
    if scenario.accelerate is None:
        raise ValueError(f"{scenario.name} has no hand-written Accelerate config to compare with")
    label = f"{scenario.name}-ray-g{gpus}-{path}-{rep}"
    out_dir = str(work / label)
    argv = train.argv(out_dir, label)
    if path == "optimenv":
        cli = [sys.executable, "-c", "from optimenv.cli import main; main()"]
        config = str((CONFIGS / scenario.config).relative_to(REPO))
        log = ["--log", f"{out_dir}/optimenv-run.log"]
        cmd = [*cli, "run", config, "--workers", str(gpus), "-o", "json", *log, "--", TRAIN, *argv]
    else:
        accelerate = CONFIGS / "accelerate" / scenario.accelerate.format(gpus=gpus)
        flags = ["--config_file", str(accelerate.relative_to(REPO)), *scenario.launch_flags]
        cmd = [sys.executable, "bench/gpu/ray_bare.py", "--workers", str(gpus), *flags]
        cmd += ["--", TRAIN, *argv, "--no-hard-exit"]
    return Launch(scenario.name, gpus, path, rep, cmd, {}, {}, out_dir, 0, launcher="ray")


def execute(launch: Launch, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Start one launch, wait, collect every rank's JSON."""
    for path, text in launch.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    out = Path(launch.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    full_env = {**env, **launch.env}
    t0 = time.time()
    full_env["BENCH_LAUNCH_T0"] = repr(t0)
    log = out / "launch.log"
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(launch.cmd)}\n# env added: {json.dumps(launch.env, sort_keys=True)}\n")
        fh.flush()
        proc = subprocess.Popen(
            launch.cmd, env=full_env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            kill_tree(proc)
    wall = time.time() - t0
    ranks = []
    for f in sorted(out.glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        ranks.append(json.loads(f.read_text()))
    record: dict[str, Any] = {
        "scenario": launch.scenario,
        "gpus": launch.gpus,
        "path": launch.path,
        "rep": launch.rep,
        "cmd": launch.cmd,
        "env_added": launch.env,
        "files": sorted(launch.files),
        "port": launch.port,
        "launcher": launch.launcher,
        "rc": rc,
        "wall_s": wall,
        "start": t0,
        "ranks": ranks,
    }
    ok = rc == 0 and len(ranks) == launch.gpus
    record["ok"] = ok
    if not ok:
        record["log_tail"] = log.read_text(errors="replace")[-6000:]
    return record


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop a launch and every process under it (torchrun puts its workers in their own sessions)."""
    import signal

    try:
        import psutil

        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except Exception:  # psutil missing, or the launcher already gone
        family = []
    for p in family:
        with contextlib.suppress(Exception):  # already exited
            p.send_signal(signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "host": os.uname().nodename}
    versions = {}
    for mod in ("torch", "accelerate", "transformers", "deepspeed", "pydantic", "optimenv"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception as exc:
            versions[mod] = f"missing ({type(exc).__name__})"
    info["versions"] = versions
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,driver_version,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        info["nvidia_topo"] = topo.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = [f"unavailable: {exc}"]
    info["tools"] = {t: shutil.which(t) for t in ("torchrun", "accelerate", "optimenv-bootstrap", "python3")}
    return info


def save_model(train: TrainArgs, model_dir: str, env: dict[str, str]) -> None:
    """A random model on disk, for layouts that load with a tensor-parallel plan."""
    if (Path(model_dir) / "config.json").is_file():
        return
    code = (
        "import sys; sys.path.insert(0, 'bench/gpu'); import train, torch; "
        f"from transformers import AutoModelForCausalLM; torch.manual_seed({train.seed}); "
        f"AutoModelForCausalLM.from_config(train.llama_config({train.model!r})).save_pretrained({model_dir!r})"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=300)


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    scenarios = [s for s in args.scenarios.split(",") if s]
    semantic = list(SEMANTIC) if args.semantic else []
    if semantic and args.launcher == "ray":
        raise SystemExit("--semantic: only with --launcher torchrun (the checks compare torchrun launches)")
    for name in scenarios + semantic:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    work = Path(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = base_env(args.visible)
    train = TrainArgs(
        model=args.model,
        steps=args.steps,
        warmup=args.warmup,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    if any(SCENARIOS[s].needs_model_dir for s in scenarios):
        model_dir = str(work / f"model-{args.model}-{args.seed}")
        train = TrainArgs(**{**train.__dict__, "model_dir": model_dir})
    order = schedule(scenarios, semantic, args.reps)
    port = args.base_port
    launches = [
        build(name, path, rep, args.gpus, port + i, train, work, args.mount_root, args.launcher)
        for i, (name, path, rep) in enumerate(order)
    ]
    if args.dry_run:
        for launch in launches:
            added = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(launch.env.items()))
            print(f"# {launch.scenario} g{launch.gpus} {launch.path} rep {launch.rep}")
            for path, text in sorted(launch.files.items()):
                print(f"#   writes {path} ({len(text)} bytes)")
            print(f"{added} {shlex.join(launch.cmd)}".strip())
        return 0
    if train.model_dir:
        save_model(train, train.model_dir, env)

    machine = machine_info()
    meta: dict[str, Any] = {"machine": machine, "args": vars(args), "start": t_start, "train": train.__dict__}
    print(f"[run] {json.dumps(machine['versions'])} {machine.get('nvidia_smi')}", file=sys.stderr)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed_scenarios: set[str] = set()
    # Seconds per launch, per scenario (the longest seen); before one ran, the longest of any.
    seen: dict[str, float] = {}

    def estimate(name: str) -> float:
        return seen.get(name, max(seen.values(), default=args.first_estimate_s))

    if args.warm_launch and launches:  # one short launch first: file cache, CUDA and NCCL warm
        warm = build(
            order[0][0],
            "accelerate" if SCENARIOS[order[0][0]].accelerate else "optimenv",
            0,
            args.gpus,
            port + len(order),
            TrainArgs(**{**train.__dict__, "steps": 3, "warmup": 1}),
            work / "warm",
            args.mount_root,
            args.launcher,
        )
        rec = execute(warm, env, args.launch_timeout)
        rec["warm_up"] = True
        meta["warm_up"] = {k: rec[k] for k in ("scenario", "path", "rc", "wall_s", "ok")}
        print(f"[run] warm-up {warm.path} rc={rec['rc']} {rec['wall_s']:.1f}s", file=sys.stderr)
    paired = len(order) - len(semantic)  # the first `paired` launches come in A/B pairs
    skip_partner = False
    for index, launch in enumerate(launches):
        is_semantic = index >= paired
        elapsed = time.time() - t_start
        why = None
        if launch.scenario in failed_scenarios:
            why = "an earlier launch of this scenario failed"
        elif not is_semantic and index % 2 == 1 and skip_partner:
            why = "its partner in the A/B pair was skipped"
        else:
            # A pair starts only if both launches fit, leaving room for the semantic runs.
            need = estimate(launch.scenario) * (2 if not is_semantic and index % 2 == 0 else 1)
            if not is_semantic:
                need += sum(estimate(name) for name in semantic)
            if elapsed + need > args.deadline_s:
                why = f"time budget: {elapsed:.0f}s used of {args.deadline_s:.0f}s"
        if not is_semantic and index % 2 == 0:
            skip_partner = why is not None
        if why is not None:
            skipped.append({"scenario": launch.scenario, "path": launch.path, "rep": launch.rep, "why": why})
            continue
        rec = execute(launch, env, args.launch_timeout)
        results.append(rec)
        seen[launch.scenario] = max(seen.get(launch.scenario, 0.0), rec["wall_s"])
        tok = rec["ranks"][0]["tokens_per_s"] if rec["ok"] else float("nan")
        print(
            f"[run] {launch.scenario} g{launch.gpus} {launch.path:10s} rep {launch.rep} rc={rec['rc']} "
            f"wall={rec['wall_s']:.1f}s tok/s={tok:.0f}",
            file=sys.stderr,
            flush=True,
        )
        if not rec["ok"]:
            print(rec.get("log_tail", "")[-3000:], file=sys.stderr)
            failed_scenarios.add(launch.scenario)
            if args.fail_fast:
                break
        # Saved after every launch: a call cut short still returns what it measured.
        write_results(out, meta, results, skipped)
    meta["end"] = time.time()
    write_results(out, meta, results, skipped)
    summary = summarise([{"meta": meta, "launches": results, "skipped": skipped}])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    table = markdown(summary)
    (out / "summary.md").write_text(table)
    print(table)
    print("\n".join(ray_lines(summary)))
    if args.logs:
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for log in sorted(work.glob("*/launch.log")):
                tar.add(log, arcname=f"{log.parent.name}.log")
    return 0 if all(r["ok"] for r in results) and results else 1


def write_results(out: Path, meta: dict[str, Any], results: list[dict[str, Any]], skipped: list[Any]) -> None:
    doc = {"meta": meta, "launches": results, "skipped": skipped}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / "results.json")


# ----------------------------------------------------------------------------------------------
# Statistics and checks


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def _rank0(rec: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in rec["ranks"] if r["rank"] == 0)


def _first_difference(a: Any, b: Any, at: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{at}.{key}" if at else key
            if key not in a or key not in b:
                return f"{sub}: only in {'B' if key not in a else 'A'}"
            diff = _first_difference(a[key], b[key], sub)
            if diff:
                return diff
        return None
    if a != b:
        return f"{at}: A={json.dumps(a)[:200]} B={json.dumps(b)[:200]}"
    return None


LOSS_TOLERANCE = 0.05  # absolute, on a loss of ~10.4: bf16 rounding (8 bits of mantissa) is ~0.04 there


def _median_step_rate(rec: dict[str, Any]) -> float:
    r = _rank0(rec)
    ends = r["step_end"]
    warm = r["args"]["warmup"]
    steps = [b - a for a, b in zip(ends[max(warm - 1, 0) :], ends[max(warm, 1) :], strict=False)]
    return float(r["tokens_per_step_global"] / statistics.median(steps))


def _extra_contexts(rec: dict[str, Any]) -> int | None:
    """How many CUDA contexts the launch's ranks hold beyond one each (from nvidia-smi after training)."""
    pids = {r.get("gpu_snapshot", {}).get("pid") for r in rec["ranks"]} - {None}
    apps = _rank0(rec).get("gpu_snapshot", {}).get("apps")
    if not pids or not isinstance(apps, list):
        return None
    held = sum(1 for row in apps if row and row[0].isdigit() and int(row[0]) in pids)
    return held - len(pids)


def ratio_interval(
    a: list[float], b: list[float], level: float = 0.9, draws: int = 4000, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap interval of median(a) / median(b): how far launch-to-launch noise lets it move.

    Resamples each path's launches with replacement (seeded: the same results give the same
    interval). With 3-7 launches per path it is coarse, but it shows whether a ratio of 0.97 or
    1.07 is distinguishable from 1.
    """
    if not a or not b:
        return None
    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
        for _ in range(draws)
    )
    tail = int(draws * (1 - level) / 2)
    return ratios[tail], ratios[draws - 1 - tail]


def compare_paths(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s ratio, state identity, loss agreement for one scenario and GPU count."""
    tok_a = [_rank0(r)["tokens_per_s"] for r in a_runs]
    tok_b = [_rank0(r)["tokens_per_s"] for r in b_runs]
    ttfs_a = [_rank0(r)["first_step_from_launch_s"] for r in a_runs]
    ttfs_b = [_rank0(r)["first_step_from_launch_s"] for r in b_runs]
    ratio = statistics.median(tok_a) / statistics.median(tok_b) if tok_a and tok_b else None
    # Steady-state rate from the median step (robust to a few slow steps), and A/B ratios of
    # the two launches of one pair (same call, same round: shares the machine's drift).
    med_a = [_median_step_rate(r) for r in a_runs]
    med_b = [_median_step_rate(r) for r in b_runs]
    by_pair = {(r.get("_call", 0), r["rep"]): _rank0(r)["tokens_per_s"] for r in b_runs}
    paired = [
        _rank0(r)["tokens_per_s"] / by_pair[(r.get("_call", 0), r["rep"])]
        for r in a_runs
        if (r.get("_call", 0), r["rep"]) in by_pair
    ]
    # Accelerate's state, rank by rank, of every run against the first run of path B.
    state_diffs = []
    if b_runs:
        ref = {r["rank"]: r["accelerate_state"] for r in b_runs[0]["ranks"]}
        for run in a_runs + b_runs[1:]:
            for rank in run["ranks"]:
                diff = _first_difference(rank["accelerate_state"], ref.get(rank["rank"]))
                if diff:
                    state_diffs.append(f"{run['path']} rep {run['rep']} rank {rank['rank']}: {diff}")
    loss_a = [_rank0(r)["losses"] for r in a_runs]
    loss_b = [_rank0(r)["losses"] for r in b_runs]
    contexts = {
        path: [_extra_contexts(r) for r in runs]
        for path, runs in (("optimenv", a_runs), ("accelerate", b_runs))
    }

    def max_diff(xs: list[list[float]], ys: list[list[float]]) -> float | None:
        pairs = [max(abs(p - q) for p, q in zip(x, y, strict=True)) for x in xs for y in ys if x is not y]
        return max(pairs) if pairs else None

    between = max_diff(loss_a, loss_b)
    peak = {
        path: _stats([max(k["mem_train"].get("max_allocated", 0) for k in r["ranks"]) / 2**30 for r in runs])
        for path, runs in (("optimenv", a_runs), ("accelerate", b_runs))
    }
    return {
        "tokens_per_s": {"optimenv": _stats(tok_a), "accelerate": _stats(tok_b)},
        "ratio_median_tokens_per_s": ratio,
        "ratio_ok": ratio is not None and ratio >= 0.98,
        "ratio_interval_90": ratio_interval(tok_a, tok_b),
        "tokens_per_s_median_step": {"optimenv": _stats(med_a), "accelerate": _stats(med_b)},
        "ratio_median_step": statistics.median(med_a) / statistics.median(med_b) if med_a and med_b else None,
        "paired_ratios": [round(x, 4) for x in paired],
        "paired_ratio_median": statistics.median(paired) if paired else None,
        "first_step_from_launch_s": {"optimenv": _stats(ttfs_a), "accelerate": _stats(ttfs_b)},
        "launch_wall_s": {
            "optimenv": _stats([r["wall_s"] for r in a_runs]),
            "accelerate": _stats([r["wall_s"] for r in b_runs]),
        },
        "peak_allocated_gib_max_rank": peak,
        "param_local_bytes_rank0": {
            "optimenv": sorted({_rank0(r)["params"]["local_bytes"] for r in a_runs}),
            "accelerate": sorted({_rank0(r)["params"]["local_bytes"] for r in b_runs}),
        },
        # CUDA contexts a rank holds on GPUs other than its own (None: not recorded).
        "extra_gpu_contexts": contexts,
        "state_identical": bool(a_runs and b_runs) and not state_diffs,
        "state_differences": state_diffs[:20],
        "loss_max_abs_diff_between_paths": between,
        "loss_max_abs_diff_within_optimenv": max_diff(loss_a, loss_a),
        "loss_max_abs_diff_within_accelerate": max_diff(loss_b, loss_b),
        "losses_ok": between is not None and between <= LOSS_TOLERANCE,
        "losses_rank0_first": {
            "optimenv": loss_a[0] if loss_a else None,
            "accelerate": loss_b[0] if loss_b else None,
        },
    }


def semantic_checks(ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The env really acts: each check compares optimenv-path runs (same GPU count unless said)."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rec in ok:
        if rec["path"] == "optimenv":
            by.setdefault((rec["scenario"], rec["gpus"]), []).append(rec)
    checks: list[dict[str, Any]] = []

    def med(runs: list[dict[str, Any]], fn: Any) -> float:
        return float(statistics.median(fn(r) for r in runs))

    def peak(r: dict[str, Any]) -> float:
        return float(max(k["mem_train"]["max_allocated"] for k in r["ranks"]) / 2**30)

    def after_prepare(r: dict[str, Any]) -> float:
        return float(max(k["mem_after_prepare"]["allocated"] for k in r["ranks"]) / 2**30)

    gpu_counts = sorted({g for _, g in by})
    for name in ("fsdp2", "zero3"):
        for g in gpu_counts:
            if g == 1 or (name, g) not in by or (name, 1) not in by:
                continue
            one = _rank0(by[(name, 1)][0])["params"]["local_bytes"]
            many = [k["params"]["local_bytes"] for k in by[(name, g)][0]["ranks"]]
            fraction = max(many) / one
            checks.append(
                {
                    "check": f"{name}: per-rank parameter bytes on {g} GPUs = 1/{g} of 1 GPU",
                    "observed": {"one_gpu": one, f"{g}_gpus_per_rank": many, "fraction": fraction},
                    "ok": abs(fraction - 1 / g) <= 0.02 / g,
                }
            )
    for g in gpu_counts:
        base = by.get(("fsdp2", g))
        if not base:
            continue
        # Memory and speed against the plain run of the same call (same machine) where there is one.
        calls = {r.get("_call", 0) for name in SEMANTIC for r in by.get((name, g), [])}
        same = [r for r in base if r.get("_call", 0) in calls]
        base = same or base
        if ("fsdp2-ac", g) in by:
            a, b = med(base, peak), med(by[("fsdp2-ac", g)], peak)
            checks.append(
                {
                    "check": f"activation_checkpointing lowers peak GPU memory ({g} GPU)",
                    "observed": {
                        "peak_gib_off": a,
                        "peak_gib_on": b,
                        "state_on": _rank0(by[("fsdp2-ac", g)][0])["accelerate_state"]["fsdp_plugin"][
                            "activation_checkpointing"
                        ],
                    },
                    "ok": b < a,
                }
            )
        if ("fsdp2-offload", g) in by:
            run = by[("fsdp2-offload", g)][0]
            a, b = med(base, after_prepare), med([run], after_prepare)
            pa, pb = med(base, peak), med([run], peak)
            on_gpu = _rank0(run)["params"]["local_bytes_by_device"].get("cuda", 0)
            checks.append(
                {
                    "check": f"offload_params lowers GPU memory ({g} GPU)",
                    "observed": {
                        "after_prepare_gib_off": a,
                        "after_prepare_gib_on": b,
                        "peak_gib_off": pa,
                        "peak_gib_on": pb,
                        "param_bytes_on_gpu_on": on_gpu,
                        "tokens_per_s_off": med(base, lambda r: _rank0(r)["tokens_per_s"]),
                        "tokens_per_s_on": _rank0(run)["tokens_per_s"],
                    },
                    "ok": b < a and pb < pa and on_gpu == 0,
                }
            )
        if ("fsdp2-fp32", g) in by:
            run = by[("fsdp2-fp32", g)][0]
            t_bf16 = med(base, lambda r: _rank0(r)["tokens_per_s"])
            t_fp32 = _rank0(run)["tokens_per_s"]
            checks.append(
                {
                    "check": f"bf16: false changes the dtype and the speed ({g} GPU)",
                    "observed": {
                        "logits_dtype_bf16": _rank0(base[0])["logits_dtype"],
                        "logits_dtype_fp32": _rank0(run)["logits_dtype"],
                        "mixed_precision_fp32": _rank0(run)["accelerate_state"]["mixed_precision"],
                        "tokens_per_s_bf16": t_bf16,
                        "tokens_per_s_fp32": t_fp32,
                        "speed_ratio_fp32_over_bf16": t_fp32 / t_bf16,
                    },
                    "ok": _rank0(run)["logits_dtype"] == "torch.float32"
                    and _rank0(base[0])["logits_dtype"] == "torch.bfloat16"
                    and t_fp32 < t_bf16,
                }
            )
        zero3 = by.get(("zero3", g))
        if zero3:
            ranks = [k for r in zero3 for k in r["ranks"]]
            fractions = [
                k["creation"]["params_at_creation"]["local_bytes"]
                / k["creation"]["params_at_creation"]["full_bytes"]
                for k in ranks
            ]
            checks.append(
                {
                    "check": f"ZeRO-3 model created partitioned ({g} GPU)",
                    "observed": {
                        "zero3_enabled_at_creation": sorted(
                            {k["creation"]["zero3_enabled_at_creation"] for k in ranks}
                        ),
                        "created_partitioned": sorted({k["creation"]["created_partitioned"] for k in ranks}),
                        "local_over_full_at_creation": sorted(set(round(f, 4) for f in fractions)),
                    },
                    "ok": all(
                        k["creation"]["zero3_enabled_at_creation"] and k["creation"]["created_partitioned"]
                        for k in ranks
                    )
                    and all(abs(f - 1 / g) <= 0.02 / g for f in fractions),
                }
            )
    return checks


def layout_checks(ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 9: the mesh Accelerate built equals the config's, and each rank holds its share."""
    checks = []
    done: set[tuple[str, int, str]] = set()
    for rec in ok:
        scenario = SCENARIOS.get(rec["scenario"])
        key = (rec["scenario"], rec["gpus"], rec["path"])
        if scenario is None or key in done:
            continue
        done.add(key)
        expected_fraction = scenario.shard_fraction.get(rec["gpus"])
        if scenario.mesh is not None:
            names, shape = scenario.mesh
            meshes = [k["accelerate_state"].get("device_mesh") for k in rec["ranks"]]
            good = all(
                m is not None
                and tuple(m["dim_names"][: len(names)]) == names
                and tuple(m["shape"][: len(shape)]) == shape
                for m in meshes
            )
            checks.append(
                {
                    "check": f"{rec['scenario']} {rec['path']}: device mesh {names}={shape}",
                    "observed": meshes[0],
                    "ok": good,
                }
            )
        if expected_fraction is not None and rec["gpus"] > 1:
            observed, expected = [], []
            for k in rec["ranks"]:
                full = k["params"]["full_bytes"]
                observed.append(k["params"]["local_bytes"] / full)
                share = expected_fraction
                if scenario.tp_size > 1:
                    in_plan = k["creation"]["tp_plan_full_bytes"]
                    share *= (full - in_plan + in_plan / scenario.tp_size) / full
                expected.append(share)
            checks.append(
                {
                    "check": f"{rec['scenario']} g{rec['gpus']} {rec['path']}: "
                    f"rank holds {_share_text(scenario, rec['gpus'], expected[0])} of the parameters",
                    "observed": [round(f, 4) for f in observed],
                    "ok": all(abs(f - e) <= 0.01 * e for f, e in zip(observed, expected, strict=True)),
                }
            )
    return checks


def _share_text(scenario: Scenario, gpus: int, expected: float) -> str:
    base = f"{scenario.shard_fraction[gpus]:g}"
    if scenario.tp_size == 1:
        return base
    return f"{expected:.4f} ({base} of all, 1/{scenario.tp_size} more of the TP plan's)"


def _workload(rec: dict[str, Any]) -> str:
    """What a launch measured on: the model, the batch shape and the GPU model."""
    r = _rank0(rec)
    a = r["args"]
    device = r["device_name"].replace("NVIDIA ", "").split()[0]
    return f"-{a['model']}-mb{a['micro_batch']}-seq{a['seq_len']}-{device}"


def summarise(docs: list[dict[str, Any]]) -> dict[str, Any]:
    launches = [
        {**rec, "_call": i} for i, doc in enumerate(docs) for rec in doc["launches"] if not rec.get("warm_up")
    ]
    ok = [rec for rec in launches if rec["ok"]]
    # Launches of different workloads (model, micro-batch, sequence, GPU model) are never pooled;
    # the workload joins the key only where the results hold more than one.
    workloads = {_workload(rec) for rec in ok}
    groups: dict[tuple[str, int, str], dict[str, list[dict[str, Any]]]] = {}
    for rec in ok:
        # Ray Train launches are compared among themselves, never pooled with torchrun's.
        name = rec["scenario"] + ("-ray" if rec.get("launcher") == "ray" else "")
        key = (name, rec["gpus"], _workload(rec) if len(workloads) > 1 else "")
        groups.setdefault(key, {}).setdefault(rec["path"], []).append(rec)
    comparisons = {}
    for (name, g, workload), paths in sorted(groups.items()):
        scenario = SCENARIOS.get(name.removesuffix("-ray"))
        if "accelerate" in paths or (scenario and scenario.accelerate):
            comparisons[f"{name}-g{g}{workload}"] = compare_paths(
                paths.get("optimenv", []), paths.get("accelerate", [])
            )
    devices = sorted({r["device_name"] for rec in ok for r in rec["ranks"]})
    versions = [doc["meta"]["machine"]["versions"] for doc in docs]
    return {
        "devices": devices,
        "versions": versions,
        "comparisons": comparisons,
        "semantic": semantic_checks(ok),
        "layouts": layout_checks(ok),
        "failed": [
            {k: rec.get(k) for k in ("scenario", "gpus", "path", "rep", "rc", "log_tail")}
            for rec in launches
            if not rec["ok"]
        ],
        "skipped": [s for doc in docs for s in doc.get("skipped", [])],
    }


def _fmt(stats: dict[str, float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if not stats:
        return "-"
    return "/".join(f"{stats[k] * scale:.{digits}f}" for k in ("min", "median", "max")) + f" (n={stats['n']})"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(bounds: Any) -> str:
    return "-" if not bounds else f"{bounds[0]:.3f} to {bounds[1]:.3f}"


def _median(stats: dict[str, float] | None) -> str:
    return "-" if not stats else f"{stats['median']:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| scenario | tokens/s optimenv (min/med/max) | tokens/s accelerate | ratio of medians "
        "| 90% interval | paired A/B (median) | ratio, median step | state | loss Δ max "
        "| 1st step s optimenv | 1st step s accelerate | peak GiB opt/acc (median) | param bytes/rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, c in summary["comparisons"].items():
        ratio = c["ratio_median_tokens_per_s"]
        loss = c["loss_max_abs_diff_between_paths"]
        peak = c["peak_allocated_gib_max_rank"]
        lines.append(
            f"| {key} | {_fmt(c['tokens_per_s']['optimenv'])} | {_fmt(c['tokens_per_s']['accelerate'])} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} {'ok' if c['ratio_ok'] else 'FAIL'} | "
            f"{_interval(c.get('ratio_interval_90'))} | "
            f"{_num(c['paired_ratio_median'])} {c['paired_ratios']} | {_num(c['ratio_median_step'])} | "
            f"{'identical' if c['state_identical'] else 'DIFFERENT'} | "
            f"{'-' if loss is None else f'{loss:.4f}'} {'ok' if c['losses_ok'] else 'FAIL'} | "
            f"{_fmt(c['first_step_from_launch_s']['optimenv'], digits=1)} | "
            f"{_fmt(c['first_step_from_launch_s']['accelerate'], digits=1)} | "
            f"{_median(peak['optimenv'])} / {_median(peak['accelerate'])} | "
            f"{c['param_local_bytes_rank0']['optimenv']} |"
        )
    lines.append("")
    for key, c in summary["comparisons"].items():
        extra = c.get("extra_gpu_contexts", {})
        seen = [n for runs in extra.values() for n in runs if n is not None]
        if seen:  # recorded since the second GPU session
            lines.append(
                f"- {'ok  ' if not any(seen) else 'NOTE'} {key}: CUDA contexts beyond one per rank, "
                f"per launch: optimenv {extra.get('optimenv')}, accelerate {extra.get('accelerate')}"
            )
    for check in summary["semantic"] + summary["layouts"]:
        lines.append(
            f"- {'ok  ' if check['ok'] else 'FAIL'} {check['check']}: {json.dumps(check['observed'])}"
        )
    for f in summary["failed"]:
        lines.append(f"- FAILED launch {f['scenario']} g{f['gpus']} {f['path']} rep {f['rep']} rc={f['rc']}")
    skipped: dict[str, int] = {}
    for s in summary["skipped"]:
        key = f"{s['scenario']} {s['path']}"
        skipped[key] = skipped.get(key, 0) + 1
    if skipped:
        listed = ", ".join(f"{k} x{n}" for k, n in sorted(skipped.items()))
        lines.append(f"- planned but not run (time budget of the call, or partner skipped): {listed}")
    return "\n".join(lines) + "\n"


def report(paths: list[str], out: str | None) -> int:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    summary = summarise(docs)
    if out:
        Path(out).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(markdown(summary))
    print("\n".join(ray_lines(summary)))
    return 0


def ray_lines(summary: dict[str, Any]) -> list[str]:
    """One line per Ray Train comparison, last in the output: ``ray-gpu: <scenario> ratio <x.xxx> ...``."""
    lines = []
    for key, c in summary["comparisons"].items():
        if "-ray-" not in key:
            continue
        ratio = c["ratio_median_tokens_per_s"]
        n = [(c["tokens_per_s"][path] or {}).get("n", 0) for path in ("optimenv", "accelerate")]
        lines.append(
            f"ray-gpu: {key.replace('-ray', '')} ratio {'-' if ratio is None else f'{ratio:.3f}'} "
            f"{_interval(c.get('ratio_interval_90'))} ({'ok' if c['ratio_ok'] else 'below 0.98'}), "
            f"launches {n[0]}/{n[1]}, state {'identical' if c['state_identical'] else 'DIFFERENT'}, "
            f"losses {'equal' if c['losses_ok'] else 'DIFFERENT'}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs per launch (one node)")
    p.add_argument(
        "--launcher",
        choices=("torchrun", "ray"),
        default="torchrun",
        help="torchrun: the rendered PyTorchJob pod vs accelerate launch; ray: optimenv run vs a bare "
        "Ray TorchTrainer with the hand-written Accelerate config",
    )
    p.add_argument("--scenarios", default="fsdp2,zero3", help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    p.add_argument("--semantic", action="store_true", help=f"also run {', '.join(SEMANTIC)} (optimenv only)")
    p.add_argument("--reps", type=int, default=3, help="launches per path and scenario (alternating)")
    p.add_argument("--model", default="llama-270m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--visible", help="CUDA_VISIBLE_DEVICES for every launch (e.g. 0 for 1 GPU of 2)")
    p.add_argument("--base-port", type=int, default=BASE_PORT, help="first rendezvous port (one per launch)")
    p.add_argument("--work", default="/tmp/gpu-bench")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-bench-out"))
    p.add_argument("--mount-root", default="/", help="where the pod's ConfigMap mounts go (tests: a tmp dir)")
    p.add_argument("--deadline-s", type=float, default=480, help="start no launch that would end later")
    p.add_argument("--first-estimate-s", type=float, default=45, help="launch time assumed before one ran")
    p.add_argument("--launch-timeout", type=float, default=240)
    p.add_argument("--warm-launch", action="store_true", help="one short untimed launch first")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("--logs", action="store_true", help="also write OUT/logs.tar.gz")
    p.add_argument("--dry-run", action="store_true", help="print the launches and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        rp = argparse.ArgumentParser(prog="run.py report")
        rp.add_argument("results", nargs="+")
        rp.add_argument("--out")
        r = rp.parse_args(argv[1:])
        return report(r.results, r.out)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
