"""The operator under a burst: N FineTuneJobs applied at once on the local cluster.

Measures, for each FineTuneJob, the time from the client's create call to the moment a watch on
Jobs sees its training Job, and the operator process's peak RSS. The baseline, in the same run,
on the same API server: the same Jobs (built by the operator's own Job builder) created directly
by this script, timed the same way. The ratio of the two says what the operator adds on top of
the API server itself, which is what stays comparable across machines.

    .venv/bin/python bench/operator_scale.py [--jobs 200] [--json-out FILE]

Builds the local cluster's binaries first if the cache lacks them (minutes, once). No pod
runs: Jobs are counted as soon as they exist, so no trainer, image or object store is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch

from tuneloom.api import API_GROUP, API_VERSION
from tuneloom.jobfile import parse_job
from tuneloom.net import free_port
from tuneloom.operator import jobbuilder
from tuneloom.operator.config import OperatorConfig
from tuneloom_dev.cluster import LocalCluster
from tuneloom_dev.kubebuild import ensure_kube_binaries

ROOT = Path(__file__).resolve().parent.parent
TARGET_P99_S = 2.0
TARGET_RSS_BYTES = 200 * 1024 * 1024
LABEL = "tuneloom.dev/finetunejob"


def finetunejob(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": "s3://models/smollm2",
            "dataset": {"train": "s3://data/train.jsonl"},
            "resources": {"gpus": 1},
            "output": {"adapterName": name, "uri": "s3://adapters"},
        },
    }


def direct_job(name: str, config: OperatorConfig) -> dict[str, Any]:
    """The Job the operator builds for `name`, without the owner reference (no FineTuneJob exists)."""
    body = jobbuilder.build_job(parse_job(finetunejob(name, "baseline")), config)
    del body["metadata"]["ownerReferences"]
    return body


class JobWatch:
    """Records when each Job of a namespace first appears, keyed by its FineTuneJob label."""

    def __init__(self, batch: k8s.BatchV1Api, namespace: str):
        self.seen: dict[str, float] = {}
        self._batch, self._namespace = batch, namespace
        self._watch = watch.Watch()
        self._stopped = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> JobWatch:
        self._thread.start()
        self._ready.wait(30)
        return self

    def _run(self) -> None:
        version = self._batch.list_namespaced_job(self._namespace).metadata.resource_version
        self._ready.set()
        stream = self._watch.stream(
            self._batch.list_namespaced_job, self._namespace, resource_version=version, timeout_seconds=3600
        )
        try:
            for event in stream:
                if event["type"] == "ADDED":
                    self.seen.setdefault(event["object"].metadata.labels[LABEL], time.monotonic())
        except Exception:
            if not self._stopped:  # once stopped, the cluster going away ends the stream
                raise

    def wait_for(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(name in self.seen for name in names):
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in self.seen]
                raise SystemExit(f"{len(missing)} Job(s) not created within {timeout:.0f} s, e.g. {missing[:3]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def latencies(applied: dict[str, float], seen: dict[str, float]) -> dict[str, float]:
    values = sorted(seen[name] - started for name, started in applied.items())
    quantiles = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_s": round(statistics.median(values), 4),
        "p99_s": round(quantiles[98], 4),
        "max_s": round(values[-1], 4),
    }


def create_all(names: list[str], create) -> dict[str, float]:
    """Calls create(name) for every name, as fast as one client goes; returns each call's start."""
    applied: dict[str, float] = {}
    for name in names:
        applied[name] = time.monotonic()
        create(name)
    return applied


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_operator(kubeconfig: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    metrics_port, health_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "TUNELOOM_BIND_ADDRESS": "127.0.0.1",
        "TUNELOOM_OPERATOR_METRICS_PORT": str(metrics_port),
        "TUNELOOM_OPERATOR_HEALTH_PORT": str(health_port),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-I", "-m", "tuneloom.cli", "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    # Ready as the chart's readiness probe sees it: /healthz answers once start-up is done.
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=1)
            return process, metrics_port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the operator did not start; see {log_path}") from None
            time.sleep(0.2)


def reconcile_histogram(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"tuneloom_operator_reconcile_duration_seconds{suffix} "):
                values[suffix.strip("_")] = float(line.split()[1])
    return values


def install_crds(kubeconfig: Path) -> None:
    subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", str(ROOT / "crds")], check=True)
    subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "wait", "--for=condition=Established", "crd", "--all"],
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for all Jobs of one round")
    parser.add_argument("--steady-seconds", type=float, default=10, help="CPU sampling once all Jobs exist")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    ensure_kube_binaries()
    with tempfile.TemporaryDirectory(prefix="tuneloom-bench-") as work, LocalCluster(Path(work) / "kube") as cluster:
        install_crds(cluster.kubeconfig)
        api = k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig))
        core, batch, custom = k8s.CoreV1Api(api), k8s.BatchV1Api(api), k8s.CustomObjectsApi(api)
        for namespace in ("baseline", "operator"):
            core.create_namespace({"metadata": {"name": namespace}})
        config = OperatorConfig()

        # Baseline: the API server alone, with the very Jobs the operator would build.
        baseline_watch = JobWatch(batch, "baseline").start()
        names = [f"ftj-{i:03d}" for i in range(args.jobs)]
        jobs = {name: direct_job(name, config) for name in names}
        baseline_applied = create_all(names, lambda name: batch.create_namespaced_job("baseline", jobs[name]))
        baseline_watch.wait_for(names, args.timeout)
        baseline_watch.stop()

        operator, metrics_port = start_operator(cluster.kubeconfig, Path(work) / "operator.log")
        try:
            operator_watch = JobWatch(batch, "operator").start()
            idle_rss = peak_rss_bytes(operator.pid)
            cpu_at_start = cpu_seconds(operator.pid)
            operator_applied = create_all(
                names,
                lambda name: custom.create_namespaced_custom_object(
                    API_GROUP, API_VERSION, "operator", "finetunejobs", finetunejob(name, "operator")
                ),
            )
            operator_watch.wait_for(names, args.timeout)
            burst_s = max(operator_watch.seen.values()) - min(operator_applied.values())
            burst_cpu = (cpu_seconds(operator.pid) - cpu_at_start) / burst_s
            operator_watch.stop()
            # Every unfinished job is reconciled again each resync pass: what N waiting jobs cost.
            cpu_before = cpu_seconds(operator.pid)
            time.sleep(args.steady_seconds)
            steady_cpu = (cpu_seconds(operator.pid) - cpu_before) / args.steady_seconds
            rss = peak_rss_bytes(operator.pid)
            reconciles = reconcile_histogram(metrics_port)
        finally:
            operator.terminate()
            operator.wait(30)
            api.close()

    through_operator = latencies(operator_applied, operator_watch.seen)
    direct = latencies(baseline_applied, baseline_watch.seen)
    result = {
        "benchmark": "operator_scale",
        "jobs": args.jobs,
        "operator": {**through_operator, "all_jobs_created_s": round(burst_s, 3)},
        "apply_burst_s": round(max(operator_applied.values()) - min(operator_applied.values()), 3),
        "baseline_direct_job_create": direct,
        "ratio_p50": round(through_operator["p50_s"] / direct["p50_s"], 2),
        "ratio_p99": round(through_operator["p99_s"] / direct["p99_s"], 2),
        "operator_peak_rss_bytes": rss,
        "operator_rss_before_burst_bytes": idle_rss,
        "operator_cpu_cores_during_burst": round(burst_cpu, 3),
        "operator_cpu_cores_with_all_jobs_waiting": round(steady_cpu, 3),
        "reconciles": int(reconciles.get("count", 0)),
        "reconcile_mean_s": round(reconciles["sum"] / reconciles["count"], 4) if reconciles.get("count") else None,
        "targets": {"p99_s": TARGET_P99_S, "peak_rss_bytes": TARGET_RSS_BYTES},
        "meets_targets": through_operator["p99_s"] <= TARGET_P99_S and rss <= TARGET_RSS_BYTES,
        "host_load_average_1m": os.getloadavg()[0],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
