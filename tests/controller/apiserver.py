"""kmock's Kubernetes emulator with the API-server behaviour the controller relies on.

kmock 0.8 stores objects as plain dicts. This subclass adds what a real API server does and the
controller's contract depends on (see machine-notes.md, kmock limits):

- ``uid``, ``resourceVersion``, ``creationTimestamp`` and ``generation`` (bumped only when ``spec``
  changes, never by a ``/status`` write) are stamped on every stored object;
- a server-side apply (``PATCH`` with ``application/apply-patch+yaml``) of a missing object creates
  it, as the API server does; other patches of a missing object answer 404;
- the state changes only when the emulator itself answers: a scripted answer (an injected 409, 429,
  500, a slow reply) leaves the stored objects untouched, as a failed request does on a real server.

Apply is still a dict merge (no field ownership): where ownership matters, tests script the answer.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import gzip
import importlib.resources
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import kmock
from kmock._internal import k8s_dicts, rendering

APPLY = "application/apply-patch+yaml"
OPTIMENVS = "optimenv.dev/v1alpha1/optimenvs"
JOBS = {
    "ray.io/v1/rayjobs": "RayJob",
    "kubeflow.org/v1/pytorchjobs": "PyTorchJob",
    "trainer.kubeflow.org/v1alpha1/trainjobs": "TrainJob",
}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiServer(kmock.KubernetesEmulator):  # type: ignore[misc]
    """The emulator with stamped metadata and apply-creates; see the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1)
        self._received: dict[int, float] = {}
        # kmock's load_bundled() uses a deprecated importlib call (warnings are errors here).
        bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
        self.resources.load_data(gzip.decompress(bundled))
        self.resources[OPTIMENVS] = kmock.ResourceInfo(
            kind="OptimEnv",
            singular="optimenv",
            namespaced=True,
            verbs={"get", "list", "watch", "patch", "create", "delete"},
            subresources={"status"},
        )
        # The job kinds the controller can own (their CRDs, as discovery shows them).
        for resource, kind in JOBS.items():
            self.resources[resource] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=True,
                verbs={"get", "list", "watch", "patch", "create", "delete"},
                subresources={"status"},
            )
        self._builtin = len(self._payloads)
        self._direct = {
            kmock.action.LIST: self._serve_list,
            kmock.action.WATCH: self._serve_watch,
            kmock.action.FETCH: self._serve_fetch,
            kmock.action.CREATE: self._serve_create,
            kmock.action.UPDATE: self._serve_update,
            kmock.action.DELETE: self._serve_delete,
        }

    # -- what a test reads ------------------------------------------------------------------
    def writes(self, *, since: int = 0) -> list[rendering.Request]:
        """The controller's state-changing requests (POST, PATCH, PUT, DELETE) from request ``since`` on.

        Requests of the test itself (kmock's own client) are left out.
        """
        return [
            r
            for r in self._requests[since:]
            if r.method.value in ("POST", "PATCH", "PUT", "DELETE")
            and not r.headers.get("User-Agent", "").startswith("kmock/")
        ]

    @property
    def count(self) -> int:
        """Requests received so far (a mark for ``writes(since=...)``)."""
        return len(self._requests)

    def obj(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.objects[key].raw
        return raw

    def put_object(self, resource: str, body: dict[str, Any]) -> None:
        """Store an object as if a user had created it (no request is recorded)."""
        meta = body.setdefault("metadata", {})
        key = (kmock.resource(resource), meta.get("namespace"), meta["name"])
        self._stamp(body, None)
        self.objects[key] = body

    # -- the emulated server ---------------------------------------------------------------
    def _stamp(self, new: dict[str, Any], old: dict[str, Any] | None, *, status_only: bool = False) -> None:
        meta = new.setdefault("metadata", {})
        old_meta = (old or {}).get("metadata", {})
        meta["uid"] = old_meta.get("uid") or meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or _now()
        meta["resourceVersion"] = str(next(self._rv))
        generation = old_meta.get("generation", 0)
        if old is None or (not status_only and new.get("spec") != old.get("spec")):
            generation += 1
        meta["generation"] = generation

    def received_at(self, request: rendering.Request) -> float:
        """When the request arrived (event-loop clock)."""
        return self._received[request.id]

    async def _handle(self, request: rendering.Request) -> Any:
        self._received[request.id] = asyncio.get_running_loop().time()
        plural = request.resource.plural if request.resource is not None else None
        serve = self._direct.get(request.action) if plural else None  # not for discovery documents
        if serve is not None and len(self._payloads) == self._builtin:
            # Nothing scripted: answer directly. kmock's matching re-reads every recorded request for
            # each request (quadratic), too slow for the benchmark's tens of thousands of requests.
            return await rendering.Response(payload=serve)(request)
        # Skip KubernetesEmulator._handle (it changes state before any scripted answer is chosen);
        # the state changes below, in the fallback reactions, only when the emulator answers.
        return await kmock.KubernetesScaffold._handle(self, request)

    async def _publish(self, request: rendering.Request, kind: str, raw: dict[str, Any]) -> None:
        assert request.resource is not None
        await self._buses[request.resource].put({"type": kind, "object": raw})

    def _key(self, request: rendering.Request, data: dict[str, Any] | None = None) -> Any:
        meta = (data or {}).get("metadata", {})
        return (
            request.resource,
            request.namespace or meta.get("namespace"),
            request.name or meta.get("name"),
        )

    def _live(self, key: Any) -> k8s_dicts.Object | None:
        if key in self.objects and not self.objects[key].deleted:
            obj: k8s_dicts.Object = self.objects[key]
            return obj
        return None

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        # A keyed lookup: kmock's own fetch scans every stored object (slow with thousands).
        live = self._live((request.resource, request.namespace, request.name))
        if live is None:
            raise kmock.KubernetesObjectNotFoundError()
        return live.raw

    async def _serve_create(self, request: rendering.Request) -> Any:
        data = copy.deepcopy(request.data)
        key = self._key(request, data)
        async with self._lock:
            if self._live(key) is not None:
                raise kmock._internal.k8s.KubernetesObjectConflictError()
            return await self._insert(request, key, data)

    async def _insert(self, request: rendering.Request, key: Any, data: dict[str, Any]) -> Any:
        """Store a new object (the lock held) and publish its ADDED event."""
        data.setdefault("metadata", {}).setdefault("namespace", key[1])
        self._stamp(data, None)
        if key in self.objects:
            self.objects[key].create(data)
        else:
            self.objects[key] = data
        raw = self.objects[key].raw
        await self._publish(request, "ADDED", raw)
        return raw

    async def _serve_update(self, request: rendering.Request) -> Any:
        key = self._key(request)
        status_only = request.subresource == "status"
        apply = request.headers.get("Content-Type", "").startswith(APPLY)
        async with self._lock:
            live = self._live(key)
            if live is None:
                if not apply or status_only:
                    raise kmock.KubernetesObjectNotFoundError()
                return await self._insert(request, key, copy.deepcopy(request.data))
            old = live.raw
            patch = copy.deepcopy(request.data)
            if status_only:  # the /status subresource ignores everything but status
                patch = {"status": patch.get("status")}
            elif "status" in patch:  # and the main resource ignores status
                patch = {k: v for k, v in patch.items() if k != "status"}
            live.patch(patch)
            new = dict(live.raw)
            new["metadata"] = dict(new.get("metadata", {}))
            self._stamp(new, old, status_only=status_only)
            live.history[-1] = new
            raw = live.raw
            await self._publish(request, "MODIFIED", raw)
        return raw

    async def _serve_delete(self, request: rendering.Request) -> Any:
        key = self._key(request)
        async with self._lock:
            live = self._live(key)
            if live is None:
                raise kmock.KubernetesObjectNotFoundError()
            raw = live.raw
            live.delete()
            await self._publish(request, "DELETED", raw)
        return raw


def scripted(
    pred: Callable[[rendering.Request], bool], times: int = 1
) -> Callable[[rendering.Request], bool]:
    """A kmock criterion matching the first ``times`` requests for which ``pred`` holds."""
    matched: set[int] = set()

    def criterion(request: rendering.Request) -> bool:
        if request.id in matched:
            return True
        if len(matched) < times and pred(request):
            matched.add(request.id)
            return True
        return False

    return criterion


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


async def eventually(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Wait until ``check()`` holds; fail with the last state otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(interval)


async def settle(api: ApiServer, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Wait until the server has received no request for ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count = api.count
    while True:
        await asyncio.sleep(quiet)
        if api.count == count:
            return
        if loop.time() > deadline:
            raise AssertionError(f"requests still arriving after {timeout}s")
        count = api.count
