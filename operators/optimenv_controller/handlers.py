"""The kopf runtime: which events start a reconcile, and how failures are retried.

Every trigger ends in :meth:`Controller.reconcile`, one level-based, idempotent pass:

* an ``OptimEnv`` listed (controller start, a re-list after a watch ended), added, or changed in a
  way that matters (a new ``metadata.generation`` or uid; our own status writes do not);
* an owned child (a ConfigMap, or a job of a kind given with ``--job-kind``) changed, deleted, or
  re-listed, as :class:`~optimenv_controller.cache.ChildCache` reports it: drift of a managed field
  and a new job phase reconcile its owner, the echo of our own write does not;
* a foreign object (one without the controller's label, watched by kopf with a server-side label
  selector) appearing in or leaving a name an ``OptimEnv`` wants, or a change of the ConfigMap an
  ``OptimEnv`` references;
* the periodic resync of the ``OptimEnv`` objects not reconciled for a while.

The ``OptimEnv`` objects and the owned children are read from memory (kopf's events and the cache),
never with a GET; only the referenced ConfigMap, job kinds that are not watched, and a name found
taken by a create are read from the API server. Retryable API errors are retried with an
exponential backoff (at least the server's Retry-After). A refusal that retrying cannot fix (403,
404, 422 of a child) is status (``Ready=False``) and a Warning Event, like an invalid config: it is
not retried until the object or its ConfigMap changes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from optimenv.resource import GROUP, PLURAL, VERSION
from optimenv_controller import reconcile as rc
from optimenv_controller.cache import OWNED, ChildCache, newer, selected
from optimenv_controller.kube import ApiFailure, Kube, KubeError, Retryable
from optimenv_controller.metrics import Metrics

logger = logging.getLogger("optimenv.controller")

#: The longest wait between two retries of a reconcile.
MAX_DELAY = 300.0
#: Attempts of one triggered reconcile before it waits for the next change or resync.
EVENT_ATTEMPTS = 8
#: Every this many seconds, reconcile the OptimEnvs not reconciled for as long (a watch can miss events).
RESYNC_INTERVAL = 600.0
#: kopf's server-side selector for ConfigMaps and jobs: the foreign ones (ours are in the cache).
FOREIGN_SELECTOR = ",".join(f"{k}!={v}" for k, v in OWNED.items())

Key = tuple[str, str]  # (namespace, OptimEnv name)
ForeignKey = tuple[str, str, str, str]  # (namespace, apiVersion, kind, name)


def backoff(retry: int, hint: float) -> float:
    """Seconds before retry number ``retry`` (0 first): 1, 2, 4 … up to MAX_DELAY, never below ``hint``."""
    return max(hint, min(2.0 ** min(retry, 30), MAX_DELAY))


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(body: Mapping[str, Any]) -> Key:
    return (body["metadata"]["namespace"], body["metadata"]["name"])


def _stub(body: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of a foreign object: enough to tell whose it is and to name it."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "labels", "ownerReferences")
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
        self.cache = ChildCache(kube, kinds, tuple(namespaces), listener=self.owned_event)
        # The OptimEnvs as last seen (kopf's events, and our own status writes' answers).
        self.optimenvs: dict[Key, dict[str, Any]] = {}
        # Foreign objects of the watched kinds: only their identity and owner.
        self._foreign: dict[ForeignKey, dict[str, Any]] = {}
        # Per OptimEnv, what its last reconcile wanted of each child (rc.managed_fields), and the
        # other way round: (namespace, child) → the OptimEnvs that want it.
        self._wanted: dict[Key, dict[rc.ChildKey, dict[str, Any]]] = {}
        self._wanters: defaultdict[tuple[str, rc.ChildKey], set[str]] = defaultdict(set)
        # (namespace, ConfigMap) → the OptimEnvs whose spec.configMapRef names it.
        self._referenced: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._reconciled: dict[Key, tuple[Any, Any]] = {}  # (uid, generation) last reconciled
        self._reconciled_at: dict[Key, float] = {}  # monotonic clock: what the resync walks
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._queued: dict[Key, bool] = {}  # triggered, not started yet: whether to recheck first
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what is known of the OptimEnvs -----------------------------------------------------------
    def observe(self, type_: str | None, body: Mapping[str, Any]) -> bool:
        """Remember an OptimEnv event's body; whether it calls for a reconcile."""
        key = _key(body)
        if type_ == "DELETED":
            self.forget(key)
            return False
        if not newer(body, self.optimenvs.get(key)):
            return False  # our own status write's answer was newer
        self._index_reference(key, body)
        self.optimenvs[key] = dict(body)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return False  # being deleted: garbage collection takes the children
        return type_ in (None, "ADDED") or self._reconciled.get(key) != (
            meta.get("uid"),
            meta.get("generation"),
        )

    def forget(self, key: Key) -> None:
        self._index_reference(key, None)
        self.optimenvs.pop(key, None)
        self._want(key, {})
        self._reconciled.pop(key, None)
        self._reconciled_at.pop(key, None)

    def _index_reference(self, key: Key, body: Mapping[str, Any] | None) -> None:
        old = rc.config_map_ref(self.optimenvs.get(key) or {})
        new = rc.config_map_ref(body or {})
        if old != new and old is not None:
            self._referenced[(key[0], old)].discard(key[1])
        if new is not None:
            self._referenced[(key[0], new)].add(key[1])

    # -- reconcile ---------------------------------------------------------------------------------
    async def reconcile(self, key: Key) -> None:
        """Bring the children and status of one OptimEnv in line with its spec."""
        started = time.perf_counter()
        result = "error"
        try:
            async with self._locks[key]:
                obj = self.optimenvs.get(key)
                if obj is None or obj["metadata"].get("deletionTimestamp"):
                    result = "gone"
                    return
                await self.cache.ready()
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
            referenced = (
                await self.kube.get("v1", "ConfigMap", obj["metadata"]["namespace"], ref) if ref else None
            )
        except ApiFailure as exc:
            # Not readable (403): as good as missing for planning; say why, like ConfigMapNotFound.
            return rc.Invalid(rc.failure_reason(exc.status), f"spec.configMapRef: {exc}")
        return rc.desired(obj, referenced)

    async def _observe(
        self, obj: Mapping[str, Any], want: rc.Desired
    ) -> tuple[dict[rc.ChildKey, dict[str, Any] | None], rc.Failure | None]:
        """The children as known: the cache, the foreign objects, or a GET for unwatched kinds."""
        namespace = obj["metadata"]["namespace"]
        observed: dict[rc.ChildKey, dict[str, Any] | None] = {}
        unknown: list[rc.ChildKey] = []
        for key in (rc.child_key(body) for body in want.children):
            if self.cache.serves(key[0], key[1], namespace):
                observed[key] = self.cache.get(key[0], key[1], namespace, key[2]) or self._foreign.get(
                    (namespace, *key)
                )
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
            stored = await self.kube.patch_status(namespace, name, outcome.status)
            if newer(stored, self.optimenvs.get((namespace, name))):
                self.optimenvs[(namespace, name)] = stored
        # Only after the writes they report succeeded: a retried reconcile does not repeat them.
        said = [e for e in outcome.events if e.reason not in ("Created", "Updated")]
        for event in (*rc.apply_events(written), *said):
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
            self.cache.put(stored)
            written.append(apply)
        return written, failure

    async def _holder(self, body: Mapping[str, Any]) -> bool:
        """A create was refused with 409: read the object holding the name; whether it is there."""
        meta = body["metadata"]
        holder = await self.kube.get(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])
        if holder is None:
            return False  # gone again meanwhile: the retry creates it
        if selected(holder):
            self.cache.put(holder)
        else:
            self._foreign[(meta["namespace"], *rc.child_key(holder))] = _stub(holder)
        return True

    @staticmethod
    def _result(
        obj: Mapping[str, Any],
        want: rc.Desired | rc.Invalid,
        outcome: rc.Outcome,
        failure: rc.Failure | None,
        written: list[rc.Apply],
    ) -> str:
        name = "{namespace}/{name}".format(**obj["metadata"])
        if isinstance(want, rc.Invalid):
            logger.warning("%s: invalid: %s", name, want.message)
            return "invalid"
        if outcome.conflict:
            logger.warning("%s: %s", name, outcome.conflict)
            return "conflict"
        if failure is not None:
            logger.warning("%s: %s", name, failure.message)
            return "failed"
        return "updated" if written or outcome.status is not None else "synced"

    async def _event(self, obj: Mapping[str, Any], event: rc.Event) -> None:
        # Events are a courtesy (the same facts are in status): a failed one never fails a reconcile.
        try:
            await self.kube.create_event(obj, event.type, event.reason, event.message)
        except KubeError as exc:
            logger.info("event %s for %s not recorded: %s", event.reason, obj["metadata"]["name"], exc)

    # -- child events --------------------------------------------------------------------------------
    def note_foreign(self, body: Mapping[str, Any]) -> None:
        """Remember a ConfigMap or job without the controller's label (kopf's index, before handlers)."""
        self._foreign[(body["metadata"]["namespace"], *rc.child_key(body))] = _stub(body)

    def foreign_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """A ConfigMap or job without the controller's label changed (kopf's watch)."""
        meta = body["metadata"]
        if type_ == "DELETED":
            self._foreign.pop((meta["namespace"], *rc.child_key(body)), None)
        else:
            self.note_foreign(body)
        self.child_event(type_, body)
        if body["kind"] == "ConfigMap":
            for owner in sorted(self._referenced.get((meta["namespace"], meta["name"]), ())):
                self.trigger((meta["namespace"], owner))

    def owned_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """The cache's listener: a labelled child changed, was deleted, or was seen in a listing."""
        if type_ == "DELETED" and not selected(body):
            # Not deleted: its label was taken off, so it left the cache's selection (kopf's watch
            # reports it next). Known at once, the reconcile applies it again instead of creating it.
            self.note_foreign(body)
        self.child_event(type_, body)

    def child_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        """Reconcile the OptimEnvs that want this child's name, where the change calls for it."""
        namespace = body["metadata"]["namespace"]
        key = rc.child_key(body)
        for name in self.waiting_for(namespace, key):
            if self._due((namespace, name), key, type_, body):
                # Checked again once no reconcile of it runs: the echo of a write in flight is no news.
                self.trigger((namespace, name), recheck=True)

    def _due(self, owner: Key, key: rc.ChildKey, type_: str | None, body: Mapping[str, Any] | None) -> bool:
        obj, wanted = self.optimenvs.get(owner), self._wanted.get(owner, {}).get(key)
        if obj is None or wanted is None:
            return False
        if type_ == "DELETED" or body is None:
            return True  # ours: re-create (or not: the job's rules); a blocker: the name is free
        if not rc.owned_by(body, obj):
            return type_ in (None, "ADDED")  # a new blocker: say so
        if not rc.as_applied(body, wanted):
            return True  # drift of a managed field
        return body["kind"] != "ConfigMap" and rc.job_status_changed(obj, body)

    def _still_due(self, owner: Key) -> bool:
        """Whether a child of ``owner`` differs from what its last reconcile left, as known now."""
        namespace = owner[0]
        for key in self._wanted.get(owner, {}):
            if not self.cache.serves(key[0], key[1], namespace):
                continue
            body = self.cache.get(key[0], key[1], namespace, key[2]) or self._foreign.get((namespace, *key))
            if self._due(owner, key, "MODIFIED", body):
                return True
        return False

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

    def trigger(self, key: Key, *, recheck: bool = False) -> None:
        """Reconcile ``key`` soon, in its own task; ``recheck``: only if :meth:`_still_due` then."""
        if key in self._queued:
            self._queued[key] = self._queued[key] and recheck
            return
        self._queued[key] = recheck
        task = asyncio.create_task(self._triggered(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _triggered(self, key: Key) -> None:
        async with self._locks[key]:  # after a reconcile in progress
            recheck = self._queued.pop(key, False)  # changes from now on need another pass
            if recheck and not self._still_due(key):
                return
        await self.reconcile_with_retries(key)

    async def reconcile_with_retries(self, key: Key) -> None:
        """Reconcile, retrying what may pass with the server's delay; give up after EVENT_ATTEMPTS."""
        for attempt in range(EVENT_ATTEMPTS):
            try:
                await self.reconcile(key)
                return
            except Retryable as exc:
                delay = backoff(attempt, exc.delay)
                logger.info("%s/%s: retrying in %.1fs: %s", *key, delay, exc)
                await asyncio.sleep(delay)
            except ApiFailure as exc:
                # Refused children are status already; this is the status write itself refused.
                logger.error("%s/%s: %s", *key, exc)
                return
        logger.error(
            "%s/%s: giving up after %d attempts; the next change or resync retries", *key, EVENT_ATTEMPTS
        )

    # -- the safety net ------------------------------------------------------------------------------
    async def resync(self, idle: float) -> int:
        """List the children again (what a watch missed is reported like a change), then reconcile
        every known OptimEnv not reconciled for ``idle`` seconds; how many were."""
        await self.cache.refresh()
        now = time.monotonic()
        due = sorted(key for key in self.optimenvs if now - self._reconciled_at.get(key, 0.0) >= idle)
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

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cache.stop()


def make_settings() -> kopf.OperatorSettings:
    """kopf settings that hold in every mode (production, tests, benchmark)."""
    settings = kopf.OperatorSettings()
    # Only event handlers: kopf keeps no progress or diff-base on the objects (no extra writes).
    # kopf would post an Event per handler log line; the controller posts its own, meaningful ones.
    settings.posting.enabled = False
    settings.peering.standalone = True
    # The CRD is installed by the chart: no need to watch CustomResourceDefinitions (no RBAC for it).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.enforce_retry_after = True
    # ConfigMaps and jobs carrying our label are the cache's; kopf watches the others.
    settings.watching.label_selectors["", "v1", "configmaps"] = FOREIGN_SELECTOR
    for group, version, plural in rc.JOB_RESOURCES.values():
        settings.watching.label_selectors[group, version, plural] = FOREIGN_SELECTOR
    return settings


def build_registry(
    controller: Controller,
    *,
    login_url: str | None = None,
    resync_interval: float = RESYNC_INTERVAL,
) -> kopf.OperatorRegistry:
    """A kopf registry wired to ``controller`` (whose job kinds are watched too).

    ``login_url``: an unauthenticated API server (tests). ``resync_interval``: seconds between
    resyncs of the OptimEnvs idle that long.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if login_url is not None:
            return kopf.ConnectionInfo(server=login_url, insecure=True)
        # The same sources, in the same order, as lightkube's KubeConfig.from_env() in kube.py.
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        return info if isinstance(info, kopf.ConnectionInfo) else None

    # Not a kopf.timer: kopf puts a finalizer on every object with a timer, and then an OptimEnv could
    # not be deleted while the controller is not running.
    resync: list[asyncio.Task[None]] = []

    @kopf.on.startup(id="start", registry=registry)
    async def start(**_: Any) -> None:
        controller.cache.start()
        resync.append(asyncio.create_task(controller.resync_forever(resync_interval)))

    @kopf.on.cleanup(id="stop", registry=registry)
    async def stop(**_: Any) -> None:
        for task in resync:
            task.cancel()
        await controller.stop()
        # Before kopf waits for leftover tasks: open keep-alive connections would hold it up.
        await controller.kube.close()

    @kopf.on.event(GROUP, VERSION, PLURAL, id="optimenv", registry=registry)
    async def optimenv_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        # type None is a listing (start, or a re-list after a watch ended with 410): reconciled, so a
        # change made while the controller was away is found; our own status writes are skipped.
        if controller.observe(type, body):
            await controller.reconcile_with_retries(_key(body))

    def foreign_index(body: kopf.Body, **_: Any) -> None:
        # An index makes kopf list these before any handler runs: blockers are known from the start.
        controller.note_foreign(body)

    async def foreign_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.foreign_event(type, body)

    resources = [("", "v1", "configmaps")] + [rc.JOB_RESOURCES[k] for k in controller.job_kinds]
    for group, version, plural in resources:
        kopf.index(group, version, plural, id=f"{plural}_known", registry=registry)(foreign_index)
        kopf.on.event(group, version, plural, id=f"{plural}_event", registry=registry)(foreign_event)
    return registry
