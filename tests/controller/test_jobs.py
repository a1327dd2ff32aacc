"""The job rules, on the wire: a job deleted while it runs is stopped, not re-created, until the
``OptimEnv``'s spec changes; a finished job is never written to or re-created; deleting the
``OptimEnv`` leaves its job to the garbage collector. Also: which job kinds are watched, and jobs no
``OptimEnv`` controls are ignored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kmock as km
import pytest

from optimenv_controller.controller import Controller
from tests.controller import test_wire as wire
from tests.controller.apiserver import ApiServer, eventually, settle
from tests.controller.conftest import NS, optimenv
from tests.controller.harness import running_operator
from tests.controller.test_wire import OE, OE_PATH, applies, creates, events, ready, status_writes, user_patch

JOB = {"image": "registry.example/train:1", "command": ["python", "train.py"]}
# kind option → (kmock resource, API path of the collection, kind)
KINDS = {
    "rayjob": ("ray.io/v1/rayjobs", f"/apis/ray.io/v1/namespaces/{NS}/rayjobs", "RayJob"),
    "pytorchjob": (
        "kubeflow.org/v1/pytorchjobs",
        f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs",
        "PyTorchJob",
    ),
    "trainjob": (
        "trainer.kubeflow.org/v1alpha1/trainjobs",
        f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs",
        "TrainJob",
    ),
}
HASH = "optimenv.dev/content-hash"
PT_RESOURCE, PT_PATH, _ = KINDS["pytorchjob"]


def reconciles(controller: Controller) -> float:
    """Reconciles run so far, whatever their result."""
    return sum(
        sample.value
        for metric in controller.metrics.reconciles.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def controller_requests(api: ApiServer, since: int) -> list[Any]:
    """Every request the controller (not the test's own kmock client) sent from ``since`` on."""
    return [r for r in list(api)[since:] if not r.headers.get("User-Agent", "").startswith("kmock/")]


async def user_delete(api: ApiServer, path: str) -> None:
    async with api.delete(path, headers={"Connection": "close"}) as response:
        assert response.status == 200, await response.text()


def job_status(api: ApiServer) -> dict[str, Any]:
    obj = api.obj("optimenv.dev/v1alpha1/optimenvs", NS, "demo") or {}
    record: dict[str, Any] = (obj.get("status") or {}).get("job") or {}
    return record


async def operator_status(api: ApiServer, path: str, status: dict[str, Any]) -> None:
    """The job operator reports a phase (a status write, as its own controller makes it)."""
    await user_patch(api, f"{path}/status", {"status": status})


RUNNING = {
    "conditions": [
        {
            "type": "Created",
            "status": "True",
            "reason": "PyTorchJobCreated",
            "message": "PyTorchJob demo is created.",
        },
        {
            "type": "Running",
            "status": "True",
            "reason": "PyTorchJobRunning",
            "message": "PyTorchJob ml/demo is running.",
        },
    ],
    "startTime": "2026-11-25T10:00:01Z",
}
STATUS = {  # a running job as each operator reports it (see job_statuses.yaml)
    "rayjob": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": "2026-11-25T10:00:00Z"},
    "pytorchjob": RUNNING,
    "trainjob": {
        "jobsStatus": [{"name": "node", "ready": 1, "active": 1, "succeeded": 0, "failed": 0, "suspended": 0}]
    },
}


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_job_deleted_while_running_is_stopped_until_the_spec_changes(
    kmock: ApiServer, kind: str
) -> None:
    resource, path, kind_name = KINDS[kind]
    kmock.put_object(OE, optimenv(job={"target": kind, **JOB}))
    async with running_operator(str(kmock.url), job_kinds=(kind,)) as op:
        await eventually(lambda: ready(kmock))
        await operator_status(kmock, f"{path}/demo", STATUS[kind])
        await eventually(lambda: job_status(kmock).get("phase") == "Running")
        await settle(kmock)
        uid = job_status(kmock)["uid"]
        mark, count = kmock.count, reconciles(op.controller)
        await user_delete(kmock, f"{path}/demo")
        await eventually(lambda: job_status(kmock).get("phase") == "Stopped")
        await settle(kmock)
        assert reconciles(op.controller) == count + 1  # the deletion
        # Neither the resync nor a restart brings it back: same generation.
        assert await op.controller.resync(idle=0) == 1
        await settle(kmock)
        assert kmock.obj(resource, NS, "demo") is None
        stopped, mark = kmock.writes(since=mark), kmock.count
        # A new generation does: the job is created again, by POST.
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"config": {"gradient_accumulation_steps": 8}}})
        await eventually(lambda: ready(kmock, generation=2) and job_status(kmock).get("phase") == "Pending")
        await settle(kmock)
    assert creates(stopped) == applies(stopped) == []
    (status,) = status_writes(stopped)
    record = status.data["status"]["job"]
    assert (record["kind"], record["name"], record["uid"]) == (kind_name, "demo", uid)
    assert (record["phase"], record["reason"], record["observedGeneration"]) == ("Stopped", "JobDeleted", 1)
    assert "change the OptimEnv's spec" in record["message"]
    assert status.data["status"]["conditions"][0]["message"].startswith("3 children in sync; ")
    (event,) = events(stopped)
    assert (event.data["type"], event.data["reason"]) == ("Warning", "JobDeleted")
    assert event.data["message"].startswith(f"{kind_name} demo is Stopped (JobDeleted)")
    again = kmock.writes(since=mark)
    (created,) = [r for r in creates(again) if r.url.path == path]
    assert created.params["fieldManager"] == "optimenv"
    new = job_status(kmock)
    assert new["uid"] != uid and new["observedGeneration"] == 2
    assert [e.data["reason"] for e in events(again)] == ["Created", "Updated", "JobPending"]


@pytest.mark.parametrize(("kind", "phase"), [("pytorchjob", "Succeeded"), ("trainjob", "Failed")])
async def test_finished_job_is_never_recreated_nor_written(kmock: ApiServer, kind: str, phase: str) -> None:
    resource, path, _ = KINDS[kind]
    finished = {
        "pytorchjob": {
            "conditions": [
                {
                    "type": "Succeeded",
                    "status": "True",
                    "reason": "PyTorchJobSucceeded",
                    "message": "PyTorchJob ml/demo successfully completed.",
                }
            ],
            "completionTime": "2026-11-25T11:10:00Z",
        },
        "trainjob": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "FailedJobs",
                    "message": "jobset failed due to one or more job failures",
                    "lastTransitionTime": "2026-11-25T10:45:00Z",
                }
            ],
        },
    }[kind]
    kmock.put_object(OE, optimenv(job={"target": kind, **JOB}))
    async with running_operator(str(kmock.url), job_kinds=(kind,)):
        await eventually(lambda: ready(kmock))
        await operator_status(kmock, f"{path}/demo", finished)
        await eventually(lambda: job_status(kmock).get("phase") == phase)
        await settle(kmock)
        done = job_status(kmock)
        mark = kmock.count
        # Its spec edited by hand: not repaired (a finished job is a record, not a run to correct).
        await user_patch(kmock, f"{path}/demo", {"metadata": {"annotations": {HASH: "sha256:edited"}}})
        await settle(kmock)
        assert kmock.writes(since=mark) == []
        # Deleted (by hand, or by a TTL): not re-created, not even for a new generation.
        await user_delete(kmock, f"{path}/demo")
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"config": {"gradient_accumulation_steps": 8}}})
        await eventually(lambda: ready(kmock, generation=2))
        await settle(kmock)
    assert kmock.obj(resource, NS, "demo") is None
    writes = kmock.writes(since=mark)
    assert [r for r in creates(writes) + applies(writes) if r.url.path.startswith(path)] == []
    assert {k: v for k, v in job_status(kmock).items() if k != "observedGeneration"} == {
        k: v for k, v in done.items() if k != "observedGeneration"
    }
    assert [e.data["reason"] for e in events(writes)] == ["Updated"]  # the ConfigMaps; no job Event
    ready_message = wire.condition(kmock, "demo", "Ready")["message"]
    assert ready_message.endswith(f"is {phase} ({done['reason']}): not re-created")


async def test_deleting_the_optimenv_leaves_its_job_to_the_garbage_collector(kmock: ApiServer) -> None:
    """Foreground deletion: the OptimEnv waits (deletionTimestamp, finalizer) while the garbage
    collector deletes its children; the controller re-creates none of them and writes nothing."""
    kmock.put_object(OE, optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark = kmock.count
        await user_patch(kmock, f"{OE_PATH}/demo", {"metadata": {"finalizers": ["foregroundDeletion"]}})
        await user_delete(kmock, f"{OE_PATH}/demo")  # marked for deletion: the finalizer holds it
        for name in ("demo", "demo-env", "demo-spec", "demo-deepspeed"):  # what the collector does
            where = f"{PT_PATH}/{name}" if name == "demo" else f"{wire.CM_PATH}/{name}"
            await user_delete(kmock, where)
        await user_patch(kmock, f"{OE_PATH}/demo", {"metadata": {"finalizers": None}})
        await eventually(lambda: kmock.obj(OE, NS, "demo") is None)
        await settle(kmock)
    assert kmock.writes(since=mark) == []
    assert kmock.obj(PT_RESOURCE, NS, "demo") is None


async def test_jobs_not_owned_by_an_optimenv_are_ignored(kmock: ApiServer) -> None:
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": "pytorchjob", **JOB}))
    deployment_owned = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "demo",
        "uid": "0b1c",
        "controller": True,
    }
    foreign: dict[str, dict[str, Any]] = {
        "plain": {"metadata": {"name": "plain", "namespace": NS}, "spec": {"a": 1}},
        "other-owner": {
            "metadata": {"name": "other-owner", "namespace": NS, "ownerReferences": [deployment_owned]},
            "spec": {"a": 1},
        },
    }
    for body in foreign.values():
        kmock.put_object(PT_RESOURCE, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", **body})
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark, count = kmock.count, reconciles(op.controller)
        for name in foreign:
            await user_patch(kmock, f"{PT_PATH}/{name}", {"spec": {"a": 2}})
            await user_delete(kmock, f"{PT_PATH}/{name}")
        await settle(kmock)
        assert reconciles(op.controller) == count
    assert controller_requests(kmock, mark) == []
    assert kmock.obj(PT_RESOURCE, NS, "plain") is None  # deleted by the user, not re-created


async def test_job_kinds_are_watched_only_when_asked(kmock: ApiServer) -> None:
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark = kmock.count
        await user_delete(kmock, f"{PT_PATH}/demo")
        await asyncio.sleep(0.5)
        assert reconciles(op.controller) == 1
    # Without --job-kind the controller never lists or watches job kinds (their CRDs may be absent).
    collections = [
        r.url.path
        for r in kmock
        if r.method.value == "GET" and r.url.path.endswith(("/rayjobs", "/pytorchjobs", "/trainjobs"))
    ]
    assert collections == []
    assert kmock.writes(since=mark) == []
    assert kmock.obj(PT_RESOURCE, NS, "demo") is None


async def test_a_watched_kind_without_its_crd_is_skipped(
    kmock: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    del kmock.resources["ray.io/v1/rayjobs"]  # KubeRay not installed
    kmock.put_object(OE, optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("rayjob", "pytorchjob")):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        # The kind that is served works as ever: an edit of the job is repaired at once.
        await user_patch(kmock, f"{PT_PATH}/demo", {"metadata": {"annotations": {HASH: "sha256:edited"}}})
        await eventually(
            lambda: (
                (kmock.obj(PT_RESOURCE, NS, "demo") or {})["metadata"]["annotations"][HASH] != "sha256:edited"
            )
        )
    assert any("RayJob in all namespaces is not served" in r.getMessage() for r in caplog.records)
    # One list of each cache (owned, foreign) was refused (404) and not tried again.
    listed = [r for r in kmock if "/rayjobs" in r.url.path]
    assert [r.action for r in listed] == [km.action.LIST] * 2
    assert sorted(r.params["labelSelector"] for r in listed) == [
        "app.kubernetes.io/managed-by!=optimenv",
        "app.kubernetes.io/managed-by=optimenv",
    ]
