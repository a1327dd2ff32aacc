"""The kopf runtime: which events start a reconcile, and how failures are retried.

Every trigger ends in :meth:`Controller.reconcile`, one level-based, idempotent pass: create,
update and resume of an ``OptimEnv``; a change of the ConfigMap it references; a change or deletion
of a ConfigMap it owns (or whose name it wants), or of a job it owns (for the kinds given with
``--job-kind``), also as re-listed after a watch restart; and a periodic resync of the OptimEnvs that
were not reconciled for a while. Retryable API errors become ``kopf.TemporaryError`` with an
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
from optimenv_controller.kube import ApiFailure, Kube, KubeError, Retryable
from optimenv_controller.metrics import Metrics

logger = logging.getLogger("optimenv.controller")

#: The longest wait between two retries of a reconcile.
MAX_DELAY = 300.0
#: Attempts of a reconcile started by a ConfigMap event (kopf does not retry event handlers).
EVENT_ATTEMPTS = 8
#: Every this many seconds, reconcile the OptimEnvs not reconciled for as long (a watch can miss events).
RESYNC_INTERVAL = 600.0


def backoff(retry: int, hint: float) -> float:
    """Seconds before retry number ``retry`` (0 first): 1, 2, 4 … up to MAX_DELAY, never below ``hint``."""
    return max(hint, min(2.0 ** min(retry, 30), MAX_DELAY))


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    """Reads, decides (pure, in :mod:`reconcile`), writes; one reconcile per object at a time."""

    def __init__(self, kube: Kube, metrics: Metrics | None = None) -> None:
        self.kube = kube
        self.metrics = metrics or Metrics()
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        # Per OptimEnv, what was last wanted of its job children: tells the echo of our own apply (and
        # the job operator's status writes) from a change to undo, without planning on every event.
        self._wanted_jobs: dict[tuple[str, str], dict[rc.ChildKey, dict[str, Any]]] = {}
        # When each known OptimEnv was last reconciled (monotonic clock): what the resync walks.
        self._reconciled_at: dict[tuple[str, str], float] = {}

    async def reconcile(
        self, obj: Mapping[str, Any] | None = None, *, key: tuple[str, str] | None = None
    ) -> None:
        """Bring the children and status of one OptimEnv in line; ``obj`` or ``key`` (then read)."""
        if obj is not None:
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        assert key is not None
        started = time.perf_counter()
        result = "error"
        try:
            async with self._locks[key]:
                if obj is None:
                    obj = await self.kube.get(f"{GROUP}/{VERSION}", "OptimEnv", *key)
                    if obj is None or obj["metadata"].get("deletionTimestamp"):
                        self._wanted_jobs.pop(key, None)
                        self._reconciled_at.pop(key, None)
                        result = "gone"
                        return
                result = await self._reconcile(obj)
                self._reconciled_at[key] = time.monotonic()
        except KubeError as exc:
            self.metrics.errors.labels(reason=str(exc.status) if exc.status else "network").inc()
            raise
        finally:
            self.metrics.reconciles.labels(result=result).inc()
            self.metrics.duration.observe(time.perf_counter() - started)

    async def _reconcile(self, obj: Mapping[str, Any]) -> str:
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        ref = rc.config_map_ref(obj)
        want: rc.Desired | rc.Invalid
        try:
            referenced = await self.kube.get("v1", "ConfigMap", namespace, ref) if ref else None
        except ApiFailure as exc:
            # Not readable (403): as good as missing for planning; say why, like ConfigMapNotFound.
            want = rc.Invalid(rc.failure_reason(exc.status), f"spec.configMapRef: {exc}")
        else:
            want = rc.desired(obj, referenced)
        observed: dict[rc.ChildKey, dict[str, Any] | None] = {}
        failure: rc.Failure | None = None
        if isinstance(want, rc.Desired):
            keys = [rc.child_key(body) for body in want.children]
            found = await asyncio.gather(
                *(self.kube.get(av, kind, namespace, n) for av, kind, n in keys), return_exceptions=True
            )
            refused: set[rc.ChildKey] = set()
            for key, result in zip(keys, found, strict=True):
                if isinstance(result, ApiFailure):
                    failure = failure or rc.Failure(rc.failure_reason(result.status), str(result))
                    refused.add(key)
                elif isinstance(result, BaseException):
                    raise result  # retryable (or unexpected): kopf retries the whole reconcile
                else:
                    observed[key] = result
            self._wanted_jobs[(namespace, name)] = {
                rc.child_key(body): rc.managed_metadata(body)
                for body in want.children
                if body["kind"] != "ConfigMap"
            }
            if refused:  # the others are still brought in line
                children = tuple(c for c in want.children if rc.child_key(c) not in refused)
                want = rc.Desired(children=children, summary=want.summary)
        now = _now()
        outcome = rc.decide(obj, want, observed, now, failure)

        written: list[rc.Apply] = []
        for apply in outcome.applies:
            try:
                if apply.verb == "Created":
                    await self.kube.create(apply.body)
                else:
                    await self.kube.apply(apply.body, force=apply.force)
            except ApiFailure as exc:
                failure = rc.Failure(rc.failure_reason(exc.status), str(exc))
                told = rc.decide(obj, want, observed, now, failure)
                # The status and Warning of the refusal, and the Events of the writes that did happen.
                events = [e for e in told.events if e.reason not in ("Created", "Updated")]
                outcome = rc.Outcome(
                    tuple(written), told.status, (*rc.apply_events(written), *events), told.conflict
                )
                break
            written.append(apply)
        if outcome.status is not None:
            await self.kube.patch_status(namespace, name, outcome.status)
        # Only after the writes they report succeeded: a retried reconcile does not repeat them.
        for event in outcome.events:
            await self._event(obj, event)

        if isinstance(want, rc.Invalid):
            logger.warning("%s/%s: invalid: %s", namespace, name, want.message)
            return "invalid"
        if outcome.conflict:
            logger.warning("%s/%s: %s", namespace, name, outcome.conflict)
            return "conflict"
        if failure is not None:
            logger.warning("%s/%s: %s", namespace, name, failure.message)
            return "failed"
        return "updated" if outcome.applies or outcome.status is not None else "synced"

    async def _event(self, obj: Mapping[str, Any], event: rc.Event) -> None:
        # Events are a courtesy (the same facts are in status): a failed one never fails a reconcile.
        try:
            await self.kube.create_event(obj, event.type, event.reason, event.message)
        except KubeError as exc:
            logger.info("event %s for %s not recorded: %s", event.reason, obj["metadata"]["name"], exc)

    def job_as_applied(self, namespace: str, owner: str, job: Mapping[str, Any]) -> bool:
        """Whether a reconcile of ``owner`` would leave ``job`` as it is (False: not known yet)."""
        wanted = self._wanted_jobs.get((namespace, owner))
        if wanted is None:
            return False  # not reconciled by this process (yet): let a reconcile find out
        want = wanted.get(rc.child_key(job))
        # No longer wanted (spec.job removed or retargeted): kept as is until the owner goes.
        return want is None or rc.in_sync(job, want)

    def waiting_for(self, namespace: str, job: Mapping[str, Any]) -> list[str]:
        """The OptimEnvs of ``namespace`` that want a job of this kind and name (as last reconciled)."""
        key = rc.child_key(job)
        return sorted(
            name for (ns, name), wanted in self._wanted_jobs.items() if ns == namespace and key in wanted
        )

    async def reconcile_with_retries(self, key: tuple[str, str]) -> None:
        """For triggers kopf does not retry (ConfigMap, job events): retry here, with the server's delay."""
        for attempt in range(EVENT_ATTEMPTS):
            try:
                await self.reconcile(key=key)
                return
            except Retryable as exc:
                delay = backoff(attempt, exc.delay)
                logger.info("%s/%s: retrying in %.1fs: %s", *key, delay, exc)
                await asyncio.sleep(delay)
            except ApiFailure as exc:
                logger.error("%s/%s: %s", *key, exc)
                return
        logger.error(
            "%s/%s: giving up after %d attempts; the next change or resync retries", *key, EVENT_ATTEMPTS
        )

    async def resync(self, idle: float) -> int:
        """Reconcile every known OptimEnv not reconciled for ``idle`` seconds; how many were."""
        now = time.monotonic()
        due = sorted(key for key, at in self._reconciled_at.items() if now - at >= idle)
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


def make_settings() -> kopf.OperatorSettings:
    """kopf settings that hold in every mode (production, tests, benchmark)."""
    settings = kopf.OperatorSettings()
    # The CRD's structural schema prunes unknown status fields: keep kopf's state in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # kopf would post an Event per handler log line; the controller posts its own, meaningful ones.
    settings.posting.enabled = False
    settings.peering.standalone = True
    # The CRD is installed by the chart: no need to watch CustomResourceDefinitions (no RBAC for it).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.enforce_retry_after = True
    return settings


def build_registry(
    controller: Controller,
    *,
    login_url: str | None = None,
    job_kinds: Iterable[str] = (),
    resync_interval: float = RESYNC_INTERVAL,
) -> kopf.OperatorRegistry:
    """A kopf registry wired to ``controller``.

    ``login_url``: an unauthenticated API server (tests). ``job_kinds``: keys of
    :data:`reconcile.JOB_RESOURCES` whose owned jobs are watched (their CRDs must exist to be served).
    ``resync_interval``: seconds between resyncs of the OptimEnvs idle that long.
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

    @kopf.on.startup(id="start_resync", registry=registry)
    async def start_resync(**_: Any) -> None:
        resync.append(asyncio.create_task(controller.resync_forever(resync_interval)))

    @kopf.on.cleanup(id="close_client", registry=registry)
    async def close_client(**_: Any) -> None:
        for task in resync:
            task.cancel()
        # Before kopf waits for leftover tasks: open keep-alive connections would hold it up.
        await controller.kube.close()

    @kopf.index(GROUP, VERSION, PLURAL, id="configmaps_of", registry=registry)
    def configmaps_of(
        namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], str]:
        """(namespace, ConfigMap name) → OptimEnv names: the referenced one and the owned ones."""
        names = [*rc.child_configmap_names(name)]
        ref = rc.config_map_ref(body)
        if ref:
            names.append(ref)
        return {(namespace, cm): name for cm in names}

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    async def optimenv_changed(body: kopf.Body, retry: int, **_: Any) -> None:
        try:
            await controller.reconcile(body)
        except Retryable as exc:
            raise kopf.TemporaryError(str(exc), delay=backoff(retry, exc.delay)) from exc
        except ApiFailure as exc:
            # Refused children are status already; this is the status write itself refused (403, 422):
            # nothing to retry until the object changes.
            raise kopf.PermanentError(str(exc)) from exc

    @kopf.on.event("", "v1", "configmaps", id="configmap_event", registry=registry)
    async def configmap_event(
        type: str | None,
        namespace: str | None,
        name: str,
        body: kopf.Body,
        **kwargs: Any,
    ) -> None:
        configmaps_of: kopf.Index[tuple[str, str], str] = kwargs["configmaps_of"]  # kopf injects indexes
        # type None is a listing (start, or a re-list after a watch ended with 410): changes made while
        # the watch was down show only there. The echo check below keeps unchanged children free.
        if namespace is None or (namespace, name) not in configmaps_of:
            return
        if type != "DELETED" and rc.child_intact(body):
            return  # one of ours, exactly as rendered: the echo of our own apply, nothing to undo
        for owner in sorted(set(configmaps_of[(namespace, name)])):
            await controller.reconcile_with_retries((namespace, owner))

    async def job_event(type: str | None, namespace: str | None, body: kopf.Body, **_: Any) -> None:
        owner = rc.controller_owner(body)
        if namespace is None:
            return
        if type == "DELETED":
            # The name is free: the owner re-creates its job, and an OptimEnv held back by a job of
            # that name it does not own (NameConflict) can now create its own, without a resync.
            names = {owner} if owner else set()
            for name in sorted(names | set(controller.waiting_for(namespace, body))):
                await controller.reconcile_with_retries((namespace, name))
            return
        # type None is a listing (start, or a re-list after a 410), handled like a change; a change of
        # a job that no OptimEnv controls is none of our business.
        if owner is None or controller.job_as_applied(namespace, owner, body):
            return  # not ours, the echo of our own apply, or the job operator writing status
        await controller.reconcile_with_retries((namespace, owner))

    for kind in sorted(set(job_kinds)):
        group, version, plural = rc.JOB_RESOURCES[kind]
        kopf.on.event(group, version, plural, id=f"{kind}_event", registry=registry)(job_event)

    return registry
