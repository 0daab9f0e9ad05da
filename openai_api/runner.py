"""The local job backend: runs each job's trainer as a child process on this machine, in creation
order, at most `max_running` at once, and turns its progress (polled from its /progress endpoint, as
the operator reads it) into events.

validating_files -> queued -> running -> succeeded | failed | cancelled | paused (-> queued on resume).
The trainer runs as `python -I -m tuneloom.trainer -f job.yaml`, so cancel and pause are signals and
a crash cannot take the API down; it dies with the API (PR_SET_PDEATHSIG). A job that was running
when the API stopped is queued again at start-up and resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from tuneloom.api import TRAINER_EXIT_INVALID_INPUT, TRAINER_EXIT_PREEMPTED
from tuneloom.children import die_with_parent
from tuneloom.net import LOCALHOST, free_port
from tuneloom.registry import read_adapter, read_published, run_prefix
from tuneloom.storage import ObjectStore

from . import jobs as mapping
from .errors import ApiError
from .files import FileService
from .models import resolve_base_model
from .progress import comparison_event, promotion_event, result_csv, translate
from .state import JobRecord, NewEvent, State

log = logging.getLogger("tuneloom.api")

ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
STOP_GRACE_S = 20.0
POLL_S = 0.5
LOG_TAIL_BYTES = 16_384
# The trainer's own settings (tuneloom.trainer.main, not imported here: it loads torch).
METRICS_PORT_ENV, BIND_ADDRESS_ENV = "TUNELOOM_METRICS_PORT", "TUNELOOM_BIND_ADDRESS"
ERROR_PREFIX = "error: "  # how the trainer's last words start when it refuses its input


class JobBackend(Protocol):
    """What the HTTP layer asks of whatever runs the jobs (this machine now; FineTuneJobs later)."""

    def submit(self, job: JobRecord) -> None: ...
    def cancel(self, job_id: str) -> JobRecord: ...
    def pause(self, job_id: str) -> JobRecord: ...
    def resume(self, job_id: str) -> JobRecord: ...


@dataclass
class _Run:
    process: subprocess.Popen[bytes]
    port: int
    seen: dict[str, Any] = field(default_factory=dict)  # the last /progress answer


def failure(returncode: int, message: str | None, log_tail: str) -> dict[str, Any]:
    """An error a user can act on, from the trainer's exit and last words; never a traceback."""
    text = message or ""
    if returncode in (-signal.SIGKILL, 137) or "out of memory" in log_tail.lower() or "OutOfMemoryError" in log_tail:
        return {
            "code": "out_of_memory",
            "param": "hyperparameters.batch_size",
            "message": "The trainer ran out of memory; create the job again with a smaller batch_size",
        }
    if returncode == TRAINER_EXIT_INVALID_INPUT:
        first = text.splitlines()[0] if text else "invalid input"
        if "spec.baseModel" in text:
            return {
                "code": "model_not_found",
                "param": "model",
                "message": f"The base model could not be loaded: {first}",
            }
        if "dataset" in text or "example" in text:
            return {"code": "invalid_training_file", "param": "training_file", "message": text[:2000]}
        return {"code": "invalid_request", "param": None, "message": text[:2000]}
    last = [line for line in log_tail.splitlines() if line and not line[0].isspace() and "Error" in line]
    cause = last[-1] if last else f"the trainer exited with status {returncode}"
    return {
        "code": "training_failed",
        "param": None,
        "message": f"Training failed: {cause[:500]}; create the job again",
    }


class LocalRunner:
    def __init__(
        self,
        state: State,
        files: FileService,
        store: ObjectStore,
        work_root: Path,
        max_running: int,
        max_seq_length: int,
    ):
        self.state, self.files, self.store = state, files, store
        self.work_root, self.max_running, self.max_seq_length = work_root, max_running, max_seq_length
        self._lock = threading.RLock()  # every change to a job record goes through it
        self._runs: dict[str, _Run] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)

    # the HTTP layer's side

    def start(self) -> None:
        self._recover()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=STOP_GRACE_S + 5)

    def submit(self, job: JobRecord) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> JobRecord:
        return self._stop_job(job_id, "cancelled")

    def pause(self, job_id: str) -> JobRecord:
        return self._stop_job(job_id, "paused")

    def resume(self, job_id: str) -> JobRecord:
        with self._lock:
            job = self._job(job_id)
            if job.status != "paused":
                raise ApiError(
                    400, f"job {job_id} is {job.status}; only a paused job can be resumed", code="invalid_state"
                )
            job.status, job.stopping = "queued", None
            self.state.update_job(job, [NewEvent(message="Job resumed; it continues from its latest checkpoint")])
        self._wake.set()
        return job

    def _stop_job(self, job_id: str, outcome: str) -> JobRecord:
        with self._lock:
            job = self._job(job_id)
            if job.status in FINISHED or (outcome == "paused" and job.status == "paused"):
                raise ApiError(400, f"job {job_id} is already {job.status}", code="invalid_state")
            if job.status == "paused" or job_id not in self._runs:
                self._finish_stopped(job, outcome)
                return job
            job.stopping = outcome
            self.state.update_job(job)
            self._runs[job_id].process.send_signal(signal.SIGTERM)
        return job

    def _job(self, job_id: str) -> JobRecord:
        job = self.state.job(job_id)
        if job is None:
            raise ApiError(404, f"No such job: {job_id!r}.", code="job_not_found")
        return job

    # the runner thread's side

    def _recover(self) -> None:
        """Jobs the last API process left running queue again ahead of newer jobs (creation order)
        and resume from their checkpoints."""
        for job in self.state.jobs_in(["running"]):
            if job.stopping:
                self._finish_stopped(job, job.stopping)
                continue
            job.status = "queued"
            self.state.update_job(
                job,
                [NewEvent(message="The API restarted while this job trained; it resumes from its latest checkpoint")],
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # one bad job or a store hiccup must not end the runner
                log.exception("job runner: tick failed")
            self._wake.wait(POLL_S)
            self._wake.clear()
        for run in self._runs.values():
            run.process.terminate()

    def _tick(self) -> None:
        with self._lock:
            for job in self.state.jobs_in(["validating_files"]):
                self._validate(job)
            for job_id, run in list(self._runs.items()):
                job = self.state.job(job_id)
                self._observe(job, run)
                if run.process.poll() is not None:
                    del self._runs[job_id]
                    self._ended(job, run.process.returncode)
            for job in self.state.jobs_in(["queued"]):
                if len(self._runs) >= self.max_running:
                    break
                self._launch(job)

    def _validate(self, job: JobRecord) -> None:
        training = self.state.file(job.project, job.training_file)
        validation = self.state.file(job.project, job.validation_file) if job.validation_file else None
        if training is None or (job.validation_file and validation is None):
            missing = job.training_file if training is None else job.validation_file
            self._fail(
                job, {"code": "invalid_file", "param": "training_file", "message": f"file {missing} was deleted"}
            )
            return
        message = f"Validated training file {training.filename}: {training.examples} examples"
        if validation:
            message += f"; validation file {validation.filename}: {validation.examples} examples"
        job.status = "queued"
        self.state.update_job(job, [NewEvent(message=message), NewEvent(message="Job queued")])

    def _work(self, job: JobRecord) -> Path:
        path = self.work_root / job.id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _launch(self, job: JobRecord) -> None:
        work = self._work(job)
        training = self.state.file(job.project, job.training_file)
        validation = self.state.file(job.project, job.validation_file) if job.validation_file else None
        document = mapping.finetune_job(
            job_id=job.id,
            project=job.project,
            base_model=str(resolve_base_model(job.base_model).directory),
            train_uri=self.files.uri(training),
            validation_uri=self.files.uri(validation) if validation else None,
            train_count=mapping.train_examples(training.examples, validation is not None),
            hyperparameters=mapping.ResolvedHyperparameters.model_validate(job.hyperparameters),
            seed=job.seed,
            adapter=job.adapter_name,
            store=self.store.uri,
            max_seq_length=self.max_seq_length,
            method=job.method,
        )
        (work / "job.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        port = free_port()
        env = {**os.environ, METRICS_PORT_ENV: str(port), BIND_ADDRESS_ENV: LOCALHOST}
        with (work / "trainer.log").open("ab") as trainer_log:
            process = subprocess.Popen(
                [sys.executable, "-I", "-m", "tuneloom.trainer", "-f", str(work / "job.yaml")],
                stdout=trainer_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=work,
                preexec_fn=die_with_parent,  # this thread lives as long as the API
            )
        self._runs[job.id] = _Run(process, port)
        job.status = "running"
        self.state.update_job(job, [NewEvent(message="Fine-tuning job started")])

    def _observe(self, job: JobRecord, run: _Run) -> None:
        """Polls the trainer's /progress (where the operator reads it too) and records what changed."""
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{run.port}/progress", timeout=2) as response:
                current = json.loads(response.read())
        except (OSError, ValueError):
            return  # not listening yet, or gone
        translated = translate(run.seen, current)
        run.seen = current
        if translated.eta_seconds is not None:
            job.estimated_finish = int(time.time() + translated.eta_seconds)
        if translated.events or translated.checkpoints:
            self.state.update_job(job, translated.events, translated.checkpoints)

    def _ended(self, job: JobRecord, returncode: int) -> None:
        if job.stopping:
            self._finish_stopped(job, job.stopping)
        elif returncode == 0:
            self._succeed(job)
        elif returncode == TRAINER_EXIT_PREEMPTED:  # stopped by someone else, at a saved checkpoint
            job.status, job.estimated_finish = "queued", None
            notice = "The trainer was stopped at a checkpoint; the job queues again"
            self.state.update_job(job, [NewEvent(message=notice)])
        else:
            log_tail = self._log_tail(job)
            self._fail(job, failure(returncode, self._refusal(job, log_tail), log_tail))

    def _finish_stopped(self, job: JobRecord, outcome: str) -> None:
        job.status, job.stopping = outcome, None
        job.estimated_finish = None
        if outcome == "cancelled":
            job.finished_at = int(time.time())
            message = "Job cancelled"
        else:
            message = "Job paused; resume it to continue from its latest checkpoint"
        self.state.update_job(job, [NewEvent(message=message)])

    def _succeed(self, job: JobRecord) -> None:
        published = read_published(self.store, run_prefix(job.project, job.id, job.id))
        if published is None:
            self._fail(job, failure(1, None, "RuntimeError: the trainer exited without publishing the model"))
            return
        adapter = read_adapter(self.store, job.project, job.adapter_name, published["version"])
        metrics = adapter.manifest.metrics
        job.adapter_version, job.final_step = adapter.version, metrics.steps
        job.promotion = adapter.manifest.promotion.model_dump(mode="json")
        job.trained_tokens = metrics.tokensSeen or None
        result = self.files.add_result(job.project, "step_metrics.csv", result_csv(self.state.all_events(job.id)))
        job.result_files = [result.id]
        job.status, job.finished_at, job.estimated_finish = "succeeded", int(time.time()), None
        final = {
            "step": metrics.steps,
            "valid_loss": metrics.adapter.validationLoss,
            "valid_mean_token_accuracy": metrics.adapter.tokenAccuracy,
        }
        events = [
            comparison_event(metrics.base.model_dump(), metrics.adapter.model_dump()),
            promotion_event(adapter.manifest.promotion, job.fine_tuned_model),
            NewEvent(message="The job has successfully completed"),
        ]
        self.state.update_job(job, events, [(metrics.steps, {k: v for k, v in final.items() if v is not None})])

    def _fail(self, job: JobRecord, error: dict[str, Any]) -> None:
        job.status, job.error, job.finished_at, job.estimated_finish = "failed", error, int(time.time()), None
        self.state.update_job(job, [NewEvent(message=f"Job failed: {error['message']}", level="error")])

    def _refusal(self, job: JobRecord, log_tail: str) -> str | None:
        """The trainer's last `error: ...` words (its message for a refused input), with stored-file
        URIs named as the client's file names."""
        at = log_tail.rfind("\n" + ERROR_PREFIX)
        if at < 0:
            return None
        message = log_tail[at + 1 + len(ERROR_PREFIX) :].strip()
        for file_id in filter(None, (job.training_file, job.validation_file)):
            record = self.state.file(job.project, file_id)
            if record:
                message = message.replace(self.files.uri(record), record.filename)
        return message

    def _log_tail(self, job: JobRecord) -> str:
        path = self._work(job) / "trainer.log"
        if not path.exists():
            return ""
        with path.open("rb") as stream:
            stream.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return stream.read().decode(errors="replace")
