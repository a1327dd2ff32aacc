"""The controller's wire contract, asserted on the requests kmock received from the real kopf operator.

Each test starts the operator (kopf + the controller's handlers) as a task against kmock, acts
through kmock's own HTTP client as a user would, and reads back what the controller sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kmock as km

from tests.controller.apiserver import ApiServer, eventually, settle
from tests.controller.conftest import NS, optimenv
from tests.controller.harness import running_operator

OE = "optimenv.dev/v1alpha1/optimenvs"
CM = "v1/configmaps"
OE_PATH = f"/apis/optimenv.dev/v1alpha1/namespaces/{NS}/optimenvs"
CM_PATH = f"/api/v1/namespaces/{NS}/configmaps"
CHILDREN = ("demo-env", "demo-spec", "demo-deepspeed")
APPLY = "application/apply-patch+yaml"


def condition(api: ApiServer, name: str, kind: str) -> dict[str, Any]:
    obj = api.obj(OE, NS, name) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            found: dict[str, Any] = cond
            return found
    return {}


def ready(api: ApiServer, name: str = "demo", generation: int = 1) -> bool:
    cond = condition(api, name, "Ready")
    return cond.get("status") == "True" and cond.get("observedGeneration") == generation


def applies(writes: list[km.Request]) -> list[km.Request]:
    return [r for r in writes if r.method.value == "PATCH" and r.headers.get("Content-Type") == APPLY]


def creates(writes: list[km.Request]) -> list[km.Request]:
    """Children created by POST (Events are POSTs too, and left out)."""
    return [r for r in writes if r.method.value == "POST" and not r.url.path.endswith("/events")]


def status_writes(writes: list[km.Request]) -> list[km.Request]:
    return [r for r in writes if r.method.value == "PATCH" and r.url.path.endswith("/status")]


def events(writes: list[km.Request], reason: str | None = None) -> list[km.Request]:
    return [
        r
        for r in writes
        if r.method.value == "POST" and r.url.path.endswith("/events") and reason in (None, r.data["reason"])
    ]


async def user_patch(api: ApiServer, path: str, patch: dict[str, Any]) -> None:
    # Connection: close, so no idle keep-alive connection is left for kopf's shutdown to wait on.
    headers = {"Content-Type": "application/merge-patch+json", "Connection": "close"}
    async with api.patch(path, json=patch, headers=headers) as response:
        assert response.status == 200, await response.text()


async def test_create_posts_children_with_owner_and_status(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    uid = kmock.obj(OE, NS, "demo")["metadata"]["uid"]  # type: ignore[index]
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
    writes = kmock.writes()

    # Absent when read: created by POST, which the server refuses (409) if an object of that name
    # appeared meanwhile; an apply would merge into it and adopt it.
    created = creates(writes)
    assert applies(writes) == []
    assert sorted(r.data["metadata"]["name"] for r in created) == sorted(CHILDREN)
    for r in created:
        assert r.url.path == CM_PATH
        assert r.headers["Content-Type"] == "application/json"
        assert r.params["fieldManager"] == "optimenv"
        meta = r.data["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "optimenv.dev/v1alpha1",
                "kind": "OptimEnv",
                "name": "demo",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "optimenv"
        assert meta["annotations"]["optimenv.dev/content-hash"].startswith("sha256:")
        assert "status" not in r.data and "resourceVersion" not in meta
    # Never PUT a child, never DELETE anything.
    assert not [r for r in writes if r.method.value in ("PUT", "DELETE")]

    (status,) = status_writes(writes)
    assert status.url.path == f"{OE_PATH}/demo/status"
    assert status.headers["Content-Type"] == "application/merge-patch+json"
    body = status.data["status"]
    assert body["observedGeneration"] == 1
    assert {c["type"]: (c["status"], c["reason"], c["observedGeneration"]) for c in body["conditions"]} == {
        "Ready": ("True", "Applied", 1),
        "Valid": ("True", "Planned", 1),
    }
    assert body["plan"]["envConfigMap"] == "demo-env"
    assert body["plan"]["deepspeedConfigMap"] == "demo-deepspeed"
    assert body["plan"]["hash"] == _spec_hash(kmock)
    # No Event: the first creation of a new object's children is in its status (Events mark changes).
    assert events(writes) == []
    # Nothing else: kopf runs event handlers only and keeps no bookkeeping on the object.
    assert [r for r in writes if r not in created and r is not status and r not in events(writes)] == []
    # The children were never read one by one: the cache lists and watches them by label.
    assert [r for r in kmock if r.action == km.action.FETCH] == []
    (_listed,) = [
        r
        for r in kmock
        if r.action == km.action.LIST
        and r.url.path == "/api/v1/configmaps"
        and r.params.get("labelSelector") == "app.kubernetes.io/managed-by=optimenv"
    ]


def _spec_hash(api: ApiServer) -> str:
    import json

    spec = api.obj(CM, NS, "demo-spec")
    assert spec is not None
    value: str = json.loads(spec["data"]["spec.json"])["hash"]
    return value


PYTORCHJOB = {"target": "pytorchjob", "image": "registry.example/train:1", "command": ["python", "train.py"]}


def _serve_pytorchjobs(api: ApiServer) -> None:
    """Make the mock server know PyTorchJobs, as a cluster with the Kubeflow operator does."""
    api.resources["kubeflow.org/v1/pytorchjobs"] = km.ResourceInfo(
        kind="PyTorchJob",
        singular="pytorchjob",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch"},
    )


async def test_job_target_is_applied_and_owned(kmock: ApiServer) -> None:
    _serve_pytorchjobs(kmock)
    kmock.put_object(OE, optimenv(job=PYTORCHJOB))
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
    (applied,) = [r for r in creates(kmock.writes()) if r.url.path.endswith("/pytorchjobs")]
    assert applied.url.path == f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
    assert applied.data["metadata"]["name"] == "demo"
    assert applied.params["fieldManager"] == "optimenv"
    assert applied.data["metadata"]["ownerReferences"][0]["controller"] is True
    assert condition(kmock, "demo", "Ready")["message"] == "4 children in sync"
    obj = kmock.obj(OE, NS, "demo")
    assert obj is not None and obj["status"]["plan"]["target"] == "pytorchjob"


async def test_noop_resync_makes_zero_writes(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)) as first:
        await eventually(lambda: ready(kmock))
        await settle(kmock)  # let kopf finish its own bookkeeping
    mark = kmock.count
    # A restart resumes every object: a full resync against an unchanged cluster.
    async with running_operator(str(kmock.url)) as second:
        await eventually(
            lambda: second.controller.metrics.reconciles.labels(result="synced")._value.get() >= 1
        )
        await asyncio.sleep(0.5)
    assert kmock.writes(since=mark) == []
    assert first.controller is not second.controller
    # Nor a single read of a child or of the OptimEnv: both come from lists and watches.
    assert [r for r in list(kmock)[mark:] if r.action == km.action.FETCH] == []


async def test_update_reapplies_only_changed_children_with_force(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        first = condition(kmock, "demo", "Ready")
        mark = kmock.count
        await asyncio.sleep(1.1)  # so that a moved lastTransitionTime would show
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"config": {"gradient_accumulation_steps": 8}}})
        await eventually(lambda: ready(kmock, generation=2))
    writes = kmock.writes(since=mark)
    changed = applies(writes)
    # GAS is in the env and in the worker spec; the DeepSpeed JSON keeps "auto" and is not rewritten.
    assert sorted(r.url.path for r in changed) == [f"{CM_PATH}/demo-env", f"{CM_PATH}/demo-spec"]
    assert all(r.params["force"] == "true" for r in changed)  # they are ours: take them back
    env = kmock.obj(CM, NS, "demo-env")
    assert env is not None and env["data"]["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "8"
    (status,) = status_writes(writes)
    assert status.data["status"]["observedGeneration"] == 2
    after = condition(kmock, "demo", "Ready")
    assert after["lastTransitionTime"] == first["lastTransitionTime"]  # still True: no transition
    (updated,) = events(writes, "Updated")
    assert updated.data["message"] == "updated ConfigMap demo-env, ConfigMap demo-spec"


async def test_referenced_configmap_change_reconciles(kmock: ApiServer) -> None:
    yaml_v1 = "base_model: m\nfsdp_version: 2\nfsdp_config:\n  offload_params: false\n"
    kmock.put_object(
        CM, {"metadata": {"name": "train-cfg", "namespace": NS}, "data": {"config.yaml": yaml_v1}}
    )
    kmock.put_object(OE, optimenv(spec={"configMapRef": {"name": "train-cfg"}}))
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        env = kmock.obj(CM, NS, "demo-env")
        assert env is not None and "FSDP_OFFLOAD_PARAMS" not in env["data"]
        mark = kmock.count
        yaml_v2 = yaml_v1.replace("offload_params: false", "offload_params: true")
        await user_patch(kmock, f"{CM_PATH}/train-cfg", {"data": {"config.yaml": yaml_v2}})
        await eventually(lambda: "FSDP_OFFLOAD_PARAMS" in (kmock.obj(CM, NS, "demo-env") or {})["data"])
        await asyncio.sleep(0.3)
    writes = kmock.writes(since=mark)
    assert {r.url.path for r in applies(writes)} == {f"{CM_PATH}/demo-env", f"{CM_PATH}/demo-spec"}
    # The user's ConfigMap is read, never written; its change came with the watch, not a GET.
    assert not [r for r in writes if r.url.path.endswith("/train-cfg")]
    reads = [r for r in kmock if r.action == km.action.FETCH and r.url.path.endswith("/train-cfg")]
    assert len(reads) <= 1 and all(r.id < mark for r in reads)  # at most once, before it was watched
    assert (kmock.obj(CM, NS, "train-cfg") or {})["data"]["config.yaml"] == yaml_v2
    assert not (kmock.obj(CM, NS, "train-cfg") or {})["metadata"].get("ownerReferences")


async def test_invalid_config_sets_valid_false_keeps_children_and_does_not_retry(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        before = {n: kmock.obj(CM, NS, n) for n in CHILDREN}
        mark = kmock.count
        await user_patch(
            kmock, f"{OE_PATH}/demo", {"spec": {"config": {"fsdp_config": {"ofload_params": True}}}}
        )
        await eventually(lambda: condition(kmock, "demo", "Valid").get("status") == "False")
        await settle(kmock)
        settled = kmock.count
        await asyncio.sleep(1.5)  # a hot retry loop would show up here
        assert kmock.count == settled
    valid = condition(kmock, "demo", "Valid")
    assert valid["reason"] == "InvalidConfig"
    assert valid["message"].startswith("spec.config.fsdp_config.ofload_params: unknown key")
    assert valid["observedGeneration"] == 2
    assert condition(kmock, "demo", "Ready")["status"] == "False"
    writes = kmock.writes(since=mark)
    assert applies(writes) == []
    assert {n: kmock.obj(CM, NS, n) for n in CHILDREN} == before
    (invalid,) = events(writes, "Invalid")
    assert invalid.data["type"] == "Warning"
    assert "ofload_params" in invalid.data["message"]
    # The last good plan stays in status.
    obj = kmock.obj(OE, NS, "demo")
    assert obj is not None and obj["status"]["plan"]["envConfigMap"] == "demo-env"


async def test_foreign_object_with_a_child_name_is_never_touched(kmock: ApiServer) -> None:
    foreign = {
        "metadata": {"name": "demo-env", "namespace": NS, "labels": {"team": "data"}},
        "data": {"A": "1"},
    }
    kmock.put_object(CM, foreign)
    snapshot = kmock.obj(CM, NS, "demo-env")
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: condition(kmock, "demo", "Ready").get("reason") == "NameConflict")
        await asyncio.sleep(0.5)
    ready_cond = condition(kmock, "demo", "Ready")
    assert ready_cond["status"] == "False"
    assert "ConfigMap 'demo-env' exists and is not owned by this OptimEnv" in ready_cond["message"]
    writes = kmock.writes()
    assert applies(writes) == []  # no child at all: never a half-applied set
    assert not [r for r in writes if r.method.value == "DELETE"]
    assert kmock.obj(CM, NS, "demo-env") == snapshot
    assert len(events(writes, "NameConflict")) == 1


async def test_deletion_leaves_children_to_the_garbage_collector(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        obj = kmock.obj(OE, NS, "demo")
        assert obj is not None and not obj["metadata"].get("finalizers")  # nothing blocks deletion
        await settle(kmock)
        mark = kmock.count
        async with kmock.delete(f"{OE_PATH}/demo", headers={"Connection": "close"}) as response:
            assert response.status == 200
        await eventually(lambda: kmock.obj(OE, NS, "demo") is None)
        await asyncio.sleep(0.5)
    assert kmock.writes(since=mark) == []  # no DELETE, no re-apply, no status write
    for name in CHILDREN:
        child = kmock.obj(CM, NS, name)
        assert child is not None
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == obj["metadata"]["uid"] and ref["blockOwnerDeletion"] is True


async def test_namespaced_controller_lists_and_watches_its_namespaces_only(kmock: ApiServer) -> None:
    kmock.put_object(OE, optimenv())
    elsewhere = optimenv()
    elsewhere["metadata"]["namespace"] = "other"
    kmock.put_object(OE, elsewhere)
    async with running_operator(str(kmock.url), namespaces=(NS,)):
        await eventually(lambda: ready(kmock))
        await settle(kmock)
    reads = [r for r in kmock if r.method.value == "GET" and r.resource is not None and r.resource.plural]
    assert reads and all(r.namespace == NS for r in reads)  # lists and watches, per namespace
    assert {
        (r.resource.plural, r.params.get("labelSelector")) for r in reads if r.action == km.action.LIST
    } == {
        ("optimenvs", None),
        ("configmaps", "app.kubernetes.io/managed-by=optimenv"),
        ("configmaps", "app.kubernetes.io/managed-by!=optimenv"),
    }
    assert kmock.writes() and all(r.namespace == NS for r in kmock.writes())
    assert (kmock.obj(OE, "other", "demo") or {}).get("status") is None  # not watched: untouched


async def test_status_drops_what_the_spec_no_longer_has(kmock: ApiServer) -> None:
    _serve_pytorchjobs(kmock)
    kmock.put_object(OE, optimenv(job=PYTORCHJOB))
    async with running_operator(str(kmock.url)):
        await eventually(lambda: ready(kmock))
        before = kmock.obj(OE, NS, "demo")
        assert before is not None and before["status"]["plan"]["target"] == "pytorchjob"
        assert before["status"]["job"]["kind"] == "PyTorchJob"
        mark = kmock.count
        await user_patch(kmock, f"{OE_PATH}/demo", {"spec": {"job": None}})
        await eventually(lambda: ready(kmock, generation=2))
    # A merge patch keeps every key it does not name: the controller sends null for what is gone.
    (status,) = status_writes(kmock.writes(since=mark))
    assert status.data["status"]["job"] is None and status.data["status"]["plan"]["target"] is None
    assert all(None not in cond.values() for cond in status.data["status"]["conditions"])
    after = kmock.obj(OE, NS, "demo")
    assert after is not None and "job" not in after["status"] and "target" not in after["status"]["plan"]
