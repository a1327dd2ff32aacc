"""The environment a training process finally sees, per target.

For each target the test merges, in the order Kubernetes and the launchers apply them:
the pod template's ``envFrom`` (the rendered env ConfigMap) and ``env``, what the operator injects
(``shared/reference/operators-env.md`` §1.3, §2.1, §3.2, §4.2, §4.3), the real ``optimenv-bootstrap``
(exec mode, run as a process on that env with the rendered ConfigMaps written where the pod mounts
them) and what the launch command sets per process. torchrun's options are resolved by torch's own
parser and ``config_from_args`` from the bootstrapped pod env (that is where ``PET_*`` are read); the
MPI runtime's shell wrappers run for real under ``sh`` with a stand-in ``mpirun`` that starts ranks
the way OpenMPI does (hostfile order, ``-x`` forwarding, ``OMPI_COMM_WORLD_*``).
Then: Accelerate's variables equal the plan, rendezvous variables are the operator's (or Ray
Train's), and every process has its own ``LOCAL_RANK``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from optimenv.bootstrap._probe import no_gpu_reason
from optimenv.compiler import Job
from optimenv.plan import Plan
from optimenv.spec import verify_spec
from tests.render.conftest import EXAMPLES, compiled

BOOTSTRAP = ["optimenv-bootstrap", "--spec", "/etc/optimenv/spec.json", "--"]
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


# ---- merging helpers ---------------------------------------------------------------------------
def _configmap(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    found = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    assert len(found) == 1, f"ConfigMap {name} not rendered"
    return dict(found[0]["data"])


def _container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """envFrom first, then env (env wins), resolving configMapKeyRef like the kubelet."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_configmap(objects, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = _configmap(objects, ref["name"])[ref["key"]]
    return env


def _inject(pod_env: dict[str, str], injected: dict[str, str]) -> dict[str, str]:
    clash = set(pod_env) & set(injected)
    assert not clash, f"the manifest sets variables the operator injects: {sorted(clash)}"
    return {**pod_env, **injected}


def _spec(objects: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    name = next(o["metadata"]["name"] for o in objects if o["metadata"]["name"].endswith("-spec"))
    spec = verify_spec(json.loads(_configmap(objects, name)["spec.json"]))
    env_cm = _configmap(objects, name.removesuffix("-spec") + "-env")
    assert {e["name"]: e["value"] for e in spec["env"]} == env_cm == plan.env_dict
    return spec


class Mounts:
    """The rendered ConfigMaps written to a folder, as the pod's volume mounts would show them.

    The plan is made with its DeepSpeed path inside the folder, so the mount path in the manifest
    and ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` agree as they do in a pod.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = root / "spec.json"
        self.deepspeed = root / "deepspeed.json"

    def compile(self, source: Any, target: str, nodes: int = 2, gpus: int = 4, **job: Any) -> Job:
        return compiled(source, target, nodes=nodes, gpus=gpus, deepspeed_path=str(self.deepspeed), **job)

    def write(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith(("-spec", "-deepspeed")):
                for key, text in obj["data"].items():
                    (self.root / key).write_text(text)


DUMP_STDOUT = "import json, os, sys; json.dump(dict(os.environ), sys.stdout)"


def _bootstrap(
    command: list[str], pod_env: dict[str, str], mounts: Mounts
) -> tuple[dict[str, str], list[str]]:
    """Run the real exec-mode bootstrap of ``command`` on ``pod_env``; the env it hands on + the rest."""
    assert command[:4] == BOOTSTRAP
    exe = Path(sys.executable).with_name("optimenv-bootstrap")
    env = {**pod_env, "PATH": os.environ["PATH"]}
    done = subprocess.run(
        [str(exe), "--spec", str(mounts.spec), "--", sys.executable, "-c", DUMP_STDOUT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    after: dict[str, str] = json.loads(done.stdout)
    after.pop("PATH")  # the test's own; the pod's comes from the image
    after.pop("LC_CTYPE", None)  # Python's UTF-8 mode may add it in the child
    # On a host without a GPU (this one) exec mode adds ACCELERATE_USE_CPU; the GPU pods simulated
    # here get nothing of the kind.
    cpu_only = no_gpu_reason(env) is not None
    assert after.pop("ACCELERATE_USE_CPU", None) == ("true" if cpu_only else None)
    if after.get("OPTIMENV_SPEC") == str(mounts.spec):  # the bootstrap points at the spec it read
        after["OPTIMENV_SPEC"] = "/etc/optimenv/spec.json"
    return after, command[4:]


def _torchrun(argv: list[str], pod_env: dict[str, str]) -> list[dict[str, str]]:
    """The per-process env torchrun gives its children (static rendezvous), options from torch itself."""
    from torch.distributed.run import config_from_args, get_args_parser

    assert argv[0] == "torchrun"
    with mock.patch.dict(os.environ, pod_env, clear=True):
        args = get_args_parser().parse_args(argv[1:])  # reads PET_* while the parser is built
        config, _cmd, _ = config_from_args(args)
    assert args.no_python and config.min_nodes == config.max_nodes
    host, port = config.rdzv_endpoint.rsplit(":", 1)
    nproc, nnodes, node_rank = config.nproc_per_node, config.max_nodes, config.rdzv_configs["rank"]
    return [
        {
            **pod_env,
            "LOCAL_RANK": str(local),
            "RANK": str(node_rank * nproc + local),
            "GROUP_RANK": str(node_rank),
            "LOCAL_WORLD_SIZE": str(nproc),
            "WORLD_SIZE": str(nnodes * nproc),
            "MASTER_ADDR": host,
            "MASTER_PORT": port,
        }
        for local in range(nproc)
    ]


def _assert_processes(
    processes: list[dict[str, str]], plan: Plan, rendezvous: dict[str, str], world: int
) -> None:
    assert len(processes) == world
    for proc in processes:
        for var in plan.env:
            assert proc[var.name] == var.value, var.name
        for key, value in rendezvous.items():
            assert proc[key] == value, key
        assert proc["WORLD_SIZE"] == str(world)
    assert sorted(int(p["RANK"]) for p in processes) == list(range(world))
    per_node: dict[str, set[str]] = {}
    for proc in processes:
        node = proc.get("GROUP_RANK", proc.get("NODE_RANK", ""))
        assert proc["LOCAL_RANK"] not in per_node.setdefault(node, set()), "LOCAL_RANK repeated on a node"
        per_node[node].add(proc["LOCAL_RANK"])


# ---- PyTorchJob ---------------------------------------------------------------------------------
@pytest.mark.parametrize("example", ["fsdp2-gpu", "zero3-gpu", "parallel-gpu"])
def test_pytorchjob_process_env(example: str, tmp_path: Path) -> None:
    mounts = Mounts(tmp_path)
    # HSDP 2x2 needs exactly 4 processes (C28).
    nodes, gpus = (2, 2) if example == "parallel-gpu" else (2, 4)
    job = mounts.compile(example, "pytorchjob", nodes, gpus)
    plan, objects = job.plan, job.manifests()
    _spec(objects, plan)
    mounts.write(objects)
    job = objects[-1]
    name, nproc = job["metadata"]["name"], job["spec"]["nprocPerNode"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    total = sum(s["replicas"] for s in specs.values())
    processes = []
    for role, spec in specs.items():
        for index in range(spec["replicas"]):
            container = spec["template"]["spec"]["containers"][0]
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
            rank = 0 if role == "Master" else index + 1
            # setPodEnv, pkg/controller.v1/pytorch/envvar.go (with a Master replica)
            injected = {
                "PYTHONUNBUFFERED": "1",
                "MASTER_ADDR": f"{name}-master-0",
                "PET_MASTER_ADDR": f"{name}-master-0",
                "MASTER_PORT": str(port),
                "PET_MASTER_PORT": str(port),
                "WORLD_SIZE": str(total * int(nproc)),
                "RANK": str(rank),
                "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": nproc,
                "PET_NNODES": str(total),
            }
            pod_env = _inject(_container_env(container, objects), injected)
            booted, launch = _bootstrap(container["command"], pod_env, mounts)
            assert booted == pod_env  # the bootstrap agrees with envFrom: nothing to change
            processes += _torchrun(launch, booted)
    _assert_processes(
        processes, plan, {"MASTER_ADDR": "ft-master-0", "MASTER_PORT": "23456"}, world=nodes * gpus
    )
    # torchrun's WORLD_SIZE agrees with the operator's, which counts nprocPerNode per pod.
    assert {p["WORLD_SIZE"] for p in processes} == {str(total * int(nproc))}


# ---- TrainJob, torch runtime ------------------------------------------------------------------
@pytest.mark.parametrize(("example", "runtime"), [("fsdp2-gpu", None), ("zero3-gpu", "torch-distributed")])
def test_trainjob_torch_process_env(example: str, runtime: str | None, tmp_path: Path) -> None:
    mounts = Mounts(tmp_path)
    job = mounts.compile(example, "trainjob", runtime=runtime)
    plan, objects = job.plan, job.manifests()
    _spec(objects, plan)
    mounts.write(objects)
    job = objects[-1]
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    pod_env = _container_env(trainer, objects)
    processes = []
    for node in range(trainer["numNodes"]):
        # Torch plugin, pkg/runtime/framework/plugins/torch/torch.go
        injected = {
            "PET_NNODES": str(trainer["numNodes"]),
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(node),
            "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
            "PET_MASTER_PORT": "29500",
        }
        booted, launch = _bootstrap(trainer["command"], _inject(pod_env, injected), mounts)
        processes += _torchrun(launch, booted)
    _assert_processes(processes, plan, {"MASTER_ADDR": "ft-node-0-0.ft", "MASTER_PORT": "29500"}, world=8)


# ---- TrainJob, deepspeed-distributed (MPI) runtime: the shell wrappers run for real -------------
FAKE_MPIRUN = """\
import json, os, subprocess, sys
args, np, forwarded = sys.argv[1:], None, {}
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt == "-np":
        np = int(args.pop(0))
    elif opt == "--bind-to":
        args.pop(0)
    elif opt == "-x":
        key, eq, value = args.pop(0).partition("=")
        forwarded[key] = value if eq else os.environ[key]
    else:
        sys.exit(f"stand-in mpirun: unsupported option {opt}")
hosts = []
for line in open(os.environ["OMPI_MCA_orte_default_hostfile"]):
    host, slots = line.split()
    hosts += [host] * int(slots.split("=")[1])
launcher = os.environ["FAKE_LAUNCHER_HOST"]
procs = []
for rank in range(np):
    host = hosts[rank]
    local = hosts[:rank].count(host)
    # Ranks on the launcher inherit its env; ranks on other nodes start from sshd's bare env.
    bare = {key: os.environ[key] for key in ("PATH", "FAKE_OUT", "FAKE_SPEC", "REAL_BOOTSTRAP")}
    base = dict(os.environ) if host == launcher else bare
    env = {**base, **forwarded, "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
           "OMPI_COMM_WORLD_SIZE": str(np), "OMPI_COMM_WORLD_LOCAL_SIZE": str(hosts.count(host)),
           "FAKE_HOST": host}
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
"""
# Stands for the volume mount only: the spec the pod would see at /etc/optimenv/spec.json.
MOUNT_SHIM = """\
import os, sys
argv = [os.environ["FAKE_SPEC"] if a == "/etc/optimenv/spec.json" else a for a in sys.argv[1:]]
os.execv(os.environ["REAL_BOOTSTRAP"], ["optimenv-bootstrap", *argv])
"""
DUMP = (
    "import json, os; "
    "json.dump(dict(os.environ), open(os.path.join(os.environ['FAKE_OUT'], os.environ['RANK']), 'w'))"
)


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


def test_trainjob_mpi_process_env(tmp_path: Path) -> None:
    mounts = Mounts(tmp_path)
    job = mounts.compile("zero3-gpu", "trainjob", 2, 2, command=[sys.executable, "-c", DUMP])
    plan, objects = job.plan, job.manifests()
    _spec(objects, plan)
    mounts.write(objects)
    job = objects[-1]
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "deepspeed-distributed"
    bindir, out = tmp_path / "bin", tmp_path / "out"
    for folder in (bindir, out):
        folder.mkdir()
    _script(bindir / "mpirun", FAKE_MPIRUN)
    _script(bindir / "optimenv-bootstrap", MOUNT_SHIM)
    # MPI plugin: hostfile "<host> slots=<numProcPerNode>", launcher first (runLauncherAsNode).
    launcher = f"{name}-launcher-0-0.{name}"
    hosts = [launcher] + [f"{name}-node-0-{i}.{name}" for i in range(trainer["numNodes"] - 1)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots={trainer['numProcPerNode']}\n" for h in hosts))
    injected = {  # mpi.go: launcher env (reserved)
        "OMPI_MCA_orte_default_hostfile": str(hostfile),
        "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
        "OMPI_MCA_orte_set_default_slots": str(trainer["numProcPerNode"]),
        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
    }
    launcher_env = _inject(_container_env(trainer, objects), injected)
    env = {
        **launcher_env,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "FAKE_SPEC": str(mounts.spec),
        "REAL_BOOTSTRAP": str(Path(sys.executable).with_name("optimenv-bootstrap")),
        "FAKE_LAUNCHER_HOST": launcher,
    }
    done = subprocess.run(trainer["command"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    processes = [json.loads(p.read_text()) for p in sorted(out.iterdir())]
    for proc in processes:
        assert proc["MASTER_ADDR"] == launcher  # rank 0's host, read from the hostfile
        assert proc["LOCAL_RANK"] == proc["OMPI_COMM_WORLD_LOCAL_RANK"]
        proc["NODE_RANK"] = proc["FAKE_HOST"]
    _assert_processes(processes, plan, {"MASTER_ADDR": launcher, "MASTER_PORT": "29500"}, world=4)
    # The remote ranks got Accelerate's variables from the spec alone (sshd passes no pod env):
    # the real bootstrap set them there.
    assert any(p["FAKE_HOST"] != launcher for p in processes)


# ---- RayJob ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("example", "workers"), [("fsdp2-gpu", None), ("zero3-gpu", 6)])
def test_rayjob_worker_env(example: str, workers: int | None) -> None:
    config = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    if workers is not None:
        config["ray_num_workers"] = workers
    job = compiled(config, "rayjob")
    plan, objects = job.plan, job.manifests()
    _spec(objects, plan)
    job = objects[-1]
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:5] == ["optimenv", "ray-launch", "--spec", "/etc/optimenv/spec.json", "--workers"]
    assert entry[6:] == ["--", "train.py"]
    n = int(entry[5])
    assert n == (workers or 8)
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/etc/optimenv/spec.json" in [m["mountPath"] for m in head["volumeMounts"]]  # the driver
    group = cluster["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    processes = []
    for worker in range(n):
        node, local = divmod(worker, gpus)
        # KubeRay setContainerEnvVars (pod.go) on the worker pod; Ray workers inherit the raylet's env.
        kuberay = {
            "FQ_RAY_IP": "ft-abcde-head-svc.default.svc.cluster.local",
            "RAY_IP": "ft-abcde-head-svc",
            "RAY_CLUSTER_NAME": "ft-abcde",
            "RAY_CLUSTER_NAMESPACE": "default",
            "RAY_NODE_TYPE_NAME": group["groupName"],
            "RAY_PORT": "6379",
            "RAY_ADDRESS": "ft-abcde-head-svc:6379",
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
        }
        pod_env = _inject(_container_env(container, objects), kuberay)
        # Ray Train V2 TorchTrainer, in each worker actor (ray/train/torch/config.py)
        ray_train = {
            "MASTER_ADDR": "10.0.0.10",
            "MASTER_PORT": "40001",
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(min(gpus, n - node * gpus)),
            "NODE_RANK": str(node),
            "RANK": str(worker),
            "WORLD_SIZE": str(n),
            "ACCELERATE_TORCH_DEVICE": f"cuda:{local}",
        }
        processes.append(_inject(pod_env, ray_train))
    _assert_processes(processes, plan, {"MASTER_ADDR": "10.0.0.10", "MASTER_PORT": "40001"}, world=n)


def test_no_target_sets_a_rendezvous_variable() -> None:
    for target in ("rayjob", "pytorchjob", "trainjob"):
        text = json.dumps(compiled("zero3-gpu", target).manifests())
        for key in RENDEZVOUS:
            assert f'"name": "{key}"' not in text, (target, key)
        assert '"name": "PET_' not in text
