"""Two machines on one host: Ray workers on two Ray nodes, and the two pods of a PyTorchJob.

Multi-node is the path users meet first on a cluster, so it is checked here on CPU rather than
left for a cluster: every rank must see two machines, its own global and local rank, and the same
plan. Ray Train tells nodes apart by IP address, so the second Ray node listens on 127.0.0.2
(another loopback address of this machine); the pods rendezvous on 127.0.0.1 over gloo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optimenv import JobSpec, Topology, compile, load_config
from tests.conftest import ray_cluster_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
OPTIMENV = [sys.executable, "-c", "from optimenv.cli import main; main()"]
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "fsdp2-cpu.yaml"

# Ray's own helper for several nodes on one machine (ray.cluster_utils): a head with one CPU and a
# second node with one CPU on another loopback address. Stopped by closing stdin.
_TWO_NODES = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture
def two_ray_nodes() -> Iterator[str]:
    # A private Ray temp dir also keeps the "current cluster" file Ray writes away from /tmp/ray.
    temp = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with ray_cluster_process(_TWO_NODES, temp, env=env) as address:
        yield address


def test_ray_workers_on_two_nodes(two_ray_nodes: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS=two_ray_nodes, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run(
        [*OPTIMENV, "run", str(CONFIG), "--workers", "2", "--steps", "5", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    workers = json.loads(proc.stdout)["workers"]
    assert [(w["rank"], w["node_rank"], w["local_rank"], w["nodes"]) for w in workers] == [
        (0, 0, 0, 2),
        (1, 1, 0, 2),
    ]
    planned = compile(load_config(CONFIG), Topology(nodes=1, gpus_per_node=2), "rayjob").env
    for worker in workers:
        assert {k: worker["applied"].get(k) for k in planned} == planned
        assert worker["effective"]["mode"] == "MULTI_CPU"
    assert workers[0]["applied"] == workers[1]["applied"]
    assert workers[0]["losses"] == workers[1]["losses"] and len(workers[0]["losses"]) == 5


# What each rank of a pod reports: its ranks as torchrun set them and as Accelerate sees them.
_REPORTER = """
import json, os, sys
import torch
from accelerate import Accelerator
accelerator = Accelerator()
total = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1)]), reduction="sum")
env = {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
record = {
    "rank": int(os.environ["RANK"]),
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "node_rank": int(os.environ["GROUP_RANK"]),
    "machines": int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]),
    "distributed_type": accelerator.distributed_type.value,
    "num_processes": accelerator.num_processes,
    "process_index": accelerator.process_index,
    "sum_over_ranks": total.item(),
    "env": env,
}
with open(os.path.join(sys.argv[1], f"rank{record['rank']}.json"), "w") as out:
    json.dump(record, out)
accelerator.end_training()
"""


def _bench_pod() -> Any:
    """bench/gpu/run.py's emulation of a rendered PyTorchJob pod on this machine."""
    spec = importlib.util.spec_from_file_location("gpu_bench_run_pods", REPO / "bench" / "gpu" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.pod


def test_pytorchjob_of_two_pods(tmp_path: Path) -> None:
    script, out = tmp_path / "report.py", tmp_path / "out"
    script.write_text(_REPORTER)
    out.mkdir()
    job = JobSpec(target="pytorchjob", image="local", command=["python", str(script), str(out)])
    result = compile(load_config(CONFIG), Topology(nodes=2, gpus_per_node=1), job, name="two-pods")
    objects = result.manifests()
    pod = _bench_pod()
    port = _free_port()
    procs = []
    for replica in ("Master", "Worker"):
        root = tmp_path / replica  # each pod mounts its own ConfigMap files
        cmd, pod_env, files = pod(objects, replica, 0, port, str(root))
        for path, text in files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "ACCELERATE_", "FSDP_"))}
        env.update(pod_env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["machines"]) for r in reports] == [
        (0, 0, 0, 2),
        (1, 1, 0, 2),
    ]
    for r in reports:
        assert (r["distributed_type"], r["num_processes"], r["process_index"]) == ("MULTI_CPU", 2, r["rank"])
        assert r["sum_over_ranks"] == 3.0  # 1 + 2: the two pods trained as one group
        assert {k: r["env"].get(k) for k in result.env} == result.env
    assert reports[0]["env"] == reports[1]["env"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
