"""Drift and blockers, repaired at once, on the wire.

An owned child (ConfigMap, or a job of a watched kind) whose managed fields someone changes is put
back within one reconcile of the change: the change reaches the controller through the cache's
label-selected watch, never a poll or a GET. The echo of the controller's own writes and the job
operator's status writes that change no phase cost nothing. A foreign object holding a wanted name
is watched (kopf, by the inverse selector), and the OptimEnv converges as soon as it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kmock as km
import pytest

from optimenv_controller import reconcile as rc
from tests.controller import test_wire as wire
from tests.controller.apiserver import ApiServer, eventually, settle
from tests.controller.conftest import NS, optimenv
from tests.controller.harness import running_operator
from tests.controller.test_jobs import (
    HASH,
    JOB,
    PT_PATH,
    PT_RESOURCE,
    controller_requests,
    reconciles,
    user_delete,
)
from tests.controller.test_wire import (
    CM,
    CM_PATH,
    OE,
    applies,
    creates,
    events,
    ready,
    status_writes,
    user_patch,
)

MANAGED_BY = "app.kubernetes.io/managed-by"


def fetches(api: ApiServer, since: int) -> list[km.Request]:
    return [r for r in list(api)[since:] if r.action == km.action.FETCH]


def rendered_job() -> dict[str, Any]:
    obj = optimenv(job={"target": "pytorchjob", **JOB})
    obj["metadata"].update(uid="u", generation=1)
    want = rc.desired(obj)
    assert isinstance(want, rc.Desired)
    job = rc.job_child(want)
    assert job is not None
    return job


def container(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return spec


async def repaired(
    api: ApiServer,
    resource: str,
    name: str,
    patch: dict[str, Any],
    restored: Callable[[dict[str, Any]], bool],
) -> int:
    """Converge, edit a child by hand, wait until it is ``restored``; exactly one reconcile did it.

    Returns the request mark taken just before the edit.
    """
    job = resource == PT_RESOURCE
    path = f"{PT_PATH if job else CM_PATH}/{name}"
    api.put_object(OE, optimenv(job={"target": "pytorchjob", **JOB}) if job else optimenv())
    async with running_operator(str(api.url), job_kinds=("pytorchjob",) if job else ()) as op:
        await eventually(lambda: ready(api))
        await settle(api)
        mark, count = api.count, reconciles(op.controller)
        await user_patch(api, path, patch)
        edited = int((api.obj(resource, NS, name) or {})["metadata"]["resourceVersion"])
        assert not restored(api.obj(resource, NS, name) or {})  # the edit is really one

        def back() -> bool:
            obj = api.obj(resource, NS, name) or {}
            return int(obj["metadata"]["resourceVersion"]) > edited and restored(obj)

        await eventually(back)
        await settle(api)
        assert reconciles(op.controller) == count + 1  # the edit; not the echo of the repair
    return mark


async def test_job_spec_edit_is_repaired_within_one_reconcile(kmock: ApiServer) -> None:
    image = JOB["image"]
    # Only the spec: labels, annotations (the content hash) and owner stay as they were.
    other = {**container(rendered_job()), "image": "registry.example/other:9"}
    patch = {"spec": {"pytorchReplicaSpecs": {"Master": {"template": {"spec": {"containers": [other]}}}}}}
    mark = await repaired(kmock, PT_RESOURCE, "demo", patch, lambda job: container(job)["image"] == image)
    writes = kmock.writes(since=mark)
    (applied,) = applies(writes)
    assert applied.url.path == f"{PT_PATH}/demo"
    assert applied.params["fieldManager"] == "optimenv" and applied.params["force"] == "true"
    assert container(applied.data)["image"] == image
    (updated,) = events(writes, "Updated")
    assert updated.data["message"] == "updated PyTorchJob demo"
    assert status_writes(writes) == [] and fetches(kmock, mark) == []
    assert [r for r in writes if r not in (applied, updated)] == []


async def test_job_metadata_edit_is_repaired_with_force(kmock: ApiServer) -> None:
    stamp = rendered_job()["metadata"]["annotations"][HASH]
    patch = {"metadata": {"annotations": {HASH: "sha256:edited"}}}
    mark = await repaired(
        kmock, PT_RESOURCE, "demo", patch, lambda job: job["metadata"]["annotations"][HASH] == stamp
    )
    (applied,) = applies(kmock.writes(since=mark))
    assert applied.params["force"] == "true" and applied.data["metadata"]["annotations"][HASH] == stamp


async def test_echo_and_status_writes_without_a_new_phase_cost_nothing(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        assert reconciles(op.controller) == 1  # the echoes of the four creates reconciled nothing
        mark, count = kmock.count, reconciles(op.controller)
        # The training operator reports progress that leaves the phase (Pending, Created) as it is.
        created = {"type": "Created", "status": "True", "reason": "Created", "message": ""}
        for replicas in ({"Master": {}}, {"Master": {"active": 1}}):
            status = {"conditions": [created], "replicaStatuses": replicas}
            await user_patch(kmock, f"{PT_PATH}/demo/status", {"status": status})
        await settle(kmock)
        assert reconciles(op.controller) == count
    assert controller_requests(kmock, mark) == []  # not even a read


async def test_configmap_data_edit_is_repaired_within_one_reconcile(kmock: ApiServer) -> None:
    key = "ACCELERATE_MIXED_PRECISION"
    patch = {"data": {key: "fp16"}}
    mark = await repaired(kmock, CM, "demo-env", patch, lambda cm: cm["data"][key] == "bf16")
    writes = kmock.writes(since=mark)
    (applied,) = applies(writes)
    assert applied.url.path == f"{CM_PATH}/demo-env" and applied.params["force"] == "true"
    assert fetches(kmock, mark) == [] and status_writes(writes) == []


async def test_configmap_that_lost_its_label_is_taken_back(kmock: ApiServer) -> None:
    """Without the label it leaves the cache's selection (DELETED there, ADDED in kopf's): still ours
    by its owner reference, so it is applied again, label and all, never re-created."""
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark = kmock.count
        await user_patch(kmock, f"{CM_PATH}/demo-spec", {"metadata": {"labels": {MANAGED_BY: None}}})
        await eventually(
            lambda: (kmock.obj(CM, NS, "demo-spec") or {})["metadata"]["labels"].get(MANAGED_BY) == "optimenv"
        )
        await settle(kmock)
    writes = kmock.writes(since=mark)
    (applied,) = applies(writes)
    assert applied.url.path == f"{CM_PATH}/demo-spec" and applied.params["force"] == "true"
    assert creates(writes) == [] and fetches(kmock, mark) == []


async def test_deleted_configmap_is_created_again_at_once(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark, count = kmock.count, reconciles(op.controller)
        await user_delete(kmock, f"{CM_PATH}/demo-deepspeed")
        await eventually(lambda: kmock.obj(CM, NS, "demo-deepspeed") is not None)
        await settle(kmock)
        assert reconciles(op.controller) == count + 1
    writes = kmock.writes(since=mark)
    (created,) = creates(writes)
    assert created.url.path == CM_PATH and created.data["metadata"]["name"] == "demo-deepspeed"
    assert applies(writes) == [] and fetches(kmock, mark) == []
    # A child created again is an Event on its OptimEnv.
    (event,) = events(writes)
    assert (event.data["type"], event.data["reason"]) == ("Normal", "Created")
    assert event.data["message"] == "created ConfigMap demo-deepspeed"
    owner = kmock.obj(OE, NS, "demo") or {}
    assert event.data["involvedObject"]["uid"] == owner["metadata"]["uid"]
    assert event.data["involvedObject"]["kind"] == "OptimEnv"


FOREIGN = {
    "configmap": (
        CM,
        f"{CM_PATH}/demo-env",
        {"metadata": {"name": "demo-env", "namespace": NS}, "data": {"A": "1"}},
    ),
    "pytorchjob": (
        PT_RESOURCE,
        f"{PT_PATH}/demo",
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "demo", "namespace": NS},
        },
    ),
}


@pytest.mark.parametrize("blocked", sorted(FOREIGN))
async def test_a_foreign_object_holding_a_name_is_watched_until_it_goes(
    kmock: ApiServer, blocked: str
) -> None:
    """NameConflict: nothing written; once the user deletes the holder, the children follow at once."""
    resource, path, body = FOREIGN[blocked]
    kmock.put_object(resource, {**body, "spec": {"a": 1}} if blocked != "configmap" else body)
    kmock.put_object(OE, optimenv(job={"target": "pytorchjob", **JOB}))
    async with running_operator(str(kmock.url), job_kinds=("pytorchjob",)) as op:
        await eventually(lambda: wire.condition(kmock, "demo", "Ready").get("reason") == "NameConflict")
        await settle(kmock)
        assert creates(kmock.writes()) == applies(kmock.writes()) == []  # never a half-applied set
        count = reconciles(op.controller)
        await user_patch(kmock, path, {"metadata": {"labels": {"team": "data"}}})  # still not ours
        await settle(kmock)
        assert reconciles(op.controller) == count
        mark = kmock.count
        await user_delete(kmock, path)
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        assert reconciles(op.controller) == count + 1  # the deletion; not the echoes of the creates
    writes = kmock.writes(since=mark)
    assert [r.url.path for r in creates(writes)] == [CM_PATH] * 3 + [PT_PATH]  # the job last: it mounts them
    assert all(r.params["fieldManager"] == "optimenv" for r in creates(writes))
    job = kmock.obj(PT_RESOURCE, NS, "demo")
    assert job is not None and job["metadata"]["ownerReferences"][0]["kind"] == "OptimEnv"
    assert wire.condition(kmock, "demo", "Ready")["reason"] == "Applied"
    assert len(status_writes(writes)) == 1 and fetches(kmock, mark) == []
