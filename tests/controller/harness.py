"""Run the real kopf operator (with the controller's handlers) as a task against an API server URL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import kopf

from optimenv_controller.controller import Controller
from optimenv_controller.handlers import build_registry, make_settings
from optimenv_controller.kube import Kube


@dataclass
class Running:
    controller: Controller
    task: asyncio.Task[None]


def fast_settings() -> kopf.OperatorSettings:
    """The production settings with test-sized timeouts (each test stays in seconds)."""
    settings = make_settings()
    settings.networking.error_backoffs = [0.1, 0.2, 0.3]
    settings.networking.request_timeout = 5
    settings.queueing.exit_timeout = 0.5
    return settings


@contextlib.asynccontextmanager
async def running_operator(
    url: str,
    *,
    kube_timeout: float = 30.0,
    tune: Callable[[kopf.OperatorSettings], None] | None = None,
    job_kinds: tuple[str, ...] = (),
    namespaces: tuple[str, ...] = (),
) -> AsyncIterator[Running]:
    kube = Kube.for_server(url, timeout=kube_timeout)
    controller = Controller(kube, job_kinds=job_kinds, namespaces=namespaces)
    registry = build_registry(controller, login_url=url)
    settings = fast_settings()
    if tune is not None:
        tune(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(registry=registry, settings=settings, standalone=True, clusterwide=True, stop_flag=stop)
    )
    try:
        yield Running(controller, task)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        finally:
            await kube.close()
