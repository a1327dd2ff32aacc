"""API refusals become status, creates never adopt, retries back off, missed events are caught up.

Each test runs the real kopf operator against kmock and reads the wire: refusals that retrying cannot
fix (403, 404, 422) are reported in ``Ready`` and a Warning Event and wait for the user's next change
(no 5-minute stall, no hot loop); a child absent when read is created by POST, so a same-named object
that appears meanwhile is refused (409) and then reported as a NameConflict, never adopted.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Callable

import kmock as km

from optimenv_controller.controller import MAX_DELAY, backoff
from tests.controller.apiserver import ApiServer, eventually, scripted, settle, status_body
from tests.controller.conftest import NS, optimenv
from tests.controller.harness import running_operator
from tests.controller.test_wire import (
    CHILDREN,
    CM,
    CM_PATH,
    OE,
    OE_PATH,
    applies,
    condition,
    creates,
    events,
    ready,
    status_writes,
    user_patch,
)

JOB = {"target": "pytorchjob", "image": "registry.example/train:1", "command": ["python", "train.py"]}
PT_COLLECTION = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
PT = f"{PT_COLLECTION}/demo"


def _ready_reason(api: ApiServer) -> str | None:
    reason = condition(api, "demo", "Ready").get("reason")
    return str(reason) if reason is not None else None


class BrokenWatch:
    """Scripts the first two watches that ``pred`` matches: the first ends with 410 Gone once
    ``gate`` is set; the second (after the re-list) sends nothing until ``release`` is set, as a real
    API server's watch from the list's resourceVersion does when nothing changes."""

    def __init__(self, api: ApiServer, pred: Callable[[km.Request], bool]) -> None:
        self.gate, self.release = asyncio.Event(), asyncio.Event()
        self.watches: list[int] = []
        api[scripted(lambda r: r.action == km.action.WATCH and pred(r), times=2)] << self._answer

    async def _answer(self, request: km.Request) -> tuple[dict[str, object], ...]:
        self.watches.append(request.id)
        if len(self.watches) == 1:
            await self.gate.wait()
            return ({"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")},)
        await self.release.wait()
        return ()


def _foreign_configmaps(r: km.Request) -> bool:
    """kopf's list or watch of the ConfigMaps without the controller's label (a referenced one)."""
    return r.resource == km.resource(CM) and "!=" in r.params.get("labelSelector", "")


async def _quiet_for(api: ApiServer, seconds: float) -> None:
    """Nothing at all reaches the server for ``seconds`` (a retry loop would show here)."""
    await settle(api)
    count = api.count
    await asyncio.sleep(seconds)
    assert api.count == count


async def test_forbidden_job_read_is_status_and_the_users_fix_reconciles_at_once(kmock: ApiServer) -> None:
    message = 'pytorchjobs.kubeflow.org "demo" is forbidden: User cannot get resource'
    (
        kmock[scripted(lambda r: r.method.value == "GET" and r.url.path == PT)]
        << 403
        << status_body(403, "Forbidden", message)
    )
    kmock.put_object(OE, optimenv(job=JOB))
    async with running_operator(str(kmock.url)):
        await eventually(lambda: _ready_reason(kmock) == "Forbidden")
        await _quiet_for(kmock, 1.5)
        writes = kmock.writes()
        # The ConfigMaps are brought in line although the job could not be read.
        assert sorted(r.data["metadata"]["name"] for r in creates(writes)) == sorted(CHILDREN)
        cond = condition(kmock, "demo", "Ready")
        assert cond["status"] == "False"
        assert cond["message"] == f"get PyTorchJob {NS}/demo: 403 {message}"
        assert condition(kmock, "demo", "Valid")["status"] == "True"
        (warning,) = events(writes, "Forbidden")
        assert warning.data["type"] == "Warning" and "PyTorchJob" in warning.data["message"]
        # The user's next change reconciles at once (the refusal was one-off here, like fixed RBAC).
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"config": {"gradient_accumulation_steps": 8}}})
        await eventually(lambda: ready(kmock, generation=2), timeout=5)
    assert kmock.obj("kubeflow.org/v1/pytorchjobs", NS, "demo") is not None


async def test_missing_job_crd_is_reported_not_found(kmock: ApiServer) -> None:
    crd_gone = status_body(404, "NotFound", "the server could not find the requested resource")
    kmock[scripted(lambda r: r.url.path.startswith(PT_COLLECTION), times=100)] << 404 << crd_gone
    kmock.put_object(OE, optimenv(job=JOB))
    async with running_operator(str(kmock.url)):
        await eventually(lambda: _ready_reason(kmock) == "NotFound")
        await _quiet_for(kmock, 1.0)
    cond = condition(kmock, "demo", "Ready")
    assert cond["message"].startswith(f"create PyTorchJob {NS}/demo: 404 the server could not find")
    for name in CHILDREN:  # written first: the job mounts them
        assert kmock.obj(CM, NS, name) is not None
    writes = kmock.writes()
    assert len([r for r in creates(writes) if r.url.path == PT_COLLECTION]) == 1  # not retried
    assert len(events(writes, "NotFound")) == 1
    (status,) = status_writes(writes)
    assert status.data["status"]["plan"]["target"] == "pytorchjob"


async def test_invalid_apply_422_is_reported_apply_failed(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        refused = status_body(422, "Invalid", 'ConfigMap "demo-env" is invalid: data: Too long')
        path = f"{CM_PATH}/demo-env"
        kmock[scripted(lambda r: r.method.value == "PATCH" and r.url.path == path)] << 422 << refused
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"config": {"gradient_accumulation_steps": 8}}})
        await eventually(lambda: _ready_reason(kmock) == "ApplyFailed")
        await _quiet_for(kmock, 1.0)
    cond = condition(kmock, "demo", "Ready")
    assert cond["observedGeneration"] == 2
    assert cond["message"] == f"apply ConfigMap {NS}/demo-env: 422 {refused['message']}"
    assert len(events(kmock.writes(), "ApplyFailed")) == 1


async def test_object_appearing_between_read_and_create_is_never_adopted(kmock: ApiServer) -> None:
    """A user's ConfigMap of a child's name appears unseen (stored without a watch event): the
    controller's create is refused with 409, it reads the holder and reports it, never adopts it."""
    user_cm = {
        "metadata": {"name": "demo-env", "namespace": NS, "labels": {"team": "data"}},
        "data": {"K": "1"},
    }
    async with running_operator(str(kmock.url)) as op:
        await eventually(lambda: any(r.action == km.action.WATCH for r in kmock))
        await settle(kmock)
        kmock.put_object(CM, user_cm)  # no event: neither kopf nor the cache knows it
        snapshot = copy.deepcopy(kmock.obj(CM, NS, "demo-env"))
        async with kmock.post(OE_PATH, json=optimenv(), headers={"Connection": "close"}) as response:
            assert response.status == 200, await response.text()
        await eventually(lambda: _ready_reason(kmock) == "NameConflict", timeout=15)
        await settle(kmock)
        assert op.controller.metrics.reconciles.labels(result="conflict")._value.get() == 1
    assert kmock.obj(CM, NS, "demo-env") == snapshot  # untouched: no owner reference, no merged keys
    writes = kmock.writes()
    refused = [r for r in creates(writes) if r.data["metadata"]["name"] == "demo-env"]
    assert len(refused) == 1  # the POST got 409 AlreadyExists; the holder was read and reported
    (read,) = [r for r in kmock if r.action == km.action.FETCH]
    assert read.url.path == f"{CM_PATH}/demo-env"
    assert not [r for r in applies(writes) if r.url.path == f"{CM_PATH}/demo-env"]
    assert "ConfigMap 'demo-env' exists and is not owned" in condition(kmock, "demo", "Ready")["message"]


def test_backoff_doubles_from_one_second_up_to_the_cap_and_honours_retry_after() -> None:
    assert [backoff(n, 1.0) for n in range(10)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_DELAY]
    assert backoff(100, 1.0) == MAX_DELAY
    assert backoff(0, 7.0) == 7.0 and backoff(4, 7.0) == 16


async def test_persistent_server_errors_are_retried_with_exponential_backoff(kmock: ApiServer) -> None:
    path = f"{OE_PATH}/demo/status"
    fail = scripted(lambda r: r.method.value == "PATCH" and r.url.path == path, times=3)
    kmock[fail] << 500 << status_body(500, "InternalError", 'failed calling webhook "x"')
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock), timeout=20)
    attempts = [kmock.received_at(r) for r in status_writes(kmock.writes())]
    assert len(attempts) == 4
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for gap, expected in zip(gaps, (1.0, 2.0, 4.0), strict=True):
        assert expected * 0.9 <= gap <= expected + 1.5, gaps


async def test_referenced_configmap_changed_while_its_watch_was_down_is_caught_up(kmock: ApiServer) -> None:
    y1 = "base_model: m\nfsdp_version: 2\nfsdp_config:\n  offload_params: false\n"
    kmock.put_object(CM, {"metadata": {"name": "train-cfg", "namespace": NS}, "data": {"config.yaml": y1}})
    kmock.put_object(OE, optimenv(spec={"configMapRef": {"name": "train-cfg"}}))
    broken = BrokenWatch(kmock, _foreign_configmaps)
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        # Edited while the ConfigMap watch is broken: no event; only the re-list (type None) shows it.
        y2 = y1.replace("false", "true")
        kmock.put_object(
            CM, {"metadata": {"name": "train-cfg", "namespace": NS}, "data": {"config.yaml": y2}}
        )
        broken.gate.set()
        try:
            await eventually(lambda: "FSDP_OFFLOAD_PARAMS" in (kmock.obj(CM, NS, "demo-env") or {})["data"])
            assert len(broken.watches) == 2  # the change came through the re-list, not a replaying watch
        finally:
            broken.release.set()
    lists = [r for r in kmock if r.action == km.action.LIST and _foreign_configmaps(r)]
    assert len(lists) >= 2


async def test_resync_repairs_a_missed_change_and_writes_nothing_otherwise(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)) as op:
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark = kmock.count
        assert await op.controller.resync(idle=3600) == 0  # reconciled just now: not due
        assert await op.controller.resync(idle=0) == 1
        assert kmock.writes(since=mark) == []  # nothing changed, nothing written
        # A hand edit whose watch event never came (stored without an event).
        env = copy.deepcopy(kmock.obj(CM, NS, "demo-env"))
        assert env is not None
        env["data"]["ACCELERATE_MIXED_PRECISION"] = "fp16"
        kmock.put_object(CM, env)
        await asyncio.sleep(0.3)
        assert kmock.writes(since=mark) == []
        assert await op.controller.resync(idle=0) == 1
        await settle(kmock)
    (repair,) = applies(kmock.writes(since=mark))
    assert repair.url.path == f"{CM_PATH}/demo-env" and repair.params["force"] == "true"
    assert (kmock.obj(CM, NS, "demo-env") or {})["data"]["ACCELERATE_MIXED_PRECISION"] == "bf16"


async def test_child_deleted_while_the_cache_watch_was_down_is_created_again(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    owned = "app.kubernetes.io/managed-by=optimenv"
    broken = BrokenWatch(
        kmock, lambda r: r.resource == km.resource(CM) and r.params.get("labelSelector") == owned
    )
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        mark = kmock.count
        kmock.objects[(km.resource(CM), NS, "demo-spec")].delete()  # gone without a watch event
        broken.gate.set()
        try:
            await eventually(lambda: kmock.obj(CM, NS, "demo-spec") is not None)
            await settle(kmock)
        finally:
            broken.release.set()
    (created,) = creates(kmock.writes(since=mark))  # the new list missed it: reported as deleted
    assert created.data["metadata"]["name"] == "demo-spec"
    assert len(broken.watches) == 2
