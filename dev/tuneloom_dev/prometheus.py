"""Debian's Prometheus on loopback, for tests and for rendering the dashboards."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tuneloom.net import LOCALHOST, answers_ok, free_port


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """Starts `prometheus` with the given scrape configs and rule files; queries its HTTP API."""

    def __init__(
        self,
        work_dir: Path,
        scrape_configs: list[dict[str, Any]],
        rule_files: list[Path] = (),
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
    ):
        self.work_dir = Path(work_dir)
        self.port = free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "scrape_configs": scrape_configs,
            "rule_files": [str(Path(f).absolute()) for f in rule_files],
        }
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def attach(cls, url: str) -> Prometheus:
        """A client for a Prometheus already running at `url` (start/stop do nothing to it)."""
        client = cls.__new__(cls)
        client.url, client.process, client.work_dir = url.rstrip("/"), None, Path(".")
        return client

    def start(self, timeout: float = 30) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("prometheus is not installed: apt-get install prometheus (Debian's package)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config))
        log = (self.work_dir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address={LOCALHOST}:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        return answers_ok(f"{self.url}/-/ready")

    def log_tail(self, lines: int = 30) -> str:
        path = self.work_dir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as error:
            payload = json.load(error)
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def firing_alerts(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- the chart's pod discovery, on a Prometheus built without Kubernetes support -----------------
# Debian builds Prometheus without kubernetes_sd. `PodTargets` lists the pods itself and writes
# what kubernetes_sd would report (its __meta_kubernetes_pod_* labels) to a file_sd file, so the
# chart's relabelling rules run unchanged.


def _meta_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def pod_target(pod: Any) -> dict[str, Any]:
    """kubernetes_sd's view of one pod (role: pod), from a kubernetes-client V1Pod."""
    meta, status = pod.metadata, pod.status
    labels = {
        "__meta_kubernetes_namespace": meta.namespace,
        "__meta_kubernetes_pod_name": meta.name,
        "__meta_kubernetes_pod_phase": status.phase or "",
        "__meta_kubernetes_pod_ip": status.pod_ip or "",
        "__meta_kubernetes_pod_node_name": pod.spec.node_name or "",
    }
    for key, value in (meta.labels or {}).items():
        labels[f"__meta_kubernetes_pod_label_{_meta_name(key)}"] = value
    for key, value in (meta.annotations or {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{_meta_name(key)}"] = value
    return {"targets": [f"{status.pod_ip or '0.0.0.0'}:80"], "labels": labels}


def loopback_scrape_configs(chart_scrape_file: Path, targets_file: Path, interval: str = "1s") -> list[dict[str, Any]]:
    """The chart's scrape jobs with kubernetes_sd swapped for the file PodTargets writes."""
    jobs = yaml.safe_load(Path(chart_scrape_file).read_text())["scrape_configs"]
    for job in jobs:
        job.pop("kubernetes_sd_configs", None)
        job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": interval}]
        job["scrape_interval"] = interval
    return jobs


class PodTargets:
    """Rewrites `path` every `interval_s` with every pod of the cluster, as file_sd targets."""

    def __init__(self, core_api: Any, path: Path, interval_s: float = 1.0):
        self.core_api, self.path, self.interval_s = core_api, Path(path), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-targets", daemon=True)

    def write_once(self) -> None:
        targets = [pod_target(pod) for pod in self.core_api.list_pod_for_all_namespaces().items]
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps(targets))
        temp.replace(self.path)  # Prometheus must never read half a file

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write_once()
            except Exception:  # the API server restarting must not end discovery for the whole test
                time.sleep(self.interval_s)

    def __enter__(self) -> PodTargets:
        self.write_once()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
