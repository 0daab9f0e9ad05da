"""Operator settings, from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


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
        return cls(
            trainer_image=os.environ.get("TUNELOOM_TRAINER_IMAGE", cls.trainer_image),
            trainer_service_account=os.environ.get("TUNELOOM_TRAINER_SERVICE_ACCOUNT", cls.trainer_service_account),
            server_image=os.environ.get("TUNELOOM_SERVER_IMAGE", cls.server_image),
            server_bind_address=os.environ.get("TUNELOOM_SERVER_BIND_ADDRESS", cls.server_bind_address),
            max_running_jobs=_int("TUNELOOM_MAX_RUNNING_JOBS", 0),
            max_running_jobs_per_namespace=_int("TUNELOOM_MAX_RUNNING_JOBS_PER_NAMESPACE", 0),
            reconcile_interval_s=_float("TUNELOOM_RECONCILE_INTERVAL_SECONDS", cls.reconcile_interval_s),
            handler_threads=_int("TUNELOOM_OPERATOR_THREADS", cls.handler_threads),
            server_sync_interval_s=_float("TUNELOOM_SERVER_SYNC_INTERVAL_SECONDS", cls.server_sync_interval_s),
            adapter_resync_interval_s=_float("TUNELOOM_ADAPTER_RESYNC_INTERVAL_SECONDS", cls.adapter_resync_interval_s),
            metrics_port=_int("TUNELOOM_OPERATOR_METRICS_PORT", 8080),
            health_port=_int("TUNELOOM_OPERATOR_HEALTH_PORT", 8081),
            bind_address=os.environ.get("TUNELOOM_BIND_ADDRESS") or cls.bind_address,
            trainer_metrics_port=_int("TUNELOOM_TRAINER_METRICS_PORT", 9400),
        )
