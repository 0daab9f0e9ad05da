"""tuneloom_operator_* metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneloom.api import Phase


class _PhaseCollector(Collector):
    """Jobs by phase, computed at scrape time from the operator's last view of each job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[str, Phase] = {}

    def set(self, key: str, phase: Phase | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tuneloom_operator_jobs", "FineTuneJobs by phase.", labels=["phase"])
        with self._lock:
            counts = {phase: 0 for phase in Phase}
            for phase in self._phases.values():
                counts[phase] += 1
        for phase, count in counts.items():
            family.add_metric([phase.value], count)
        yield family


class _ServerCollector(Collector):
    """Replicas asked for and ready, per ModelServer, as of the operator's last pass over each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, str], tuple[int, int]] = {}

    def set(self, namespace: str, name: str, replicas: int | None, ready: int | None) -> None:
        """Records one ModelServer; None for both forgets it (deleted)."""
        with self._lock:
            if replicas is None or ready is None:
                self._servers.pop((namespace, name), None)
            else:
                self._servers[(namespace, name)] = (replicas, ready)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["namespace", "modelserver"]
        replicas = GaugeMetricFamily(
            "tuneloom_operator_modelserver_replicas", "Server pods a ModelServer asks for.", labels=labels
        )
        ready = GaugeMetricFamily(
            "tuneloom_operator_modelserver_ready_replicas", "Ready server pods of a ModelServer.", labels=labels
        )
        with self._lock:
            servers = dict(self._servers)
        for (namespace, name), (wanted, ready_count) in sorted(servers.items()):
            replicas.add_metric([namespace, name], wanted)
            ready.add_metric([namespace, name], ready_count)
        yield replicas
        yield ready


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.phases = _PhaseCollector()
        self.registry.register(self.phases)
        self.servers = _ServerCollector()
        self.registry.register(self.servers)
        self.transitions = Counter(
            "tuneloom_operator_phase_transitions",
            "FineTuneJob phase changes.",
            ["from_phase", "to_phase"],
            registry=self.registry,
        )
        self.not_promoted = Counter(
            "tuneloom_operator_adapters_not_promoted",
            "FineTuneJobs that succeeded with an adapter that failed its promotion gate.",
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "tuneloom_operator_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "tuneloom_operator_reconcile_errors", "Reconciles that raised an error.", registry=self.registry
        )
