"""Prometheus helpers shared by the operator, the trainer and the serving plugin."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("tuneloom.metrics")

JsonRoute = Callable[[], Any]


def serve_metrics(
    registry: CollectorRegistry,
    port: int,
    host: str = "0.0.0.0",
    json_routes: Mapping[str, JsonRoute] | None = None,
) -> ThreadingHTTPServer:
    """Serves `registry` at /metrics, and each of `json_routes` as JSON, from a daemon thread."""
    routes = dict(json_routes or {})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path in routes:
                self._send(200, "application/json", json.dumps(routes[path](), default=str).encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
