"""Prometheus metrics of the reconciler, and JSON logs.

The counters live in their own registry so several controllers (tests, the benchmark) can run in
one process; ``serve`` exposes it on ``/metrics``. Liveness and readiness are kopf's probe endpoint
(``/healthz``), started by ``optimenv controller --health-port``.
"""

from __future__ import annotations

import logging

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """reconciles_total{result}, reconcile_errors_total{reason}, reconcile_duration_seconds,
    cached_objects{cache}."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "optimenv_reconciles",
            "Reconciles of OptimEnv objects, by result "
            "(synced, updated, invalid, conflict, failed, gone, error).",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "optimenv_reconcile_errors",
            "Failed API calls during reconciles, by reason (HTTP status or timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "optimenv_reconcile_duration_seconds",
            "Wall time of one reconcile, API calls included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

        self.cached = Gauge(
            "optimenv_cached_objects",
            "Objects the controller keeps from its watches, by cache (optimenvs, owned, foreign).",
            ["cache"],
            registry=self.registry,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)


def configure_logging(*, verbose: bool = False) -> None:
    """One JSON object per line on stderr, with the object's namespace/name under ``k8s-obj``."""
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON, log_refkey="k8s-obj")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
