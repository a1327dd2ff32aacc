"""Owned jobs are watched (``--job-kind``): drift or deletion of one is repaired at once, on the wire.

Like the ConfigMaps: a change to a job this controller owns reconciles its OptimEnv; the echo of the
controller's own apply (and the job operator's status writes) reconciles nothing; jobs that no
OptimEnv controls are ignored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from optimenv_controller.handlers import Controller
from tests.controller import test_wire as wire
from tests.controller.apiserver import ApiServer, eventually, settle
from tests.controller.conftest import NS, optimenv
from tests.controller.harness import running_operator
from tests.controller.test_wire import applies, creates, events, ready, status_writes, user_patch

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


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_deleted_job_is_reapplied(kmock: ApiServer, kind: str) -> None:
    resource, path, kind_name = KINDS[kind]
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": kind, **JOB}))
    async with running_operator(str(kmock.url), job_kinds=(kind,)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        before = kmock.obj(resource, NS, "demo")
        assert before is not None
        # The echo of the first apply (ADDED) reconciled nothing: one reconcile, the create.
        assert reconciles(op.controller) == 1
        mark = kmock.count
        await user_delete(kmock, f"{path}/demo")
        await eventually(lambda: kmock.obj(resource, NS, "demo") is not None)
        await settle(kmock)
        assert reconciles(op.controller) == 2  # the deletion; not the echo of the re-apply
    writes = kmock.writes(since=mark)
    assert applies(writes) == []
    (applied,) = creates(writes)  # it was gone: created by POST, never an apply that could adopt
    assert applied.url.path == path
    assert applied.data["metadata"]["name"] == "demo"
    assert applied.params["fieldManager"] == "optimenv"
    assert applied.data["metadata"]["ownerReferences"] == before["metadata"]["ownerReferences"]
    assert applied.data["metadata"]["annotations"][HASH] == before["metadata"]["annotations"][HASH]
    assert status_writes(writes) == []  # still "4 children in sync": status unchanged
    (created,) = events(writes, "Created")
    assert created.data["message"] == f"created {kind_name} demo"
    assert [r for r in writes if r not in (applied, created)] == []


async def test_modified_job_is_reapplied_with_force(kmock: ApiServer) -> None:
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        job = kmock.obj(PT_RESOURCE, NS, "demo")
        assert job is not None
        stamp = job["metadata"]["annotations"][HASH]
        mark, count = kmock.count, reconciles(op.controller)
        # Someone edits the job: its content hash no longer matches what the OptimEnv renders.
        await user_patch(kmock, f"{PT_PATH}/demo", {"metadata": {"annotations": {HASH: "sha256:edited"}}})
        await eventually(
            lambda: (kmock.obj(PT_RESOURCE, NS, "demo") or {})["metadata"]["annotations"][HASH] == stamp
        )
        await settle(kmock)
        assert reconciles(op.controller) == count + 1  # the edit; the echo of the repair is skipped
    writes = kmock.writes(since=mark)
    (applied,) = applies(writes)
    assert applied.url.path == f"{PT_PATH}/demo"
    assert applied.params["fieldManager"] == "optimenv"
    assert applied.params["force"] == "true"  # ours: take the fields back
    assert applied.data["metadata"]["annotations"][HASH] == stamp
    (updated,) = events(writes, "Updated")
    assert updated.data["message"] == "updated PyTorchJob demo"
    assert status_writes(writes) == []


async def test_echo_and_job_status_writes_cause_zero_writes(kmock: ApiServer) -> None:
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark, count = kmock.count, reconciles(op.controller)
        # The training operator reports progress: MODIFIED events of an unchanged, owned job.
        for phase in ("Created", "Running"):
            await user_patch(kmock, f"{PT_PATH}/demo/status", {"status": {"conditions": [{"type": phase}]}})
        await settle(kmock)
        assert reconciles(op.controller) == count
    job = kmock.obj(PT_RESOURCE, NS, "demo")
    assert job is not None and job["status"]["conditions"] == [{"type": "Running"}]
    assert kmock.writes(since=mark) == []
    assert controller_requests(kmock, mark) == []  # not even a read


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


async def test_a_foreign_job_holding_the_name_is_watched_until_it_goes(kmock: ApiServer) -> None:
    """NameConflict on a job: nothing written; once the user deletes that job, the children follow at once."""
    foreign = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "demo", "namespace": NS},
        "spec": {"a": 1},
    }
    kmock.put_object(PT_RESOURCE, foreign)
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)) as op:
        await eventually(lambda: wire.condition(kmock, "demo", "Ready").get("reason") == "NameConflict")
        await settle(kmock)
        assert applies(kmock.writes()) == creates(kmock.writes()) == []
        count = reconciles(op.controller)
        # Changing the foreign job is still none of our business.
        await user_patch(kmock, f"{PT_PATH}/demo", {"spec": {"a": 2}})
        await settle(kmock)
        assert reconciles(op.controller) == count
        mark = kmock.count
        await user_delete(kmock, f"{PT_PATH}/demo")
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        assert reconciles(op.controller) == count + 1  # the deletion; not the echoes of the creates
    writes = kmock.writes(since=mark)
    created = creates(writes)
    assert [r.url.path for r in created] == [
        *([f"/api/v1/namespaces/{NS}/configmaps"] * 3),
        PT_PATH,  # the job last: it mounts the ConfigMaps
    ]
    assert all(r.params["fieldManager"] == "optimenv" for r in created)
    job = kmock.obj(PT_RESOURCE, NS, "demo")
    assert job is not None and job["metadata"]["ownerReferences"][0]["kind"] == "OptimEnv"
    assert wire.condition(kmock, "demo", "Ready")["reason"] == "Applied"
    assert len(status_writes(writes)) == 1


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
    kmock.put_object("optimenv.dev/v1alpha1/optimenvs", optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("rayjob", "pytorchjob")):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        await user_delete(kmock, f"{PT_PATH}/demo")
        await eventually(lambda: kmock.obj(PT_RESOURCE, NS, "demo") is not None)
    assert any(
        "Unresolved resources cannot be served" in r.getMessage() and "rayjobs" in r.getMessage()
        for r in caplog.records
    )
    assert not [r for r in kmock if "/rayjobs" in r.url.path]
