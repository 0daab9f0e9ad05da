"""tuneloom_api_* Prometheus series: requests by route and code, durations, jobs by status, upload bytes."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ROUTE_CODE = ("route", "code")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)  # seconds: uploads and proxied streams
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused")


class _JobsByStatus(Collector):
    """Read from the database at each scrape, so the gauge is right after a restart too."""

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self):
        family = GaugeMetricFamily("tuneloom_api_jobs", "Fine-tuning jobs by status.", labels=["status"])
        counts = self.counts()
        for status in JOB_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


class ApiMetrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tuneloom_api_requests", "Requests by route and code.", ROUTE_CODE, registry=registry)
        duration = "tuneloom_api_request_duration_seconds"
        self.duration = Histogram(duration, "Time to the first byte.", ["route"], buckets=BUCKETS, registry=registry)
        self.upload_bytes = Counter("tuneloom_api_upload_bytes", "Bytes of uploaded files.", registry=registry)
        registry.register(_JobsByStatus(job_counts))
