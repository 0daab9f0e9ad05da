"""Operator settings, from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

# The variable each setting is read from. A variable unset or empty leaves the setting's default.
_ENV = {
    "trainer_image": "TUNELOOM_TRAINER_IMAGE",
    "trainer_service_account": "TUNELOOM_TRAINER_SERVICE_ACCOUNT",
    "server_image": "TUNELOOM_SERVER_IMAGE",
    "server_bind_address": "TUNELOOM_SERVER_BIND_ADDRESS",
    "max_running_jobs": "TUNELOOM_MAX_RUNNING_JOBS",
    "max_running_jobs_per_namespace": "TUNELOOM_MAX_RUNNING_JOBS_PER_NAMESPACE",
    "reconcile_interval_s": "TUNELOOM_RECONCILE_INTERVAL_SECONDS",
    "handler_threads": "TUNELOOM_OPERATOR_THREADS",
    "server_sync_interval_s": "TUNELOOM_SERVER_SYNC_INTERVAL_SECONDS",
    "adapter_resync_interval_s": "TUNELOOM_ADAPTER_RESYNC_INTERVAL_SECONDS",
    "metrics_port": "TUNELOOM_OPERATOR_METRICS_PORT",
    "health_port": "TUNELOOM_OPERATOR_HEALTH_PORT",
    "bind_address": "TUNELOOM_BIND_ADDRESS",
    "trainer_metrics_port": "TUNELOOM_TRAINER_METRICS_PORT",
}


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = "ghcr.io/tuneloom/trainer:0.1.0"
    trainer_service_account: str = "tuneloom-trainer"
    server_image: str = "ghcr.io/tuneloom/server:0.1.0"
    # Where server pods listen (`tuneloom serve --host`, so "$(VAR)" of the pod's env works). Every
    # interface, so Services, probes and `kubectl port-forward` (which connects to localhost inside
    # the pod) all reach it.
    server_bind_address: str = "0.0.0.0"
    max_running_jobs: int = 0  # 0: no cap
    max_running_jobs_per_namespace: int = 0
    reconcile_interval_s: float = 3.0
    # Threads for kopf's handlers. A reconcile mostly waits on the API server, so a burst of new jobs
    # moves faster with more threads than cores: on 2 cores, 200 jobs at once went from p99 2.0-2.3 s
    # with kopf's default of 6 to 0.5-1.5 s with 16 (bench/operator_scale.py).
    handler_threads: int = 16
    # How often each ModelServer's pods are asked what they have loaded (and sent what they lack).
    server_sync_interval_s: float = 10.0
    # How often each Adapter looks for a newer registry version, and retries a failed check.
    adapter_resync_interval_s: float = 30.0
    metrics_port: int = 8080
    health_port: int = 8081
    # Where the operator's own metrics and health endpoints listen.
    bind_address: str = "0.0.0.0"
    trainer_metrics_port: int = 9400

    @classmethod
    def from_env(cls) -> OperatorConfig:
        values = {}
        for setting in fields(cls):
            text = os.environ.get(_ENV[setting.name])
            if text:
                values[setting.name] = type(setting.default)(text)  # str, int or float, as the default is
        return cls(**values)
