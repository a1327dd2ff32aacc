"""One function per target: Plan + Request → the job object (ConfigMaps come from ``_common``).

What each operator injects, and so what is left to us, is in ``docs/targets.md``: PyTorchJob and
Trainer's torch runtime set ``PET_*`` that ``torchrun`` reads, so the launch command names no
rendezvous value; the MPI runtime gives OpenMPI ranks that a small shell wrapper maps to torch's
names; Ray Train sets the ranks inside each worker actor.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from optimenv.errors import ConfigError
from optimenv.plan import Plan
from optimenv.render._common import (
    BOOTSTRAP,
    ConfigMaps,
    Request,
    check_name,
    check_parallelism,
    gpu_resources,
    job_size,
    metadata,
    pod_metadata,
    pod_spec_extras,
    require_command,
    require_job,
    volume_mounts,
    volumes,
)
from optimenv.render._objects import PodTemplate, PyTorchJob, RayJob, ReplicaSpec, TrainJob
from optimenv.spec import SPEC_ENV, SPEC_PATH
from optimenv.workload import JOB_KINDS, JobSpec

# ---------------------------------------------------------------------------------------------
# Name budgets (operators-env.md §0.1, §1.1, §3.2, §4.1)

RAYJOB_NAME_MAX = 47  # KubeRay MaxRayJobNameLength: 53 - len("-xxxxx") for the cluster name
POD_NAME_MAX = 63  # pods named after Services / JobSet pods must stay DNS-1123 labels
PATCH_MANAGER = "optimenv.dev/render"
TORCH_RUNTIME = "torch-distributed"
MPI_RUNTIME = "deepspeed-distributed"
PYTORCHJOB_PORT = 23456  # the operator's default pytorchjob-port
MPI_MASTER_PORT = 29500
TORCHRUN = ("torchrun", "--no-python")

_PYTHON = re.compile(r"^(.*/)?python(\d+(\.\d+)*)?$")


def _env(cms: ConfigMaps) -> dict[str, Any]:
    """``envFrom`` the planned variables (a container's own ``env`` still wins) + the spec path."""
    return {
        "envFrom": [{"configMapRef": {"name": cms.env_name}}],
        "env": [{"name": SPEC_ENV, "value": SPEC_PATH}],
    }


# ---------------------------------------------------------------------------------------------
# RayJob (ray.io/v1, KubeRay 1.7)


def rayjob(plan: Plan, request: Request, cms: ConfigMaps) -> RayJob:
    check_name("rayjob", request.name, RAYJOB_NAME_MAX, "KubeRay appends a 6-character cluster suffix")
    job, launch = require_job(request, "rayjob"), job_size(request)
    script = _ray_script(require_command(job, "rayjob"))
    workers = launch.processes  # Topology.launch: one GPU each, never more than the GPUs
    check_parallelism(plan, workers, f"{workers} Ray Train workers")
    entrypoint = shlex.join(
        ["optimenv", "ray-launch", "--spec", SPEC_PATH, "--workers", str(workers), *script]
    )

    def template(role: str, gpus_per_pod: int) -> PodTemplate:
        # The Ray container must be containers[0]; KubeRay adds /dev/shm and the ray start command.
        container: dict[str, Any] = {"name": f"ray-{role}", "image": job.image, **_env(cms)}
        if gpus_per_pod:
            container["resources"] = gpu_resources(gpus_per_pod)
        container["volumeMounts"] = volume_mounts(cms, shm=False)
        return {
            "metadata": pod_metadata(request, cms, f"ray-{role}"),
            "spec": {
                "containers": [container],
                "volumes": volumes(cms, shm=False),
                **pod_spec_extras(job),
            },
        }

    return {
        "apiVersion": JOB_KINDS["rayjob"].api_version,
        "kind": "RayJob",
        "metadata": metadata(request, request.name, "training"),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {
                "headGroupSpec": {
                    # No GPUs on the head, so Ray Train's workers land on the GPU group.
                    "rayStartParams": {"num-gpus": "0"},
                    "template": template("head", 0),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": launch.nodes,
                        "minReplicas": launch.nodes,
                        "maxReplicas": launch.nodes,
                        "rayStartParams": {},
                        "template": template("worker", launch.gpus_per_node),
                    }
                ],
            },
        },
    }


def _ray_script(command: tuple[str, ...]) -> tuple[str, ...]:
    """Ray mode runs a script or ``-m`` module in each worker: ``python t.py --x`` → ``-- t.py --x``."""
    rest = command[1:] if _PYTHON.match(command[0]) else command
    if len(rest) > 1 and rest[0] == "-m":
        return ("--module", "--", *rest[1:])
    if not rest or rest[0].startswith("-"):
        raise ConfigError(
            "command",
            f"Ray mode runs a Python script or module in every Ray Train worker, got {shlex.join(command)!r}",
            "give -- python SCRIPT.py [ARGS...] or -- python -m MODULE [ARGS...]",
        )
    return ("--", *rest)


# ---------------------------------------------------------------------------------------------
# PyTorchJob (kubeflow.org/v1, Training Operator 1.9)


def pytorchjob(plan: Plan, request: Request, cms: ConfigMaps) -> PyTorchJob:
    launch = job_size(request)
    # Every pod gets a headless Service named like it: <name>-master-0, <name>-worker-<i>.
    longest = "-master-0" if launch.nodes == 1 else f"-worker-{launch.nodes - 2}"
    check_name(
        "pytorchjob", request.name, POD_NAME_MAX - len(longest), f"its pods and Services add {longest!r}"
    )
    job = require_job(request, "pytorchjob")
    command = require_command(job, "pytorchjob")
    check_parallelism(plan, launch.processes, f"{launch.nodes} node(s) x {launch.gpus_per_node}")

    def replica(role: str, replicas: int) -> ReplicaSpec:
        container = {
            "name": "pytorch",  # the operator's webhook requires this name
            "image": job.image,
            # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-addr/--master-port from
            # the PET_* the operator injects, and gives each child RANK, LOCAL_RANK, WORLD_SIZE.
            "command": [*BOOTSTRAP, *TORCHRUN, *command],
            "ports": [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}],
            **_env(cms),
            "resources": gpu_resources(launch.gpus_per_node),
            "volumeMounts": volume_mounts(cms, shm=True),
        }
        return {
            "replicas": replicas,
            # Only the failed pod would be recreated and the others hang in NCCL: fail the job instead.
            "restartPolicy": "Never",
            "template": {
                "metadata": pod_metadata(request, cms, f"pytorch-{role.lower()}"),
                "spec": {
                    "containers": [container],
                    "volumes": volumes(cms, shm=True),
                    **pod_spec_extras(job),
                },
            },
        }

    specs = {"Master": replica("Master", 1)}
    if launch.nodes > 1:
        specs["Worker"] = replica("Worker", launch.nodes - 1)
    return {
        "apiVersion": JOB_KINDS["pytorchjob"].api_version,
        "kind": "PyTorchJob",
        "metadata": metadata(request, request.name, "training"),
        "spec": {"nprocPerNode": str(launch.gpus_per_node), "pytorchReplicaSpecs": specs},
    }


# ---------------------------------------------------------------------------------------------
# TrainJob (trainer.kubeflow.org/v1alpha1, Trainer 2.3)

# Per rank under mpirun: OpenMPI's rank variables under the names torch and Accelerate read.
MPI_RANK_SCRIPT = (
    'export RANK="$OMPI_COMM_WORLD_RANK" LOCAL_RANK="$OMPI_COMM_WORLD_LOCAL_RANK" '
    'WORLD_SIZE="$OMPI_COMM_WORLD_SIZE" LOCAL_WORLD_SIZE="$OMPI_COMM_WORLD_LOCAL_SIZE"; exec "$@"'
)
# On the launcher: rank 0 runs on the first host of the hostfile the MPI plugin mounts.
MPI_LAUNCH_SCRIPT = (
    'read -r MASTER_ADDR _ < "$OMPI_MCA_orte_default_hostfile" && '
    "export MASTER_ADDR MASTER_PORT={port} && "
    'exec mpirun -np {np} --bind-to none -x MASTER_ADDR -x MASTER_PORT "$@"'
)


def trainjob(plan: Plan, request: Request, cms: ConfigMaps) -> TrainJob:
    launch = job_size(request)
    runtime = (request.job and request.job.runtime) or (
        MPI_RUNTIME if plan.deepspeed is not None else TORCH_RUNTIME
    )
    mpi = runtime == MPI_RUNTIME
    # JobSet pods are <name>-<replicatedJob>-<jobIndex>-<podIndex>-<5 random>.
    budgets = [("node", launch.nodes - 1 - (1 if mpi else 0))]
    if mpi:
        budgets.append(("launcher", 0))
    longest = max((f"-{name}-0-{max(idx, 0)}-xxxxx" for name, idx in budgets), key=len)
    check_name("trainjob", request.name, POD_NAME_MAX - len(longest), f"JobSet pod names add {len(longest)}")
    job = require_job(request, "trainjob")
    command = require_command(job, "trainjob")
    check_parallelism(plan, launch.processes, f"{launch.nodes} node(s) x {launch.gpus_per_node}")
    patched = [_patched_job(name, request, job, cms) for name in (["launcher", "node"] if mpi else ["node"])]
    return {
        "apiVersion": JOB_KINDS["trainjob"].api_version,
        "kind": "TrainJob",
        "metadata": metadata(request, request.name, "training"),
        "spec": {
            "runtimeRef": {
                "apiGroup": JOB_KINDS["trainjob"].group,
                "kind": "ClusterTrainingRuntime",
                "name": runtime,
            },
            "trainer": {
                "image": job.image,
                "command": _trainjob_command(command, launch.processes, mpi=mpi),
                "env": _trainer_env(cms),
                "numNodes": launch.nodes,
                "numProcPerNode": launch.gpus_per_node,
                "resourcesPerNode": gpu_resources(launch.gpus_per_node),
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": patched}}},
                }
            ],
        },
    }


def _trainjob_command(command: tuple[str, ...], processes: int, *, mpi: bool) -> list[str]:
    if not mpi:
        return [*BOOTSTRAP, *TORCHRUN, *command]
    return [
        "sh",
        "-c",
        MPI_LAUNCH_SCRIPT.format(port=MPI_MASTER_PORT, np=processes),
        "optimenv-mpi-launch",
        "sh",
        "-c",
        MPI_RANK_SCRIPT,
        "optimenv-mpi-rank",
        *BOOTSTRAP,
        *command,
    ]


def _trainer_env(cms: ConfigMaps) -> list[dict[str, Any]]:
    """trainer.env has no envFrom: reference the env ConfigMap key by key (never PET_*, at most 128)."""
    env: list[dict[str, Any]] = [{"name": SPEC_ENV, "value": SPEC_PATH}]
    env += [
        {"name": key, "valueFrom": {"configMapKeyRef": {"name": cms.env_name, "key": key}}}
        for key in cms.planned
    ]
    if len(env) > 128:
        raise ConfigError("env", f"{len(env)} variables; a TrainJob's trainer.env takes at most 128")
    return env


def _patched_job(name: str, request: Request, job: JobSpec, cms: ConfigMaps) -> dict[str, Any]:
    """Volumes, mounts and pod settings reach the pods only through runtimePatches."""
    return {
        "name": name,
        "template": {
            "spec": {
                "template": {
                    "metadata": pod_metadata(request, cms, f"trainjob-{name}"),
                    "spec": {
                        "containers": [{"name": "node", "volumeMounts": volume_mounts(cms, shm=True)}],
                        "volumes": volumes(cms, shm=True),
                        **pod_spec_extras(job),
                    },
                }
            }
        },
    }
