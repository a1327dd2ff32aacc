"""The controller: what it knows of the cluster, when it reconciles, and how it retries.

Every trigger ends in :meth:`Controller.reconcile`, one level-based, idempotent pass:

* an ``OptimEnv`` listed (controller start, a re-list after a watch ended), added, or changed in a
  way that matters (a new ``metadata.generation`` or uid; our own status writes do not);
* an owned child (a ConfigMap, or a job of a kind given with ``--job-kind``) changed, deleted, or
  re-listed: drift of a managed field and a new job phase reconcile its owner, the echo of our own
  write does not;
* a foreign object (one without the controller's label) appearing in or leaving a name an
  ``OptimEnv`` wants, or a change of the ConfigMap an ``OptimEnv`` references;
* the periodic resync of the ``OptimEnv`` objects not reconciled for a while.

All of it comes from three :class:`~optimenv_controller.cache.WatchCache` (the ``OptimEnv``
objects, the owned children, the foreign objects: stubs, but referenced ConfigMaps whole), so a
reconcile reads nothing with a GET but a referenced ConfigMap not seen whole yet, children of job
kinds that are not watched, and a name a create found taken.
Each ``OptimEnv`` has one reconcile at a time. Retryable API errors are retried with an exponential
backoff (at least the server's Retry-After). A refusal that retrying cannot fix (403, 404, 422 of a
child) is status (``Ready=False``) and a Warning Event, like an invalid config: it is not retried
until the object or its ConfigMap changes.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from optimenv.resource import API_VERSION, KIND
from optimenv_controller import reconcile as rc
from optimenv_controller.cache import WatchCache
from optimenv_controller.kube import ApiFailure, Kube, KubeError, Retryable
from optimenv_controller.metrics import Metrics

logger = logging.getLogger("optimenv.controller")

#: The longest wait between two retries of a reconcile.
MAX_DELAY = 300.0
#: Attempts of one triggered reconcile before it waits for the next change or resync.
EVENT_ATTEMPTS = 8
#: Every this many seconds, reconcile the OptimEnvs not reconciled for as long (a watch can miss events).
RESYNC_INTERVAL = 600.0
#: The label of what the controller creates: the owned children's cache selects it, the foreign
#: objects' cache selects its absence.
OWNED: Mapping[str, str] = {rc.MANAGED_BY: "optimenv"}

Key = tuple[str, str]  # (namespace, OptimEnv name)


def backoff(retry: int, hint: float) -> float:
    """Seconds before retry number ``retry`` (0 first): 1, 2, 4 … up to MAX_DELAY, never below ``hint``."""
    return max(hint, min(2.0 ** min(retry, 30), MAX_DELAY))


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(body: Mapping[str, Any]) -> Key:
    return (body["metadata"]["namespace"], body["metadata"]["name"])


def object_logger(obj: Mapping[str, Any]) -> logging.LoggerAdapter[logging.Logger]:
    """The controller's logger for one object: its JSON lines carry it under ``k8s-obj`` (kopf's key)."""
    meta = obj.get("metadata") or {}
    ref = {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj.get("kind", KIND),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "namespace": meta.get("namespace"),
    }
    return logging.LoggerAdapter(logger, {"k8s_ref": ref})


def _whole(body: Mapping[str, Any]) -> bool:
    """Whether a cached ConfigMap was kept whole (a stub has nothing but its identity and owner)."""
    return any(key in body for key in ("data", "binaryData", "immutable"))


def stub(body: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of a foreign object: enough to tell whose it is and to name it."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "resourceVersion", "labels", "ownerReferences")
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {k: meta[k] for k in keep if k in meta},
    }


class NameTaken(Exception):
    """A create found its name taken (409): the holder is known now; decide again."""

    def __init__(self, written: list[rc.Apply]) -> None:
        super().__init__("a child's name is taken")
        self.written = written


class Controller:
    """Reads from memory, decides (pure, in :mod:`reconcile`), writes; one reconcile per object at a time."""

    def __init__(
        self,
        kube: Kube,
        metrics: Metrics | None = None,
        *,
        job_kinds: Iterable[str] = (),
        namespaces: Iterable[str] = (),
    ) -> None:
        self.kube = kube
        self.metrics = metrics or Metrics()
        self.job_kinds = sorted(set(job_kinds))
        kinds = [("v1", "ConfigMap")] + [rc.JOB_KINDS[k] for k in self.job_kinds]
        where = tuple(namespaces)
        self.optimenvs = WatchCache(kube, [(API_VERSION, KIND)], where, listener=self.optimenv_event)
        self.owned = WatchCache(kube, kinds, where, labels=OWNED, listener=self.owned_event)
        self.foreign = WatchCache(
            kube, kinds, where, labels=OWNED, exclude=True, keep=self._keep, listener=self.foreign_event
        )
        for label, cache in (("optimenvs", self.optimenvs), ("owned", self.owned), ("foreign", self.foreign)):
            self.metrics.cached.labels(cache=label).set_function(cache.__len__)
        # Per OptimEnv, what its last reconcile wanted of each child (rc.managed_fields), and the
        # other way round: (namespace, child) → the OptimEnvs that want it.
        self._wanted: dict[Key, dict[rc.ChildKey, dict[str, Any]]] = {}
        self._wanters: defaultdict[tuple[str, rc.ChildKey], set[str]] = defaultdict(set)
        # The ConfigMap each OptimEnv references, and (namespace, ConfigMap) → those OptimEnvs.
        self._references: dict[Key, str] = {}
        self._referenced: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._reconciled: dict[Key, tuple[Any, Any]] = {}  # (uid, generation) last reconciled
        self._reconciled_at: dict[Key, float] = {}  # monotonic clock: what the resync walks
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Triggered, not started yet: the checks to pass first (None: none, reconcile anyway).
        self._queued: dict[Key, list[Callable[[], bool]] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def caches(self) -> tuple[WatchCache, ...]:
        return (self.optimenvs, self.owned, self.foreign)

    def start(self) -> None:
        for cache in self.caches:
            cache.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for cache in self.caches:
            await cache.stop()

    def optimenv(self, key: Key) -> dict[str, Any] | None:
        return self.optimenvs.get(API_VERSION, KIND, *key)

    # -- what is known of the OptimEnvs -----------------------------------------------------------
    def optimenv_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """The OptimEnv cache's listener: reconcile what was listed, added, or changed in its spec."""
        key = _key(body)
        if type_ == "DELETED":
            self.forget(key)
            return
        self._index_reference(key, rc.config_map_ref(body))
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return  # being deleted: garbage collection takes the children
        if type_ == "ADDED" or (type_ is None and key not in self._reconciled):
            self.trigger(key)  # new, or listed at start: reconciled whatever it says
        elif self._new_spec(key):
            # Checked again once no reconcile of it runs: the echo of our own status write is no news.
            self.trigger(key, lambda: self._new_spec(key))

    def forget(self, key: Key) -> None:
        self._index_reference(key, None)
        self._want(key, {})
        self._reconciled.pop(key, None)
        self._reconciled_at.pop(key, None)

    def _index_reference(self, key: Key, ref: str | None) -> None:
        old = self._references.pop(key, None)
        if old is not None:
            self._referenced[(key[0], old)].discard(key[1])
        if ref is not None:
            self._references[key] = ref
            self._referenced[(key[0], ref)].add(key[1])

    # -- reconcile ---------------------------------------------------------------------------------
    async def reconcile(self, key: Key) -> None:
        """Bring the children and status of one OptimEnv in line with its spec."""
        started = time.perf_counter()
        result = "error"
        try:
            async with self._locks[key]:
                for cache in self.caches:
                    await cache.ready()
                obj = self.optimenv(key)
                if obj is None or obj["metadata"].get("deletionTimestamp"):
                    result = "gone"
                    return
                result = await self._reconcile(obj)
                meta = obj["metadata"]
                self._reconciled[key] = (meta.get("uid"), meta.get("generation"))
                self._reconciled_at[key] = time.monotonic()
        except KubeError as exc:
            self.metrics.errors.labels(reason=str(exc.status) if exc.status else "network").inc()
            raise
        finally:
            self.metrics.reconciles.labels(result=result).inc()
            self.metrics.duration.observe(time.perf_counter() - started)

    async def _reconcile(self, obj: dict[str, Any]) -> str:
        want = await self._desired(obj)
        if isinstance(want, rc.Desired):
            self._want(_key(obj), {rc.child_key(b): rc.managed_fields(b) for b in want.children})
        earlier: list[rc.Apply] = []
        for _ in range(2):  # a second pass after a create found its name taken
            try:
                return await self._converge(obj, want, earlier)
            except NameTaken as taken:
                earlier.extend(taken.written)
        raise Retryable(f"{obj['metadata']['name']}: a child's name was taken twice in a row", 409)

    async def _desired(self, obj: Mapping[str, Any]) -> rc.Desired | rc.Invalid:
        ref = rc.config_map_ref(obj)
        try:
            referenced = await self._referenced_config(obj["metadata"]["namespace"], ref) if ref else None
        except ApiFailure as exc:
            # Not readable (403): as good as missing for planning; say why, like ConfigMapNotFound.
            return rc.Invalid(rc.failure_reason(exc.status), f"spec.configMapRef: {exc}")
        return rc.desired(obj, referenced)

    async def _referenced_config(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ConfigMap an OptimEnv references: from the caches once watched whole, else a GET."""
        if self.foreign.serves("v1", "ConfigMap", namespace):
            known = self._known(namespace, ("v1", "ConfigMap", name))
            if known is None or _whole(known):
                return known
        found = await self.kube.get("v1", "ConfigMap", namespace, name)
        if found is not None:
            self.foreign.put(found)  # referenced now: kept whole from here on
        return found

    def _keep(self, body: dict[str, Any]) -> dict[str, Any]:
        """What the foreign objects' cache keeps: a referenced ConfigMap whole, the rest as stubs."""
        meta = body["metadata"]
        referenced = body["kind"] == "ConfigMap" and self._referenced.get((meta["namespace"], meta["name"]))
        return body if referenced else stub(body)

    async def _observe(
        self, obj: Mapping[str, Any], want: rc.Desired
    ) -> tuple[dict[rc.ChildKey, dict[str, Any] | None], rc.Failure | None]:
        """The children as known: the cache, the foreign objects, or a GET for unwatched kinds."""
        namespace = obj["metadata"]["namespace"]
        observed: dict[rc.ChildKey, dict[str, Any] | None] = {}
        unknown: list[rc.ChildKey] = []
        for key in (rc.child_key(body) for body in want.children):
            if self.owned.serves(key[0], key[1], namespace):
                observed[key] = self._known(namespace, key)
            else:
                unknown.append(key)
        found = await asyncio.gather(
            *(self.kube.get(av, kind, namespace, name) for av, kind, name in unknown), return_exceptions=True
        )
        failure: rc.Failure | None = None
        for key, result in zip(unknown, found, strict=True):
            if isinstance(result, ApiFailure):
                refused = (failure.children if failure else frozenset()) | {key}
                failure = rc.Failure(rc.failure_reason(result.status), str(result), refused)
            elif isinstance(result, BaseException):
                raise result  # retryable (or unexpected): the whole reconcile is retried
            else:
                observed[key] = result
        return observed, failure

    async def _converge(
        self, obj: dict[str, Any], want: rc.Desired | rc.Invalid, earlier: list[rc.Apply]
    ) -> str:
        namespace, name = _key(obj)
        observed: dict[rc.ChildKey, dict[str, Any] | None] = {}
        failure: rc.Failure | None = None
        if isinstance(want, rc.Desired):
            observed, failure = await self._observe(obj, want)
        now = _now()
        planned = rc.decide(obj, want, observed, now, failure)
        written, failure = await self._write(planned.applies, observed, failure)
        written = [*earlier, *written]
        # Status from the children as they are now (the writes' answers): a new job's uid and phase.
        outcome = rc.decide(obj, want, observed, now, failure)
        if outcome.status is not None:
            self.optimenvs.put(await self.kube.patch_status(namespace, name, outcome.status.to_patch()))
        # Only after the writes they report succeeded: a retried reconcile does not repeat them.
        said = [e for e in outcome.events if e.reason not in ("Created", "Updated")]
        for event in (*rc.apply_events(obj, written), *said):
            await self._event(obj, event)
        return self._result(obj, want, outcome, failure, written)

    async def _write(
        self,
        applies: Iterable[rc.Apply],
        observed: dict[rc.ChildKey, dict[str, Any] | None],
        failure: rc.Failure | None,
    ) -> tuple[list[rc.Apply], rc.Failure | None]:
        """Create or apply each child in order until one is refused; ``observed`` gets the answers."""
        written: list[rc.Apply] = []
        for apply in applies:
            try:
                if apply.verb == "Created":
                    stored = await self.kube.create(apply.body)
                else:
                    stored = await self.kube.apply(apply.body, force=apply.force)
            except Retryable as exc:
                if apply.verb == "Created" and exc.status == 409 and await self._holder(apply.body):
                    raise NameTaken(written) from exc
                raise
            except ApiFailure as exc:
                return written, rc.Failure(rc.failure_reason(exc.status), str(exc))
            observed[rc.child_key(apply.body)] = stored
            self.owned.put(stored)
            written.append(apply)
        return written, failure

    async def _holder(self, body: Mapping[str, Any]) -> bool:
        """A create was refused with 409: read the object holding the name; whether it is there."""
        meta = body["metadata"]
        holder = await self.kube.get(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])
        if holder is None:
            return False  # gone again meanwhile: the retry creates it
        self.owned.put(holder)
        self.foreign.put(holder)  # the one whose selection it is in keeps it
        return True

    @staticmethod
    def _result(
        obj: Mapping[str, Any],
        want: rc.Desired | rc.Invalid,
        outcome: rc.Outcome,
        failure: rc.Failure | None,
        written: list[rc.Apply],
    ) -> str:
        log = object_logger(obj)
        if isinstance(want, rc.Invalid):
            log.warning("invalid: %s", want.message)
            return "invalid"
        if outcome.conflict:
            log.warning("%s", outcome.conflict)
            return "conflict"
        if failure is not None:
            log.warning("%s", failure.message)
            return "failed"
        if not written and outcome.status is None:
            return "synced"
        done = ", ".join(f"{a.verb.lower()} {a.body['kind']} {a.body['metadata']['name']}" for a in written)
        log.info("%s", done or "status updated")
        return "updated"

    async def _event(self, obj: Mapping[str, Any], event: rc.Event) -> None:
        # Events are a courtesy (the same facts are in status): a failed one never fails a reconcile.
        try:
            await self.kube.create_event(obj, event.type, event.reason, event.message)
        except KubeError as exc:
            object_logger(obj).info("event %s not recorded: %s", event.reason, exc)

    # -- child events --------------------------------------------------------------------------------
    def _known(self, namespace: str, key: rc.ChildKey) -> dict[str, Any] | None:
        """A child's name as the caches know it: ours (whole), someone else's (a stub), or free."""
        return self.owned.get(key[0], key[1], namespace, key[2]) or self.foreign.get(
            key[0], key[1], namespace, key[2]
        )

    def owned_event(self, type_: str | None, body: dict[str, Any]) -> None:
        """The owned children's listener: one changed, was deleted, or was seen in a listing."""
        if type_ == "DELETED" and not self.owned.selects(body):
            # Not deleted: its label was taken off, so it left this selection (the foreign objects'
            # watch reports it next). Known at once, the reconcile applies it again, never creates it.
            self.foreign.put(body)
        self.child_event(type_, body)

    def foreign_event(self, type_: str | None, body: dict[str, Any]) -> None:
        """The foreign objects' listener: a blocker came or went, a referenced ConfigMap changed."""
        self.child_event(type_, body)
        meta = body["metadata"]
        if body["kind"] == "ConfigMap":
            for owner in sorted(self._referenced.get((meta["namespace"], meta["name"]), ())):
                self.trigger((meta["namespace"], owner))

    def child_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """Reconcile the OptimEnvs that want this child's name, where the change calls for it."""
        namespace = body["metadata"]["namespace"]
        key = rc.child_key(body)
        for name in self.waiting_for(namespace, key):
            owner = (namespace, name)
            if self._due(owner, key, type_, body):
                # Checked again once no reconcile of it runs: the echo of a write in flight is no news.
                self.trigger(owner, functools.partial(self._still_due, owner, key, type_))

    def _due(self, owner: Key, key: rc.ChildKey, type_: str | None, body: Mapping[str, Any] | None) -> bool:
        obj, wanted = self.optimenv(owner), self._wanted.get(owner, {}).get(key)
        if obj is None or wanted is None:
            return False
        if type_ == "DELETED" or body is None:
            return True  # ours: re-create (or not: the job's rules); a blocker: the name is free
        if not rc.owned_by(body, obj):
            return type_ in (None, "ADDED")  # a new blocker: say so
        if not rc.as_applied(body, wanted):
            return True  # drift of a managed field
        return body["kind"] != "ConfigMap" and rc.job_status_changed(obj, body)

    def _still_due(self, owner: Key, key: rc.ChildKey, type_: str | None) -> bool:
        return self._due(owner, key, type_, self._known(owner[0], key))

    def _new_spec(self, key: Key) -> bool:
        """Whether ``key``'s uid or generation is not the one last reconciled."""
        obj = self.optimenv(key)
        seen = self._reconciled.get(key)
        return obj is not None and seen != (obj["metadata"].get("uid"), obj["metadata"].get("generation"))

    def _want(self, owner: Key, wanted: dict[rc.ChildKey, dict[str, Any]]) -> None:
        """Record what ``owner`` wants now (empty: nothing, it is gone)."""
        for key in self._wanted.pop(owner, {}):
            names = self._wanters[(owner[0], key)]
            names.discard(owner[1])
            if not names:
                del self._wanters[(owner[0], key)]
        if wanted:
            self._wanted[owner] = wanted
            for key in wanted:
                self._wanters[(owner[0], key)].add(owner[1])

    def waiting_for(self, namespace: str, key: rc.ChildKey) -> list[str]:
        """The OptimEnvs of ``namespace`` that want a child of this kind and name (as last reconciled)."""
        return sorted(self._wanters.get((namespace, key), ()))

    def trigger(self, key: Key, check: Callable[[], bool] | None = None) -> None:
        """Reconcile ``key`` soon, in its own task: at once, or if ``check()`` still holds once no other
        reconcile of it runs. Triggers that come while one waits join it."""
        if key in self._queued:
            checks = self._queued[key]
            self._queued[key] = None if checks is None or check is None else [*checks, check]
            return
        self._queued[key] = None if check is None else [check]
        task = asyncio.create_task(self._triggered(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _triggered(self, key: Key) -> None:
        async with self._locks[key]:  # after a reconcile in progress
            checks = self._queued.pop(key, None)  # changes from now on need another pass
            if checks is not None and not any(check() for check in checks):
                return
        await self.reconcile_with_retries(key)

    async def reconcile_with_retries(self, key: Key) -> None:
        """Reconcile, retrying what may pass with the server's delay; give up after EVENT_ATTEMPTS."""
        log = object_logger(self.optimenv(key) or {"metadata": {"namespace": key[0], "name": key[1]}})
        for attempt in range(EVENT_ATTEMPTS):
            try:
                await self.reconcile(key)
                return
            except Retryable as exc:
                delay = backoff(attempt, exc.delay)
                log.info("retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
            except ApiFailure as exc:
                # Refused children are status already; this is the status write itself refused.
                log.error("%s", exc)
                return
        log.error("giving up after %d attempts; the next change or resync retries", EVENT_ATTEMPTS)

    # -- the safety net ------------------------------------------------------------------------------
    async def resync(self, idle: float) -> int:
        """List everything again (what a watch missed is reported like a change), then reconcile
        every known OptimEnv not reconciled for ``idle`` seconds; how many were."""
        for cache in self.caches:
            await cache.refresh()
        now = time.monotonic()
        known = [_key(body) for body in self.optimenvs.values()]
        due = sorted(key for key in known if now - self._reconciled_at.get(key, 0.0) >= idle)
        for key in due:
            await self.reconcile_with_retries(key)
        return len(due)

    async def resync_forever(self, interval: float = RESYNC_INTERVAL) -> None:
        """The safety net under the watches: nothing written where nothing changed."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.resync(interval)
            except Exception:  # never let the loop die: the next round tries again
                logger.exception("resync failed")
