"""Watch-fed caches: what the controller knows of the cluster, without a GET per reconcile.

A :class:`WatchCache` lists a set of kinds (in the watched namespaces, or all) and then watches them
from the list's resourceVersion, keeping every object in memory (or what ``keep`` leaves of it) and
telling a listener of each change (``None`` for an object seen in a listing, as kopf reports them).
The controller runs three:

* the ``OptimEnv`` objects;
* its own children, selected by label (``app.kubernetes.io/managed-by=optimenv``): ConfigMaps and
  the job kinds given with ``--job-kind``, whole, so that a reconcile reads them here;
* the other objects of those kinds (the inverse selector), as stubs: enough to know that a name is
  taken and by whom, and to hear that the ConfigMap an ``OptimEnv`` references changed.

A watch that ends with 410 Gone, or fails, is followed by a fresh list: objects missing from it are
reported as deleted. A kind the API server does not serve (404: its CRD is not installed) is skipped
with a warning; one that may not be listed (403) is retried with backoff. While a kind is not served
here, :meth:`WatchCache.serves` says so and the controller reads those objects with GETs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from optimenv_controller.kube import ApiFailure, Gone, Kube, KubeError, Retryable

logger = logging.getLogger("optimenv.controller")

Kind = tuple[str, str]  # (apiVersion, kind)
Key = tuple[str, str, str, str]  # (apiVersion, kind, namespace, name)
Listener = Callable[[str | None, dict[str, Any]], None]


def cache_key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (body["apiVersion"], body["kind"], meta["namespace"], meta["name"])


def newer(body: Mapping[str, Any], than: Mapping[str, Any] | None) -> bool:
    """Whether ``body`` may replace ``than`` (a copy of the same object from another source).

    resourceVersions are opaque to clients; etcd's are integers, and only where both are is an
    older copy (a late watch event after our own write's answer) kept out. Otherwise the newcomer wins.
    """
    if than is None:
        return True
    mine, theirs = body.get("metadata") or {}, than.get("metadata") or {}
    new, old = mine.get("resourceVersion"), theirs.get("resourceVersion")
    if isinstance(new, str) and isinstance(old, str) and new.isdigit() and old.isdigit():
        return mine.get("uid") != theirs.get("uid") or int(new) >= int(old)
    return True


class WatchCache:
    """The objects of some kinds, by label selector, fed by list and watch."""

    def __init__(
        self,
        kube: Kube,
        kinds: Iterable[Kind],
        namespaces: Sequence[str] = (),
        *,
        labels: Mapping[str, str] | None = None,
        exclude: bool = False,
        keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        listener: Listener | None = None,
        max_delay: float = 300.0,
    ) -> None:
        """``labels``: the objects carrying them (``exclude``: not carrying them); none: all objects.
        ``keep``: what to store of each object (default: all of it)."""
        self._kube = kube
        self.kinds = sorted(set(kinds))
        self._namespaces: tuple[str | None, ...] = tuple(namespaces) or (None,)
        self._labels, self._exclude = dict(labels or {}), exclude
        self._keep = keep
        self.listener = listener
        self._max_delay = max_delay
        self._objects: dict[Key, dict[str, Any]] = {}
        self._served: set[tuple[str, str, str | None]] = set()
        self._ready = asyncio.Event()
        self._pending = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._pending = len(self.kinds) * len(self._namespaces)
        if not self._pending:
            self._ready.set()
        for api_version, kind in self.kinds:
            for namespace in self._namespaces:
                self._tasks.append(asyncio.create_task(self._reflect(api_version, kind, namespace)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def ready(self) -> None:
        """Until every kind was listed once (or found not served)."""
        await self._ready.wait()

    async def refresh(self) -> None:
        """List every kind again now (changes a watch missed are reported), and wait for it."""
        if not self._tasks:
            return
        await self.stop()
        self._ready.clear()
        self.start()
        await self.ready()

    # -- reads and writes -----------------------------------------------------------------------
    def selects(self, body: Mapping[str, Any]) -> bool:
        """Whether ``body``'s labels put it in this cache (so its watch reports it)."""
        labels = (body.get("metadata") or {}).get("labels") or {}
        carries = all(labels.get(k) == v for k, v in self._labels.items())
        return not carries if self._exclude and self._labels else carries

    def serves(self, api_version: str, kind: str, namespace: str) -> bool:
        """Whether this kind's objects in ``namespace`` are here (else: read them with a GET)."""
        served = self._served
        return (api_version, kind, namespace) in served or (api_version, kind, None) in served

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get((api_version, kind, namespace, name))

    def put(self, body: dict[str, Any]) -> None:
        """Store what the API server returned for our own write, unless a newer copy is here already."""
        key = cache_key(body)
        if (key[0], key[1]) in self.kinds and self.selects(body) and newer(body, self._objects.get(key)):
            self._objects[key] = self._kept(body)

    def values(self) -> list[dict[str, Any]]:
        """Every object here (a copy of the list: the caller may await meanwhile)."""
        return list(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)

    def _kept(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._keep(body) if self._keep is not None else body

    # -- the loops ------------------------------------------------------------------------------
    async def _reflect(self, api_version: str, kind: str, namespace: str | None) -> None:
        failures = 0
        where = f"{kind} in {namespace or 'all namespaces'}"
        select = {"exclude": self._exclude}
        while True:
            try:
                items, version = await self._kube.list(api_version, kind, namespace, self._labels, **select)
                self._replace(api_version, kind, namespace, items)
                self._listed((api_version, kind, namespace), served=True)
                failures = 0
                watch = self._kube.watch(api_version, kind, namespace, self._labels, version, **select)
                async for type_, body in watch:
                    self._apply(type_, body)
            except Gone:
                continue  # list again at once
            except ApiFailure as exc:
                self._listed((api_version, kind, namespace), served=False)
                if exc.status == 404:
                    logger.warning("%s is not served (is its CRD installed?): not watched: %s", where, exc)
                    return
                logger.warning("cannot list %s: %s; read one by one meanwhile", where, exc)
                delay = min(2.0**failures, self._max_delay)
            except KubeError as exc:
                # Not known for now: reconciles go on meanwhile, reading these objects one by one.
                self._listed((api_version, kind, namespace), served=False)
                hint = exc.delay if isinstance(exc, Retryable) else 1.0
                delay = min(max(2.0**failures, hint), self._max_delay)
                logger.info("watch of %s ended: %s; listing again in %.1fs", where, exc, delay)
            else:
                delay = 0.0
            failures += 1
            await asyncio.sleep(delay)

    def _listed(self, segment: tuple[str, str, str | None], *, served: bool) -> None:
        if served:
            self._served.add(segment)
        else:
            self._served.discard(segment)
        if not self._ready.is_set():
            self._pending -= 1
            if self._pending <= 0:
                self._ready.set()

    def _replace(
        self, api_version: str, kind: str, namespace: str | None, items: list[dict[str, Any]]
    ) -> None:
        listed = {cache_key(body): body for body in items}
        gone = [
            key
            for key in self._objects
            if key[:2] == (api_version, kind) and namespace in (None, key[2]) and key not in listed
        ]
        for key in gone:
            self._notify("DELETED", self._objects.pop(key))
        for key, body in listed.items():
            self._objects[key] = self._kept(body)
            self._notify(None, body)

    def _apply(self, type_: str, body: dict[str, Any]) -> None:
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK
        key = cache_key(body)
        if type_ == "DELETED":
            self._objects.pop(key, None)
        elif newer(body, self._objects.get(key)):
            self._objects[key] = self._kept(body)
        else:
            return  # an old copy arriving after our own write's answer: nothing new
        self._notify(type_, body)

    def _notify(self, type_: str | None, body: dict[str, Any]) -> None:
        if self.listener is not None:
            try:
                self.listener(type_, body)
            except Exception:  # a listener's bug must not stop the cache
                logger.exception("listener failed on %s %s", type_, cache_key(body))
