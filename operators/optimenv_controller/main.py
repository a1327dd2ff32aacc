"""``optimenv controller``: run the OptimEnv reconciler (kopf) against the cluster.

Credentials: the pod's service account when in a cluster, else ``KUBECONFIG`` (or ~/.kube/config);
kopf and lightkube both read them the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click
import kopf

from optimenv_controller.controller import Controller
from optimenv_controller.handlers import build_registry, make_settings
from optimenv_controller.kube import Kube, KubeError
from optimenv_controller.metrics import Metrics, configure_logging
from optimenv_controller.reconcile import JOB_RESOURCES


async def run(
    *,
    namespaces: tuple[str, ...],
    job_kinds: tuple[str, ...] = (),
    metrics_port: int | None,
    health_port: int | None,
    verbose: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM."""
    metrics = Metrics()
    if metrics_port:
        metrics.serve(metrics_port)
    try:
        kube = Kube.from_environment()
    except KubeError as exc:
        raise click.ClickException(str(exc)) from None
    controller = Controller(kube, metrics, job_kinds=job_kinds, namespaces=namespaces)
    registry = build_registry(controller)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await kopf.operator(
            registry=registry,
            settings=make_settings(),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
            stop_flag=stop,
        )
    except Exception as exc:  # kopf gives up only on fatal errors (no credentials, no API server)
        raise click.ClickException(f"controller stopped: {type(exc).__name__}: {exc}") from exc
    finally:
        await kube.close()


@click.command(name="controller")
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch only this namespace (repeatable). Default: all namespaces.",
)
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch all namespaces (the default).")
@click.option(
    "--job-kind",
    "job_kinds",
    multiple=True,
    type=click.Choice(sorted(JOB_RESOURCES)),
    help="Also watch jobs of this kind (repeatable): owned ones are cached (no GETs), drift is "
    "repaired and the job's phase reported at once. Its CRD must be installed. Default: none (jobs "
    "are read with a GET on each reconcile; their phase is updated on the next OptimEnv change).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9090,
    show_default=True,
    help="/metrics port; 0 = off.",
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Liveness/readiness port (/healthz); 0 = off.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
def controller_command(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    job_kinds: tuple[str, ...],
    metrics_port: int,
    health_port: int,
    verbose: bool,
) -> None:
    """Run the OptimEnv controller (in-cluster config or KUBECONFIG); JSON logs on stderr."""
    if namespaces and all_namespaces:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    configure_logging(verbose=verbose)
    asyncio.run(
        run(
            namespaces=namespaces,
            job_kinds=job_kinds,
            metrics_port=metrics_port or None,
            health_port=health_port or None,
            verbose=verbose,
        )
    )
