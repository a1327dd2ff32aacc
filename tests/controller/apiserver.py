"""kmock's Kubernetes emulator with the API-server behaviour the controller relies on.

kmock 0.8 stores objects as plain dicts. This subclass adds what a real API server does and the
controller's contract depends on (see machine-notes.md, kmock limits):

- ``uid``, ``resourceVersion``, ``creationTimestamp`` and ``generation`` (bumped only when ``spec``
  changes, never by a ``/status`` write) are stamped on every stored object;
- a server-side apply (``PATCH`` with ``application/apply-patch+yaml``) of a missing object creates
  it, as the API server does; other patches of a missing object answer 404;
- deleting an object with finalizers marks it (``deletionTimestamp``, a MODIFIED event); it goes
  when the last finalizer is removed;
- the state changes only when the emulator itself answers: a scripted answer (an injected 409, 429,
  500, a slow reply) leaves the stored objects untouched, as a failed request does on a real server;
- lists and watches honour ``labelSelector`` (``k=v``, ``k!=v``, ``k``, ``!k``); a list says its
  resourceVersion, and a watch from a resourceVersion replays only the events after it (kmock's own
  watch replays every object); an object whose labels move it into or out of a watch's selection
  shows there as ADDED or DELETED, as on a real server.

Apply is still a dict merge (no field ownership): where ownership matters, tests script the answer.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import gzip
import importlib.resources
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
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
        self._version = 0  # the last resourceVersion given out
        # Every event ever published, per resource, with its resourceVersion: what a watch replays.
        self._log: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
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
        ref = kmock.resource(resource)
        key = (ref, meta.get("namespace"), meta["name"])
        info = self.resources.get(ref)
        body.setdefault("apiVersion", f"{ref.group}/{ref.version}" if ref.group else ref.version)
        if info is not None:
            body.setdefault("kind", info.kind)
        self._stamp(body, None)
        self.objects[key] = body

    # -- the emulated server ---------------------------------------------------------------
    def _stamp(self, new: dict[str, Any], old: dict[str, Any] | None, *, status_only: bool = False) -> None:
        meta = new.setdefault("metadata", {})
        old_meta = (old or {}).get("metadata", {})
        meta["uid"] = old_meta.get("uid") or meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or _now()
        meta["resourceVersion"] = str(self._next_version())
        generation = old_meta.get("generation", 0)
        if old is None or (not status_only and new.get("spec") != old.get("spec")):
            generation += 1
        meta["generation"] = generation

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def received_at(self, request: rendering.Request) -> float:
        """When the request arrived (event-loop clock)."""
        return self._received[request.id]

    def _discovery(self, request: rendering.Request) -> Callable[[rendering.Request], Any] | None:
        """kmock's discovery document for this GET, as its fallback reactions choose it."""
        path = request.url.path.rstrip("/") or "/"
        if request.method.value != "GET":
            return None
        fixed = {
            "/": self._serve_root,
            "/api": self._serve_api,
            "/apis": self._serve_apis,
            "/version": self._serve_server_version,
        }
        if path in fixed:
            return fixed[path]
        parts = path.strip("/").split("/")
        if (parts[0] == "apis" and len(parts) == 3) or (parts[0] == "api" and len(parts) == 2):
            return self._serve_version
        if parts[0] == "apis" and len(parts) == 2:
            return self._serve_group
        return None

    async def _handle(self, request: rendering.Request) -> Any:
        self._received[request.id] = asyncio.get_running_loop().time()
        plural = request.resource.plural if request.resource is not None else None
        serve = self._direct.get(request.action) if plural else self._discovery(request)
        if serve is not None and len(self._payloads) == self._builtin:
            # Nothing scripted: answer directly. kmock's matching re-reads every recorded request for
            # each request (quadratic), too slow for the benchmark's tens of thousands of requests.
            return await rendering.Response(payload=serve)(request)
        # Skip KubernetesEmulator._handle (it changes state before any scripted answer is chosen);
        # the state changes below, in the fallback reactions, only when the emulator answers.
        return await kmock.KubernetesScaffold._handle(self, request)

    async def _publish(
        self, request: rendering.Request, kind: str, raw: dict[str, Any], old: dict[str, Any] | None = None
    ) -> None:
        assert request.resource is not None
        if kind == "DELETED":  # a deletion has its own resourceVersion on a real server
            raw = {**raw, "metadata": {**raw["metadata"], "resourceVersion": str(self._next_version())}}
        version = int(raw["metadata"]["resourceVersion"])
        event = {"type": kind, "object": raw, "old": old}
        self._log.setdefault(request.resource, []).append((version, event))
        await self._buses[request.resource].put(event)

    async def _serve_list(self, request: rendering.Request) -> Any:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        match = selector(request.params.get("labelSelector"))
        async with self._lock:
            items = [
                obj.raw
                for (resource, namespace, _), obj in self.objects.items()
                if resource == request.resource
                and not obj.deleted
                and request.namespace in (None, namespace)
                and match(obj.raw)
            ]
            version = str(self._version)
        # As a real API server says it: <Kind>List, whose items clients take the kind from.
        info = self.resources.get(request.resource)
        kind = f"{info.kind}List" if info is not None else "List"
        group = request.resource.group
        api_version = f"{group}/{request.resource.version}" if group else request.resource.version
        return {
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        yield b""  # the headers go out now, even if nothing happens
        assert request.resource is not None
        match = selector(request.params.get("labelSelector"))
        since = request.params.get("resourceVersion")
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()  # under the lock: nothing is published between it and the replay
            if since and since != "0":
                replay = [e for v, e in self._log.get(request.resource, []) if v > int(since)]
            else:  # no resourceVersion: the current objects, then what follows
                replay = [
                    {"type": "ADDED", "object": obj.raw, "old": None}
                    for (res, _, _), obj in self.objects.items()
                    if res == request.resource and not obj.deleted
                ]
        try:
            for event in replay:
                shown = _as_seen(event, request.namespace, match)
                if shown is not None:
                    yield shown
            async for event in bus.stream(since=mark):
                shown = _as_seen(event, request.namespace, match)
                if shown is not None:
                    yield shown
        finally:
            await bus.unmark(mark)

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
            patch = copy.deepcopy(request.data)
            if status_only:  # the /status subresource ignores everything but status
                patch = {"status": patch.get("status")}
            elif "status" in patch:  # and the main resource ignores status
                patch = {k: v for k, v in patch.items() if k != "status"}
            return await self._modify(request, live, patch, status_only=status_only)

    async def _modify(
        self, request: rendering.Request, live: Any, patch: dict[str, Any], *, status_only: bool = False
    ) -> Any:
        """Patch a stored object (the lock held); one that is being deleted goes once its finalizers do."""
        old = live.raw
        live.patch(patch)
        new = dict(live.raw)
        new["metadata"] = dict(new.get("metadata", {}))
        self._stamp(new, old, status_only=status_only)
        live.history[-1] = new
        raw = live.raw
        if raw["metadata"].get("deletionTimestamp") and not raw["metadata"].get("finalizers"):
            live.delete()
            await self._publish(request, "DELETED", raw)
        else:
            await self._publish(request, "MODIFIED", raw, old)
        return raw

    async def _serve_delete(self, request: rendering.Request) -> Any:
        key = self._key(request)
        async with self._lock:
            live = self._live(key)
            if live is None:
                raise kmock.KubernetesObjectNotFoundError()
            if live.raw["metadata"].get("finalizers"):  # marked; deleted when the last finalizer goes
                if live.raw["metadata"].get("deletionTimestamp"):
                    return live.raw
                return await self._modify(request, live, {"metadata": {"deletionTimestamp": _now()}})
            raw = live.raw
            live.delete()
            await self._publish(request, "DELETED", raw)
        return raw


def selector(text: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """A label selector (equality-based terms, comma-joined) as a predicate on an object."""
    terms: list[Callable[[Mapping[str, str]], bool]] = []
    for term in filter(None, (t.strip() for t in (text or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            terms.append(lambda labels, k=term[1:]: k not in labels)
        elif " " in term:
            raise ValueError(f"set-based selector terms are not emulated: {term!r}")
        else:
            terms.append(lambda labels, k=term: k in labels)

    def match(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return match


def _as_seen(
    event: Mapping[str, Any], namespace: str | None, match: Callable[[Mapping[str, Any]], bool]
) -> dict[str, Any] | None:
    """An event as a watch with this namespace and selector sees it (None: not at all)."""
    obj, old = event["object"], event.get("old")
    if namespace is not None and obj.get("metadata", {}).get("namespace") != namespace:
        return None
    now, before = match(obj), old is not None and match(old)
    kind = event["type"]
    if kind == "MODIFIED" and now != before:
        kind = "ADDED" if now else "DELETED"
    elif not now and not (kind == "DELETED" and before):
        return None
    return {"type": kind, "object": obj}


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
