"""The Kubernetes objects optimenv renders, as typed dicts: serialised key for key as they are built.

Typed down to where optimenv decides the content; pod specs and containers, which mostly pass the
user's settings through, stay plain mappings.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class ObjectMeta(TypedDict):
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: NotRequired[dict[str, str]]


class PodMeta(TypedDict):
    labels: dict[str, str]
    annotations: dict[str, str]


class PodTemplate(TypedDict):
    metadata: PodMeta
    spec: dict[str, Any]


class ConfigMap(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["ConfigMap"]
    metadata: ObjectMeta
    data: dict[str, str]


class WorkerGroup(TypedDict):
    groupName: str
    replicas: int
    minReplicas: int
    maxReplicas: int
    rayStartParams: dict[str, str]
    template: PodTemplate


class HeadGroup(TypedDict):
    rayStartParams: dict[str, str]
    template: PodTemplate


class RayClusterSpec(TypedDict):
    headGroupSpec: HeadGroup
    workerGroupSpecs: list[WorkerGroup]


class RayJobSpec(TypedDict):
    entrypoint: str
    shutdownAfterJobFinishes: bool
    rayClusterSpec: RayClusterSpec


class RayJob(TypedDict):
    apiVersion: str
    kind: Literal["RayJob"]
    metadata: ObjectMeta
    spec: RayJobSpec


class ReplicaSpec(TypedDict):
    replicas: int
    restartPolicy: str
    template: PodTemplate


class PyTorchJobSpec(TypedDict):
    nprocPerNode: str
    pytorchReplicaSpecs: dict[str, ReplicaSpec]


class PyTorchJob(TypedDict):
    apiVersion: str
    kind: Literal["PyTorchJob"]
    metadata: ObjectMeta
    spec: PyTorchJobSpec


class Trainer(TypedDict):
    image: str
    command: list[str]
    env: list[dict[str, Any]]
    numNodes: int
    numProcPerNode: int
    resourcesPerNode: dict[str, Any]


class TrainJobSpec(TypedDict):
    runtimeRef: dict[str, str]
    trainer: Trainer
    runtimePatches: list[dict[str, Any]]


class TrainJob(TypedDict):
    apiVersion: str
    kind: Literal["TrainJob"]
    metadata: ObjectMeta
    spec: TrainJobSpec


JobObject = RayJob | PyTorchJob | TrainJob
KubeObject = ConfigMap | RayJob | PyTorchJob | TrainJob
