"""`tuneloom api` against the components it wraps, in one run; prints JSON.

- first step: from `jobs.create` to the trainer's first logged step, against the trainer started
  directly on the same job (difference and ratio);
- upload: a large valid JSONL file through `files.create` (as it arrives: written to a temporary
  file, sent to SeaweedFS in parts and checked in spans; committed once checked) against a direct
  boto3 upload of the same file (throughput ratio), with the CPU seconds each side costs the host
  (on a host without free cores the ratio is bound by those);
- the API's peak RSS during that upload, sampled from /proc, against its RSS before it.

    python bench/api.py [--upload-mb 200]    # 1024 for the 1 GB figure; not on a shared 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from tuneloom.models import prepare_model
from tuneloom.net import LOCALHOST, free_port
from tuneloom.openai_api import jobs as mapping
from tuneloom.openai_api.runner import BIND_ADDRESS_ENV, METRICS_PORT_ENV
from tuneloom_dev.apiprocess import ApiProcess
from tuneloom_dev.seaweedfs import SeaweedFS
from tuneloom_dev.tinymodel import derive_tiny_model

KEY = "bench-key-not-a-secret"
EXAMPLES = 40
MB = 1_000_000


def write_dataset(path: Path, count: int) -> Path:
    with path.open("w") as stream:
        for i in range(count):
            messages = [
                {"role": "user", "content": f"Question number {i}: what is {i} plus {i + 1}?"},
                {"role": "assistant", "content": "Arr, matey! That be a fine question."},
            ]
            stream.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_large(path: Path, megabytes: int) -> Path:
    """A valid chat JSONL file of about `megabytes` MB, written in blocks."""
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 900}, {"role": "assistant", "content": "ok"}]})
    block = ((line + "\n") * 1000).encode()
    with path.open("wb") as stream:
        for _ in range(max(1, megabytes * MB // len(block))):
            stream.write(block)
    return path


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of `pid` and its live descendants (the API's check workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        if fields := _stat_fields(current):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pending += parents.get(current, [])
    return total


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 on), or None for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid, self.interval_s, self.peak, self._stop = pid, interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def direct_first_step(tiny: Path, data_uri: str, store: str, work: Path, run: int) -> float:
    """The trainer as `tuneloom train` runs it: Popen to its first progress record."""
    hp = mapping.ResolvedHyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=1.0)
    document = mapping.finetune_job(
        job_id=f"ftjob-direct-{run}",
        project="default",
        base_model=str(tiny),
        train_uri=data_uri,
        validation_uri=None,
        train_count=mapping.train_examples(EXAMPLES, False),
        hyperparameters=hp,
        seed=1,
        adapter=f"direct-{run}",
        store=store,
        max_seq_length=128,
    )
    (work / "job.yaml").write_text(yaml.safe_dump(document))
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-I", "-m", "tuneloom.trainer", "-f", str(work / "job.yaml")],
        env={**os.environ, METRICS_PORT_ENV: str(port), BIND_ADDRESS_ENV: LOCALHOST},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The trainer's /progress, polled as the API's runner polls it (a faster poll than the runner's).
    while first_steps(port) < 1:
        if process.poll() is not None:
            raise RuntimeError(f"the trainer exited with {process.returncode}")
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    process.wait()
    return elapsed


def first_steps(port: int) -> int:
    """The optimizer steps the trainer listening on `port` has logged; 0 before it listens."""
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/progress", timeout=2) as response:
            return int(json.loads(response.read()).get("step") or 0)
    except (OSError, ValueError):
        return 0


def api_first_step(client, tiny: Path, data: Path) -> float:
    file = client.files.create(file=data.open("rb"), purpose="fine-tune")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        training_file=file.id, model=str(tiny), hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data):
        time.sleep(0.25)  # a client's polling; faster polls take CPU from the trainer on a small host
    elapsed = time.monotonic() - started
    while client.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upload-mb", type=int, default=200, help="size of the uploaded file (1024 for 1 GB)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2, help="first-step runs of each kind, alternated")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-api-"))
    tiny = derive_tiny_model(prepare_model("smollm2-135m-instruct"), work / "tiny")
    with SeaweedFS(work / "seaweedfs") as weed:
        weed.create_bucket("bench")
        store = "s3://bench/root"
        env = {**weed.client_env(), "BENCH_API_KEY": KEY}
        os.environ.update(weed.client_env())  # the direct trainer and boto3 reach the same store
        api = ApiProcess(
            ["--store", store, "--api-key-env", "BENCH_API_KEY", "--state-dir", str(work / "state")],
            env,
            work / "api.log",
        ).start()
        try:
            client = api.client(KEY)
            data = write_dataset(work / "data.jsonl", EXAMPLES)
            s3 = weed.client()
            s3.upload_file(str(data), "bench", "root/direct/data.jsonl")
            data_uri = f"{store}/direct/data.jsonl"
            # Alternated and the best of each kept: the first run of either pays for cold caches.
            direct_runs, api_runs = [], []
            for run in range(args.repeats):
                (work / f"direct-{run}").mkdir()
                direct_runs.append(direct_first_step(tiny, data_uri, store, work / f"direct-{run}", run))
                api_runs.append(api_first_step(client, tiny, data))
            direct_s, api_s = min(direct_runs), min(api_runs)

            large = write_large(work / "large.jsonl", args.upload_mb)
            size = large.stat().st_size
            weed_cpu, own_cpu = cpu_seconds(weed.pid), time.process_time()
            started = time.monotonic()
            s3.upload_file(str(large), "bench", "root/direct/large.jsonl")
            boto3_s = time.monotonic() - started
            boto3_cpu = {"client_s": time.process_time() - own_cpu, "seaweedfs_s": cpu_seconds(weed.pid) - weed_cpu}
            before = rss_bytes(api.process.pid)
            weed_cpu, own_cpu, api_cpu = cpu_seconds(weed.pid), time.process_time(), cpu_seconds(api.process.pid)
            with PeakRss(api.process.pid) as peak:
                started = time.monotonic()
                client.files.create(file=large.open("rb"), purpose="fine-tune")
                upload_s = time.monotonic() - started
            upload_cpu = {
                "client_s": time.process_time() - own_cpu,
                "api_s": cpu_seconds(api.process.pid) - api_cpu,
                "seaweedfs_s": cpu_seconds(weed.pid) - weed_cpu,
            }
        finally:
            api.stop()
    result = {
        "first_step": {
            "api_s": round(api_s, 2),
            "api_runs_s": [round(s, 2) for s in api_runs],
            "direct_runs_s": [round(s, 2) for s in direct_runs],
            "direct_s": round(direct_s, 2),
            "difference_s": round(api_s - direct_s, 2),
            "ratio": round(api_s / direct_s, 3),
        },
        "upload": {
            "bytes": size,
            "api_mb_per_s": round(size / MB / upload_s, 1),
            "boto3_mb_per_s": round(size / MB / boto3_s, 1),
            "ratio_api_to_boto3": round(boto3_s / upload_s, 3),
            "api_includes": "as the body arrives: multipart parse into a temporary file, S3 parts sent and spans "
            "of lines checked (worker processes); the upload committed once every line passed",
            "cpu_s": {
                "boto3": {name: round(seconds, 2) for name, seconds in boto3_cpu.items()},
                "api": {name: round(seconds, 2) for name, seconds in upload_cpu.items()},
            },
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "api_rss": {
            "before_upload_mb": round(before / MB, 1),
            "peak_during_upload_mb": round(peak.peak / MB, 1),
            "growth_mb": round((peak.peak - before) / MB, 1),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
