"""One function per target: Plan + JobOptions → the job object (ConfigMaps come from ``_common``).

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
    JobOptions,
    check_name,
    check_parallelism,
    gpu_resources,
    metadata,
    pod_metadata,
    pod_spec_extras,
    require_command,
    require_image,
    volume_mounts,
    volumes,
)
from optimenv.spec import SPEC_ENV, SPEC_PATH

# ---------------------------------------------------------------------------------------------
# Name budgets (operators-env.md §0.1, §1.1, §3.2, §4.1)

RAYJOB_NAME_MAX = 47  # KubeRay MaxRayJobNameLength: 53 - len("-xxxxx") for the cluster name
POD_NAME_MAX = 63  # pods named after Services / JobSet pods must stay DNS-1123 labels
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
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


def rayjob(plan: Plan, options: JobOptions, cms: ConfigMaps) -> dict[str, Any]:
    check_name("rayjob", options, RAYJOB_NAME_MAX, "KubeRay appends a 6-character cluster suffix")
    image = require_image(options, "rayjob")
    script = _ray_script(require_command(options, "rayjob"))
    gpus = options.nodes * options.gpus_per_node
    workers = options.ray_workers or gpus
    if workers > gpus:
        raise ConfigError(
            "ray_num_workers",
            f"{workers} Ray Train workers need {workers} GPUs (one each), the RayJob has {gpus} "
            f"({options.nodes} node(s) x {options.gpus_per_node})",
            "raise --nodes / --gpus-per-node or lower ray_num_workers",
        )
    check_parallelism(plan, workers, f"{workers} Ray Train workers")
    entrypoint = shlex.join(
        ["optimenv", "ray-launch", "--spec", SPEC_PATH, "--workers", str(workers), *script]
    )

    def template(role: str, gpus_per_pod: int) -> dict[str, Any]:
        # The Ray container must be containers[0]; KubeRay adds /dev/shm and the ray start command.
        container: dict[str, Any] = {"name": f"ray-{role}", "image": image, **_env(cms)}
        if gpus_per_pod:
            container["resources"] = gpu_resources(gpus_per_pod)
        container["volumeMounts"] = volume_mounts(cms, shm=False)
        return {
            "metadata": pod_metadata(options, cms, f"ray-{role}"),
            "spec": {
                "containers": [container],
                "volumes": volumes(cms, shm=False),
                **pod_spec_extras(options),
            },
        }

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata(options, options.name, "training"),
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
                        "replicas": options.nodes,
                        "minReplicas": options.nodes,
                        "maxReplicas": options.nodes,
                        "rayStartParams": {},
                        "template": template("worker", options.gpus_per_node),
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


def pytorchjob(plan: Plan, options: JobOptions, cms: ConfigMaps) -> dict[str, Any]:
    # Every pod gets a headless Service named like it: <name>-master-0, <name>-worker-<i>.
    longest = "-master-0" if options.nodes == 1 else f"-worker-{options.nodes - 2}"
    check_name("pytorchjob", options, POD_NAME_MAX - len(longest), f"its pods and Services add {longest!r}")
    image = require_image(options, "pytorchjob")
    command = require_command(options, "pytorchjob")
    check_parallelism(
        plan, options.nodes * options.gpus_per_node, f"{options.nodes} node(s) x {options.gpus_per_node}"
    )

    def replica(role: str, replicas: int) -> dict[str, Any]:
        container = {
            "name": "pytorch",  # the operator's webhook requires this name
            "image": image,
            # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-addr/--master-port from
            # the PET_* the operator injects, and gives each child RANK, LOCAL_RANK, WORLD_SIZE.
            "command": [*BOOTSTRAP, *TORCHRUN, *command],
            "ports": [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}],
            **_env(cms),
            "resources": gpu_resources(options.gpus_per_node),
            "volumeMounts": volume_mounts(cms, shm=True),
        }
        return {
            "replicas": replicas,
            # Only the failed pod would be recreated and the others hang in NCCL: fail the job instead.
            "restartPolicy": "Never",
            "template": {
                "metadata": pod_metadata(options, cms, f"pytorch-{role.lower()}"),
                "spec": {
                    "containers": [container],
                    "volumes": volumes(cms, shm=True),
                    **pod_spec_extras(options),
                },
            },
        }

    specs = {"Master": replica("Master", 1)}
    if options.nodes > 1:
        specs["Worker"] = replica("Worker", options.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata(options, options.name, "training"),
        "spec": {"nprocPerNode": str(options.gpus_per_node), "pytorchReplicaSpecs": specs},
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


def trainjob(plan: Plan, options: JobOptions, cms: ConfigMaps) -> dict[str, Any]:
    runtime = options.runtime or (MPI_RUNTIME if plan.deepspeed is not None else TORCH_RUNTIME)
    mpi = runtime == MPI_RUNTIME
    # JobSet pods are <name>-<replicatedJob>-<jobIndex>-<podIndex>-<5 random>.
    budgets = [("node", options.nodes - 1 - (1 if mpi else 0))]
    if mpi:
        budgets.append(("launcher", 0))
    longest = max((f"-{job}-0-{max(idx, 0)}-xxxxx" for job, idx in budgets), key=len)
    check_name("trainjob", options, POD_NAME_MAX - len(longest), f"JobSet pod names add {len(longest)}")
    image = require_image(options, "trainjob")
    command = require_command(options, "trainjob")
    processes = options.nodes * options.gpus_per_node
    check_parallelism(plan, processes, f"{options.nodes} node(s) x {options.gpus_per_node}")

    if mpi:
        launch = [
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
    else:
        launch = [*BOOTSTRAP, *TORCHRUN, *command]

    # trainer.env has no envFrom: reference the env ConfigMap key by key (never PET_*, at most 128).
    env: list[dict[str, Any]] = [{"name": SPEC_ENV, "value": SPEC_PATH}]
    env += [
        {"name": key, "valueFrom": {"configMapKeyRef": {"name": cms.env_name, "key": key}}}
        for key in cms.planned
    ]
    if len(env) > 128:
        raise ConfigError("env", f"{len(env)} variables; a TrainJob's trainer.env takes at most 128")

    # Volumes, mounts and pod settings reach the pods only through runtimePatches.
    jobs = ["launcher", "node"] if mpi else ["node"]
    patched = [
        {
            "name": job,
            "template": {
                "spec": {
                    "template": {
                        "metadata": pod_metadata(options, cms, f"trainjob-{job}"),
                        "spec": {
                            "containers": [{"name": "node", "volumeMounts": volume_mounts(cms, shm=True)}],
                            "volumes": volumes(cms, shm=True),
                            **pod_spec_extras(options),
                        },
                    }
                }
            },
        }
        for job in jobs
    ]
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": metadata(options, options.name, "training"),
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": runtime,
            },
            "trainer": {
                "image": image,
                "command": launch,
                "env": env,
                "numNodes": options.nodes,
                "numProcPerNode": options.gpus_per_node,
                "resourcesPerNode": gpu_resources(options.gpus_per_node),
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": patched}}},
                }
            ],
        },
    }
