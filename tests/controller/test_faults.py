"""Faults scripted into kmock's answers: the controller retries with backoff and converges, with the
status written and no duplicate children."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import kmock as km

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
    creates,
    ready,
    status_writes,
    user_patch,
)

Pred = Callable[[km.Request], bool]


def patch_of(path: str) -> Pred:
    return lambda r: r.method.value == "PATCH" and r.url.path == path


def converged(api: ApiServer) -> None:
    """Every child exists once, owned, with the status of the current generation."""
    names = sorted(name for (res, ns, name) in api.objects if res == km.resource(CM) and ns == NS)
    assert names == sorted(CHILDREN)
    for name in CHILDREN:
        child = api.obj(CM, NS, name)
        assert child is not None and child["metadata"]["ownerReferences"][0]["name"] == "demo"
    obj = api.obj(OE, NS, "demo")
    assert obj is not None
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["plan"]["envConfigMap"] == "demo-env"
    # Children are created by POST only while absent (a retry reads again first) and never adopted.
    posted = [r.data["metadata"]["name"] for r in creates(api.writes()) if r.url.path == CM_PATH]
    assert set(posted) == set(CHILDREN)


async def _converges(api: ApiServer, **operator: Any) -> None:
    api.put_object(OE, optimenv())
    async with running_operator(str(api.url), **operator):
        await eventually(lambda: ready(api), timeout=15)
        await settle(api)
    converged(api)


def post_of(name: str) -> Pred:
    return lambda r: r.method.value == "POST" and r.url.path == CM_PATH and r.data["metadata"]["name"] == name


async def test_conflict_409_on_create_is_retried(kmock: ApiServer) -> None:
    kmock[scripted(post_of("demo-env"))] << 409 << status_body(409, "AlreadyExists", "already exists")
    await _converges(kmock)
    attempts = [r for r in creates(kmock.writes()) if r.data["metadata"]["name"] == "demo-env"]
    assert len(attempts) == 2  # the refused one and the retry (it read the child again: still absent)


async def test_conflict_409_on_apply_is_retried(kmock: ApiServer) -> None:
    path = f"{CM_PATH}/demo-env"
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
        kmock[scripted(patch_of(path))] << 409 << status_body(409, "Conflict", "Apply failed with 1 conflict")
        mark = kmock.count
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"config": {"gradient_accumulation_steps": 8}}})
        await eventually(lambda: ready(kmock, generation=2), timeout=15)
        await settle(kmock)
    attempts = [r for r in applies(kmock.writes(since=mark)) if r.url.path == path]
    assert len(attempts) == 2  # the refused one and the retry
    env = kmock.obj(CM, NS, "demo-env")
    assert env is not None and env["data"]["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "8"


async def test_throttled_429_status_write_waits_for_retry_after(kmock: ApiServer) -> None:
    path = f"{OE_PATH}/demo/status"
    (
        kmock[scripted(patch_of(path))]
        << 429
        << {"Retry-After": "1"}
        << status_body(429, "TooManyRequests", "slow down")
    )
    await _converges(kmock)
    first, second = status_writes(kmock.writes())
    gap = _seconds_between(kmock, first, second)
    assert gap >= 0.9  # Retry-After honoured, not a hot retry
    # The same status again (only lastTransitionTime may move: the first never landed).
    for write in (first, second):
        for cond in write.data["status"]["conditions"]:
            cond.pop("lastTransitionTime")
    assert second.data == first.data


async def test_server_error_500_twice_on_status_keeps_status(kmock: ApiServer) -> None:
    path = f"{OE_PATH}/demo/status"
    kmock[scripted(patch_of(path), times=2)] << 500 << status_body(500, "InternalError", "etcd timeout")
    await _converges(kmock)
    assert len(status_writes(kmock.writes())) == 3
    # Children were created once: the retries found them in sync and only wrote the status again.
    assert len(creates(kmock.writes())) == 3 and applies(kmock.writes()) == []


async def test_slow_response_times_out_and_is_retried(kmock: ApiServer) -> None:
    async def slow(request: km.Request) -> dict[str, Any]:
        await asyncio.sleep(3)
        return status_body(504, "Timeout", "too slow")

    kmock[scripted(post_of("demo-spec"))] << slow
    await _converges(kmock, kube_timeout=0.5)
    posts = [r for r in creates(kmock.writes()) if r.data["metadata"]["name"] == "demo-spec"]
    assert len(posts) == 2  # the one that timed out (and changed nothing) and the retry


async def test_watch_ending_with_410_gone_relists_and_converges(kmock: ApiServer) -> None:
    def first_watch(r: km.Request) -> bool:
        return r.action == km.action.WATCH and r.resource == km.resource(OE)

    gone = {"type": "ERROR", "object": status_body(410, "Expired", "too old resource version: 1 (42)")}
    kmock[scripted(first_watch)] << (gone,)
    async with running_operator(str(kmock.url)):
        await eventually(lambda: len([r for r in kmock if first_watch(r)]) >= 2)
        # Created after the watch broke: only a re-list / re-watch can see it.
        body = optimenv()
        async with kmock.post(OE_PATH, json=body, headers={"Connection": "close"}) as response:
            assert response.status == 200, await response.text()
        await eventually(lambda: ready(kmock), timeout=15)
        await settle(kmock)
    converged(kmock)
    lists = [r for r in kmock if r.action == km.action.LIST and r.resource == km.resource(OE)]
    assert len(lists) >= 2  # the 410 made kopf list again


def _seconds_between(api: ApiServer, first: km.Request, second: km.Request) -> float:
    return api.received_at(second) - api.received_at(first)
