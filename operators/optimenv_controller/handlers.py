"""The kopf runtime around the controller: credentials, start and stop, settings.

kopf runs the operator: it logs in (service account or kubeconfig), starts the controller's watch
caches and its resync loop at startup, stops them at cleanup, and serves the liveness endpoint. The
controller's own list-and-watch loops (:mod:`optimenv_controller.cache`) feed every reconcile: kopf's
per-event handling cost about as much again as the reconcile itself in the 1,000-object benchmark
(docs/performance.md), and a label-selected cache needs watches of its own anyway.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from optimenv_controller.controller import RESYNC_INTERVAL, Controller


def make_settings() -> kopf.OperatorSettings:
    """kopf settings that hold in every mode (production, tests, benchmark)."""
    settings = kopf.OperatorSettings()
    # kopf would post an Event per handler log line; the controller posts its own, meaningful ones.
    settings.posting.enabled = False
    settings.peering.standalone = True
    # The CRD is installed by the chart: no need to watch CustomResourceDefinitions (no RBAC for it).
    settings.scanning.disabled = True
    settings.networking.enforce_retry_after = True
    return settings


def build_registry(
    controller: Controller,
    *,
    login_url: str | None = None,
    resync_interval: float = RESYNC_INTERVAL,
) -> kopf.OperatorRegistry:
    """A kopf registry that runs ``controller``.

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
        controller.start()
        resync.append(asyncio.create_task(controller.resync_forever(resync_interval)))

    @kopf.on.cleanup(id="stop", registry=registry)
    async def stop(**_: Any) -> None:
        for task in resync:
            task.cancel()
        await controller.stop()
        # Before kopf waits for leftover tasks: open keep-alive connections would hold it up.
        await controller.kube.close()

    return registry
