"""Prometheus helpers shared by the operator, the trainer and the serving plugin."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("tuneloom.metrics")


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
    """Exposes `registry` on http://host:port/metrics from a daemon thread."""
    start_http_server(port, addr=host, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
