"""Reconciling one FineTuneJob: from what exists (the object, its Job, its Pod, the adapter in
object storage) to its status. Level-triggered and idempotent: it can run any number of times,
from any handler, after any operator restart, and creates each object at most once.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tuneloom.api import (
    API_GROUP,
    API_VERSION,
    AdapterPromotion,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
    Progress,
    PublishedAdapter,
    TrainingEstimate,
)
from tuneloom.jobfile import SpecError
from tuneloom.locks import KeyedLocks
from tuneloom.operator import jobbuilder, multinode
from tuneloom.operator.adapters import AdapterReconciler
from tuneloom.operator.common import (
    MODELSERVERS,
    SecretNotFoundError,
    call_json,
    condition_of,
    now,
    open_object_store,
    parse_object,
    post_event,
    read_custom,
    read_secret,
    read_status,
    set_condition,
    status_patch,
)
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.estimates import estimate_job
from tuneloom.operator.gang import GroupObservation, observe_group
from tuneloom.operator.jobbuilder import LABEL_JOB
from tuneloom.operator.metrics import OperatorMetrics
from tuneloom.operator.observe import Observation, invalid_input, is_finished, observe, running_pod
from tuneloom.registry import (
    OverfittingRecord,
    TrainingMetrics,
    read_adapter,
    read_preemptions,
    read_published,
    run_prefix,
)
from tuneloom.storage import ObjectStore, StorageError
from tuneloom.trainer.estimate import run_cost

log = logging.getLogger("tuneloom.operator")

TERMINAL = {Phase.succeeded, Phase.failed, Phase.cancelled}
PLURAL = "finetunejobs"
SERVICE_ACCOUNT_RECHECK_S = 60.0  # how stale "the namespace has the trainer's ServiceAccount" may get
POD_JOB_LABEL = "job-name"  # set by the Job controller on each Pod it creates


@dataclass(frozen=True)
class TrainingObjects:
    """Every training Job and its Pods, listed once for a whole resync pass instead of read job by
    job: two requests a pass however many jobs there are, served from the API server's watch cache.
    A Job created after the listing is simply not in it, and is then read directly."""

    jobs: dict[tuple[str, str], dict[str, Any]]  # (namespace, Job name) -> the Job
    pods: dict[tuple[str, str], list[dict[str, Any]]]  # same key -> its Pods


class FineTuneJobReconciler:
    def __init__(
        self, config: OperatorConfig, api: k8s.ApiClient, metrics: OperatorMetrics, adapters: AdapterReconciler
    ):
        self.config = config
        self.core = k8s.CoreV1Api(api)
        self.batch = k8s.BatchV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.metrics = metrics
        self.adapters = adapters
        # One admission decision at a time: two jobs must not both take the last free slot.
        self.admission = threading.Lock()
        # One reconcile per object at a time: the event handler and a resync pass may overlap.
        self._locks = KeyedLocks()
        # Namespace -> when the trainer's ServiceAccount was last created or found there: a burst of
        # jobs in one namespace needs it created once, not once per job.
        self._service_account_seen: dict[str, float] = {}
        # uid -> the status as our last patch stored it: tells whether a body is older than that.
        self._written: dict[str, dict[str, Any]] = {}
        # uids whose estimate was tried: one that could not be made is not tried on every pass.
        self._estimated: set[str | None] = set()
        self._indexed: bool | None = None  # whether the API server has Indexed Jobs; asked once

    # -- entry point -----------------------------------------------------------------------------

    def reconcile(self, body: dict[str, Any], listed: TrainingObjects | None = None) -> dict[str, Any]:
        """Brings the FineTuneJob's status up to date; returns the fields it changed. `listed`: the
        Jobs and Pods of a resync pass; without it, the job's own are read."""
        with self._locks.lock(body["metadata"]["uid"]):
            current = self._current(body)
            return self._reconcile_fresh(current, listed) if current is not None else {}

    def list_training_objects(self) -> TrainingObjects:
        # resourceVersion 0: from the watch cache, not a quorum read of every Pod in etcd.
        jobs = call_json(self.batch.list_job_for_all_namespaces, label_selector=LABEL_JOB, resource_version="0")
        pods = call_json(self.core.list_pod_for_all_namespaces, label_selector=LABEL_JOB, resource_version="0")
        by_job: defaultdict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for pod in pods["items"]:
            owner = (pod["metadata"].get("labels") or {}).get(POD_JOB_LABEL)
            if owner:
                by_job[(pod["metadata"]["namespace"], owner)].append(pod)
        return TrainingObjects(
            jobs={(j["metadata"]["namespace"], j["metadata"]["name"]): j for j in jobs["items"]}, pods=dict(by_job)
        )

    def _current(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The object as stored now (None once deleted). The body a watch event or the resync
        carries is that, unless it predates our own last status patch: only then is it read again."""
        meta = body["metadata"]
        written = self._written.get(meta["uid"])
        if written is None or (body.get("status") or {}) == written:
            return body
        return read_custom(self.custom, PLURAL, meta["namespace"], meta["name"])

    def _reconcile_fresh(self, body: dict[str, Any], listed: TrainingObjects | None) -> dict[str, Any]:
        started = time.monotonic()
        try:
            status = read_status(FineTuneJobStatus, body, phase=Phase.pending, conditions=[])
            before = status.phase
            self._reconcile(body, status, listed)
            changes = status_patch(body.get("status") or {}, status)
            if changes:
                self._patch_status(body, changes)
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - started)
        self._record_transition(body, before, status)
        return changes

    def _patch_status(self, body: dict[str, Any], changes: dict[str, Any]) -> None:
        # Written here rather than through kopf's patch: a rejected patch must fail this reconcile
        # loudly (and be retried on the next pass), and its reply tells what is stored now.
        meta = body["metadata"]
        stored = call_json(
            self.custom.patch_namespaced_custom_object_status,
            API_GROUP,
            API_VERSION,
            meta["namespace"],
            PLURAL,
            meta["name"],
            {"status": changes},
        )
        self._written[meta["uid"]] = stored.get("status") or {}

    def forget(self, body: dict[str, Any]) -> None:
        self.metrics.phases.set(self._key(body), None)
        self._locks.forget(body["metadata"]["uid"])
        self._written.pop(body["metadata"]["uid"], None)
        self._estimated.discard(body["metadata"]["uid"])

    # -- the state machine -----------------------------------------------------------------------

    def _reconcile(
        self, body: dict[str, Any], status: FineTuneJobStatus, listed: TrainingObjects | None
    ) -> FineTuneJobStatus:
        status.observedGeneration = body["metadata"].get("generation")
        if status.phase in TERMINAL:
            return status
        try:
            job = parse_object(FineTuneJob, body)
        except SpecError as exc:
            return self._end(status, Observation(Phase.failed, "InvalidSpec", "; ".join(exc.problems)))
        if job.spec.cancel:
            if job.spec.resources.nodes > 1:
                self._delete_group(job, self._group(job)[0], "Background")
            else:
                self._delete_job(job)
            return self._end(
                status, Observation(Phase.cancelled, "Cancelled", "spec.cancel is true; the Job was deleted")
            )
        if job.spec.suspend:
            return self._suspend(body, job, status, listed)
        if status.phase is Phase.suspended:
            # Its Jobs are gone and status.jobName was cleared: starting again goes through admission.
            message = "spec.suspend is false; the trainer resumes from the latest checkpoint"
            set_condition(status.conditions, "Suspended", "False", "Resumed", message)
            post_event(self.core, body, "Normal", "Resumed", message)
        if not status.jobName:
            # Not started yet, resumed, or the operator stopped between creating the Job and
            # recording it: creating is idempotent, so a new job costs no read first.
            return self._start(job, status)
        if job.spec.resources.nodes > 1:
            return self._track_group(body, job, status)
        existing, pods = self._job_and_pods(job, listed)
        if existing is None:
            return self._end(
                status, Observation(Phase.failed, "JobDeleted", f"Job {status.jobName} was deleted outside Tuneloom")
            )
        return self._track(body, job, existing, pods, status)

    def _start(self, job: FineTuneJob, status: FineTuneJobStatus) -> FineTuneJobStatus:
        problems = self._deeper_validation(job)
        if problems:
            return self._end(status, Observation(Phase.failed, "InvalidSpec", "; ".join(problems)))
        if status.estimate is None and job.metadata.uid not in self._estimated:
            status.estimate = self._estimate(job)
        ahead = self._admit(job)
        if ahead is not None:
            status.phase, status.message = Phase.queued, f"waiting for a free slot; {ahead} job(s) ahead"
            set_condition(status.conditions, "Queued", "True", "WaitingForSlot", status.message)
            return status
        set_condition(status.conditions, "Queued", "False", "Admitted", "a training slot was free")
        set_condition(status.conditions, "Accepted", "True", "JobCreated", "the training Job was created")
        status.phase, status.message = Phase.pending, "waiting for the training pod to start"
        status.jobName = _job_name(job)
        return status

    def _suspend(
        self, body: dict[str, Any], job: FineTuneJob, status: FineTuneJobStatus, listed: TrainingObjects | None
    ) -> FineTuneJobStatus:
        """spec.suspend: the training Jobs are deleted in the foreground, so they stay until their pods
        are gone (each trainer saves a checkpoint on SIGTERM) and a resume never meets a trainer that
        is still saving; then the phase is Suspended and status.jobName is cleared."""
        if status.jobName:
            if job.spec.resources.nodes > 1:
                jobs = self._group(job)[0]
            else:
                existing, pods = self._job_and_pods(job, listed)
                if existing is not None and is_finished(existing):
                    return self._track(body, job, existing, pods, status)  # it ended before it could be suspended
                jobs = [existing] if existing is not None else []
            if jobs:
                self._delete_group(job, [j for j in jobs if not j["metadata"].get("deletionTimestamp")], "Foreground")
                status.message = "suspending: waiting for the trainer to save a checkpoint and stop"
                set_condition(status.conditions, "Suspended", "False", "Suspending", status.message)
                return status
        message = "spec.suspend is true: the training pods were deleted; set it to false to resume from the latest "
        message += "checkpoint"
        if status.phase is not Phase.suspended:
            self._count_suspend_saves(job, status)
        status.phase, status.message, status.jobName, status.nodes = Phase.suspended, message, None, []
        set_condition(status.conditions, "Suspended", "True", "SpecSuspend", message)
        set_condition(status.conditions, "Running", "False", "Suspended", message)
        restart = condition_of(status.conditions, "GroupRestart")
        if restart is not None and restart.status == "True":  # the resume creates the whole group anew
            set_condition(status.conditions, "GroupRestart", "False", "Suspended", message)
        return status

    def _track(
        self,
        body: dict[str, Any],
        job: FineTuneJob,
        existing: dict[str, Any],
        pods: list[dict[str, Any]],
        status: FineTuneJobStatus,
    ) -> FineTuneJobStatus:
        status.jobName = existing["metadata"]["name"]
        _refuse_spec_change(job, existing, status)
        seen = observe(existing, pods)
        if seen.phase is Phase.succeeded:
            return self._succeed(body, job, status)
        if seen.phase is Phase.failed:
            if invalid_input(pods) and not is_finished(existing):
                # The Job would retry up to backoffLimit times (clusters without podFailurePolicy).
                self._delete_job(job)
            return self._end(status, seen)
        status.phase, status.message = seen.phase, seen.message
        set_condition(status.conditions, "Running", str(seen.phase is Phase.running), seen.reason, seen.message)
        if seen.phase is Phase.running:
            if status.startTime is None:
                status.startTime = now()
            record = self._poll_trainer(running_pod(pods))
            if record is not None:
                status.progress = progress_of(record) or status.progress
                self._count_preemptions(body, status, record.get("preemptedAtSteps") or [])
                # Only a detection is news while training: "no sign" waits for the whole history.
                verdict = OverfittingRecord.model_validate(record.get("overfitting") or {})
                if verdict.detected:
                    set_condition(status.conditions, *overfitting_condition(verdict))
        return status

    def _track_group(self, body: dict[str, Any], job: FineTuneJob, status: FineTuneJobStatus) -> FineTuneJobStatus:
        """A multi-node job: all its nodes run, or it waits; a failed rank restarts them all."""
        jobs, pods = self._group(job)
        restart = condition_of(status.conditions, "GroupRestart")
        if restart is not None and restart.status == "True":
            return self._recreate_group(job, jobs, status)
        if not jobs and (message := self._restart_marked(job)) is not None:
            # The group was being restarted when the operator stopped, before its status said so.
            set_condition(status.conditions, "GroupRestart", "True", "RestartInterrupted", message)
            return self._recreate_group(job, jobs, status)
        if not jobs:
            return self._end(
                status, Observation(Phase.failed, "JobDeleted", f"Job {status.jobName} was deleted outside Tuneloom")
            )
        _refuse_spec_change(job, jobs[0], status)
        seen = observe_group(job.spec.resources.nodes, jobs, pods, status.nodes)
        status.nodes = seen.nodes
        if seen.final is not None:
            if seen.final.phase is Phase.succeeded:
                return self._succeed(body, job, status)
            self._delete_group(job, jobs, "Background")  # the other ranks would wait for it forever
            return self._end(status, seen.final)
        if seen.failed is not None:
            return self._restart_group(body, job, jobs, status, seen)
        status.phase, status.message = seen.phase, seen.message
        running = seen.phase is Phase.running
        reason = "Training" if running else "WaitingForNodes"
        set_condition(status.conditions, "Running", str(running), reason, seen.message)
        if running:
            if status.startTime is None:
                status.startTime = now()
            # Only the pod holding rank 0 of the process group answers; which one that is, c10d decides.
            record = next(filter(None, map(self._poll_trainer, seen.running)), None)
            if record is not None:
                status.progress = progress_of(record) or status.progress
                self._count_preemptions(body, status, record.get("preemptedAtSteps") or [])
        return status

    def _restart_group(
        self,
        body: dict[str, Any],
        job: FineTuneJob,
        jobs: list[dict[str, Any]],
        status: FineTuneJobStatus,
        seen: GroupObservation,
    ) -> FineTuneJobStatus:
        """Stops every node (their trainers save a checkpoint on SIGTERM) and marks the group for
        recreation; a failure that is not a preemption spends one of spec.scheduling.backoffLimit."""
        failed, limit = seen.failed, job.spec.scheduling.backoffLimit
        assert failed is not None
        status.failedRank = failed.rank
        why = f"rank {failed.rank} failed ({failed.reason}): {failed.message}"
        if seen.counts_as_failure and status.groupRestarts >= limit:
            self._delete_group(job, jobs, "Background")
            message = f"{why}; the group was restarted {status.groupRestarts} time(s) (spec.scheduling.backoffLimit)"
            return self._end(status, Observation(Phase.failed, failed.reason, message))
        if seen.counts_as_failure:
            status.groupRestarts += 1
            counted = f"restart {status.groupRestarts} of spec.scheduling.backoffLimit {limit}"
        else:
            counted = "not counted against spec.scheduling.backoffLimit"
        message = f"{why}; restarting all {job.spec.resources.nodes} nodes ({counted})"
        self._mark_restart(job, message)
        # Foreground: the Jobs stay until their pods are gone, so the new group never meets the old one.
        self._delete_group(job, jobs, "Foreground")
        set_condition(status.conditions, "GroupRestart", "True", failed.reason, message)
        set_condition(status.conditions, "Running", "False", "GroupRestart", message)
        status.phase, status.message = Phase.pending, message
        post_event(self.core, body, "Warning", "GroupRestart", message)
        return status

    def _recreate_group(
        self, job: FineTuneJob, jobs: list[dict[str, Any]], status: FineTuneJobStatus
    ) -> FineTuneJobStatus:
        if jobs:
            status.message = "restarting the group: waiting for the old pods to stop"
            return status
        self._create(job)
        self._mark_restart(job, None)
        set_condition(
            status.conditions,
            "GroupRestart",
            "False",
            "GroupRecreated",
            f"all {job.spec.resources.nodes} nodes were recreated after rank {status.failedRank} failed; the trainer "
            "resumes from the latest checkpoint",
        )
        status.phase, status.message, status.nodes = Phase.pending, "waiting for the new group's nodes to start", []
        return status

    def _count_suspend_saves(self, job: FineTuneJob, status: FineTuneJobStatus) -> None:
        """The trainer records the SIGTERM checkpoint of a suspend as a preemption: once its pods are
        gone, every record not counted yet is the suspend's (a real preemption between the last poll
        and the suspend would be taken for it too), so the resumed trainer's report counts none."""
        try:
            steps = read_preemptions(*self._run_store(job))
        except (StorageError, ApiException) as exc:
            log.warning("%s: the trainer's preemption record is unreadable (%s)", job.metadata.name, exc)
            return
        status.suspendSaves = max(status.suspendSaves, len(steps) - status.preempted)

    def _count_preemptions(self, body: dict[str, Any], status: FineTuneJobStatus, steps: list[int]) -> None:
        """The trainer's own record of its preemptions (a deleted pod leaves no exit code behind to
        read): one Event for each one not counted yet, as a preemption or as a suspend's save."""
        for step in steps[status.preempted + status.suspendSaves :]:
            post_event(
                self.core,
                body,
                "Normal",
                "Preempted",
                f"the trainer was preempted at step {step} and saved a checkpoint there; the retry resumed from it",
            )
        status.preempted = max(status.preempted, len(steps) - status.suspendSaves)

    def _succeed(self, body: dict[str, Any], job: FineTuneJob, status: FineTuneJobStatus) -> FineTuneJobStatus:
        try:
            adapter, training = self._published(job)
        except (StorageError, ApiException) as exc:
            return self._end(
                status,
                Observation(
                    Phase.failed, "AdapterNotFound", f"the Job completed but its adapter could not be read: {exc}"
                ),
            )
        status.adapter = adapter
        # The manifest's counts, not the last poll's: a short run can end between two polls.
        self._count_preemptions(body, status, training.preemptedAtSteps)
        done = {"percent": 100, "etaSeconds": 0, "step": training.steps}
        status.progress = (status.progress or Progress()).model_copy(update=done)
        self._record_adapter(job)
        if job.spec.serve.modelServer:
            self._add_to_preload(job, status)
        if training.overfitting is not None:  # older trainers wrote no verdict
            set_condition(status.conditions, *overfitting_condition(training.overfitting))
        written = f"adapter {adapter.name}@{adapter.version} written to {adapter.uri}"
        promotion = adapter.promotion or AdapterPromotion()
        if promotion.promoted:
            set_condition(status.conditions, "Promoted", "True", "PassedGate", f"{written}; promoted")
        else:
            written += f"; not promoted: {'; '.join(promotion.reasons)}"
            set_condition(status.conditions, "Promoted", "False", "FailedGate", written)
        return self._end(status, Observation(Phase.succeeded, "AdapterPublished", written))

    def _record_adapter(self, job: FineTuneJob) -> None:
        """Creates or updates the Adapter named after the result, and checks it at once rather than
        on its next resync pass. API errors propagate, so the job's success is retried with them."""
        try:
            body = self.adapters.upsert_for_job(job)
        except ApiException as exc:
            if exc.status != 404:
                raise
            # 404 on create: the Adapter CRD is not installed. The job's result is still good.
            log.warning("%s: the Adapter CRD is not installed; no Adapter recorded", job.identity)
            return
        try:
            self.adapters.reconcile(body)
        except Exception:  # the Adapter's own handlers retry; its check must not hold up the job
            log.exception("%s: checking Adapter %s failed; it is retried", job.identity, job.spec.output.adapterName)

    def _add_to_preload(self, job: FineTuneJob, status: FineTuneJobStatus) -> None:
        """Adds the adapter to spec.serve.modelServer's preload list (kept across pod restarts and
        visible in its spec), guarded by resourceVersion against concurrent edits."""
        namespace, server, name = job.metadata.namespace, job.spec.serve.modelServer, job.spec.output.adapterName
        body = read_custom(self.custom, MODELSERVERS, namespace, server or "")
        if body is None:
            set_condition(
                status.conditions,
                "Served",
                "False",
                "ModelServerNotFound",
                f"ModelServer {namespace}/{server} (spec.serve.modelServer) does not exist; Adapter {name} is "
                "ready to be served once a ModelServer preloads it or a client asks for it",
            )
            return
        preload = (body.get("spec") or {}).get("preload") or {}
        names = list(preload.get("adapters") or [])
        if name not in names:
            patch = {
                "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                "spec": {"preload": {"adapters": [*names, name]}},
            }
            self.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, MODELSERVERS, server, patch)
        set_condition(
            status.conditions,
            "Served",
            "True",
            "PreloadAdded",
            f"{name} is in ModelServer {server}'s spec.preload.adapters; its ready replicas load it",
        )

    def _end(self, status: FineTuneJobStatus, outcome: Observation) -> FineTuneJobStatus:
        status.phase, status.message, status.completionTime = outcome.phase, outcome.message, now()
        for kind in (Phase.succeeded, Phase.failed, Phase.cancelled):
            is_it = kind is outcome.phase
            set_condition(
                status.conditions,
                kind.value,
                str(is_it),
                outcome.reason if is_it else "",
                outcome.message if is_it else "",
            )
        set_condition(status.conditions, "Running", "False", outcome.reason, outcome.message)
        return status

    # -- checks that need the cluster ------------------------------------------------------------

    @property
    def _price(self) -> float | None:
        """The chart's GPU-hour price, for jobs that name none."""
        return self.config.gpu_hour_price or None

    def _estimate(self, job: FineTuneJob) -> TrainingEstimate | None:
        """Tokens, steps, time and cost expected, from the data's head and the model's headers; an
        estimate that cannot be made is logged, never holds the job back."""
        self._estimated.add(job.metadata.uid)
        spec = job.spec

        def open_prefix(uri: str) -> ObjectStore:
            return open_object_store(self.core, job.metadata.namespace, uri, spec.storage)

        try:
            expected = estimate_job(spec, open_prefix, self.config.estimate_device, self._price)
        except (StorageError, SecretNotFoundError, ValueError) as exc:
            log.info("%s/%s: no estimate: %s", job.metadata.namespace, job.metadata.name, exc)
            return None
        if expected is not None:
            log.info("%s/%s: estimate %s", job.metadata.namespace, job.metadata.name, expected.model_dump())
        return expected

    def _deeper_validation(self, job: FineTuneJob) -> list[str]:
        problems = []
        spec = job.spec
        if jobbuilder.needs_gpu(job) and spec.resources.gpus < 1:
            problems.append("spec.resources.gpus: method qlora needs a CUDA GPU; request at least 1")
        secret = spec.storage.credentialsSecret
        if secret and read_secret(self.core, job.metadata.namespace, secret) is None:
            problems.append(
                f"spec.storage.credentialsSecret: Secret {job.metadata.namespace}/{secret} does not exist; create it "
                "with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return problems

    # -- queueing --------------------------------------------------------------------------------

    def _admit(self, job: FineTuneJob) -> int | None:
        """Creates the job's objects when it may start (returns None); otherwise returns how many
        waiting jobs come before it."""
        if not self.config.max_running_jobs and not self.config.max_running_jobs_per_namespace:
            self._create(job)  # no cap: nothing to decide, and creates of many jobs run side by side
            return None
        with self.admission:
            ahead = self._jobs_ahead(job)
            if ahead is None:
                self._create(job)
            return ahead

    def _jobs_ahead(self, job: FineTuneJob) -> int | None:
        """None when `job` may start now; otherwise how many waiting jobs come before it."""
        cap, per_namespace = self.config.max_running_jobs, self.config.max_running_jobs_per_namespace
        active = call_json(self.batch.list_job_for_all_namespaces, label_selector=LABEL_JOB)["items"]
        # A multi-node job on an older API server has one Job per node: count FineTuneJobs, not Jobs.
        running = {
            (j["metadata"]["namespace"], j["metadata"]["labels"][LABEL_JOB]) for j in active if not is_finished(j)
        }
        started = {(j["metadata"]["namespace"], j["metadata"]["labels"].get(LABEL_JOB)) for j in active}
        total, by_namespace = len(running), Counter(namespace for namespace, _ in running)
        waiting = [
            item
            for item in self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)["items"]
            if (item["metadata"]["namespace"], item["metadata"]["name"]) not in started
            and read_status(FineTuneJobStatus, item).phase in (Phase.pending, Phase.queued)
            and not (item.get("spec") or {}).get("cancel")
            and not (item.get("spec") or {}).get("suspend")
        ]
        waiting.sort(key=lambda item: (item["metadata"]["creationTimestamp"], item["metadata"]["name"]))
        for ahead, item in enumerate(waiting):
            namespace = item["metadata"]["namespace"]
            fits = (not cap or total < cap) and (not per_namespace or by_namespace[namespace] < per_namespace)
            if item["metadata"]["uid"] == job.metadata.uid or fits:
                # Strictly first in, first out: when an older job could start now, it starts first
                # (on its own pass) and this one waits for the next pass.
                admitted = fits and item["metadata"]["uid"] == job.metadata.uid
                log.info(
                    "%s/%s: %s (%d running, %d waiting ahead)",
                    job.metadata.namespace,
                    job.metadata.name,
                    "admitted" if admitted else "queued",
                    len(running),
                    ahead,
                )
                return None if admitted else max(ahead, 1)
        return None

    # -- objects ---------------------------------------------------------------------------------

    def _create(self, job: FineTuneJob) -> None:
        namespace = job.metadata.namespace
        creates: list[tuple[Any, dict[str, Any]]]
        if job.spec.resources.nodes > 1:
            creates = [(self.core.create_namespaced_service, multinode.build_headless_service(job))]
            group = multinode.build_group(job, self.config, self._has_indexed_jobs())
            creates += [(self.batch.create_namespaced_job, manifest) for manifest in group]
        else:
            creates = [(self.batch.create_namespaced_job, jobbuilder.build_job(job, self.config))]
        if time.monotonic() - self._service_account_seen.get(namespace, -math.inf) > SERVICE_ACCOUNT_RECHECK_S:
            account = jobbuilder.build_service_account(job, self.config)
            creates.insert(0, (self.core.create_namespaced_service_account, account))
        for create, manifest in creates:
            try:
                call_json(create, namespace, manifest)
            except ApiException as exc:
                if exc.status != 409:  # 409: created by an earlier pass (or job); names are deterministic
                    raise
        self._service_account_seen[namespace] = time.monotonic()
        log.info("created %s", ", ".join(f"{m['kind']} {namespace}/{m['metadata']['name']}" for _, m in creates))

    def _has_indexed_jobs(self) -> bool:
        if self._indexed is None:
            version = k8s.VersionApi(self.core.api_client).get_code()
            self._indexed = multinode.supports_indexed_jobs(version.major, version.minor)
            log.info(
                "API server %s.%s: multi-node jobs run as %s",
                version.major,
                version.minor,
                "one Indexed Job" if self._indexed else "one Job per node rank",
            )
        return self._indexed

    def _group(self, job: FineTuneJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A multi-node job's Jobs and Pods, read directly (two requests): the resync's listing is
        keyed by Job, and these are several Jobs, or one with several pods."""
        namespace, selector = job.metadata.namespace, f"{LABEL_JOB}={job.metadata.name}"
        jobs = call_json(self.batch.list_namespaced_job, namespace, label_selector=selector)["items"]
        pods = call_json(self.core.list_namespaced_pod, namespace, label_selector=selector)["items"]
        return jobs, pods

    def _mark_restart(self, job: FineTuneJob, message: str | None) -> None:
        """Sets (or, with None, clears) the group-restart marker on the job's headless Service."""
        patch = {"metadata": {"annotations": {multinode.RESTART_ANNOTATION: message}}}
        name = multinode.service_name(job.metadata.name)
        try:
            self.core.patch_namespaced_service(name, job.metadata.namespace, patch)
        except ApiException as exc:
            if exc.status != 404:  # no Service, no marker: the group is recreated with a new one
                raise

    def _restart_marked(self, job: FineTuneJob) -> str | None:
        """The message of a group restart that the job's Service says is in progress."""
        try:
            service = call_json(
                self.core.read_namespaced_service, multinode.service_name(job.metadata.name), job.metadata.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return (service["metadata"].get("annotations") or {}).get(multinode.RESTART_ANNOTATION)

    def _delete_group(self, job: FineTuneJob, jobs: list[dict[str, Any]], propagation: str) -> None:
        for existing in jobs:
            try:
                self.batch.delete_namespaced_job(
                    existing["metadata"]["name"], job.metadata.namespace, propagation_policy=propagation
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def _job_and_pods(
        self, job: FineTuneJob, listed: TrainingObjects | None
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The job's Job (None when it is gone) and its Pods: from the pass's listing, or read when
        there is none or it predates the Job."""
        key = (job.metadata.namespace, jobbuilder.job_name(job.metadata.name))
        if listed and key in listed.jobs:
            return listed.jobs[key], listed.pods.get(key, [])
        existing = self._read_job(job)
        return existing, self._pods(existing) if existing else []

    def _read_job(self, job: FineTuneJob) -> dict[str, Any] | None:
        try:
            return call_json(
                self.batch.read_namespaced_job, jobbuilder.job_name(job.metadata.name), job.metadata.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _delete_job(self, job: FineTuneJob) -> None:
        try:
            self.batch.delete_namespaced_job(
                jobbuilder.job_name(job.metadata.name), job.metadata.namespace, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _pods(self, existing: dict[str, Any]) -> list[dict[str, Any]]:
        meta = existing["metadata"]
        selector = f"{POD_JOB_LABEL}={meta['name']}"
        return call_json(self.core.list_namespaced_pod, meta["namespace"], label_selector=selector)["items"]

    def _poll_trainer(self, pod: dict[str, Any] | None) -> dict[str, Any] | None:
        """The trainer's latest record, from its /progress endpoint (it has no API rights)."""
        ip = ((pod or {}).get("status") or {}).get("podIP")
        if not ip:
            return None
        url = f"http://{ip}:{self.config.trainer_metrics_port}/progress"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                record = json.loads(response.read())
        except (OSError, ValueError):
            return None  # not serving yet; the next pass tries again
        return record if isinstance(record, dict) else None

    def _run_store(self, job: FineTuneJob) -> tuple[ObjectStore, str]:
        """The job's object store and the prefix of its run there (checkpoints and records)."""
        store = open_object_store(self.core, job.metadata.namespace, job.spec.output.uri, job.spec.storage)
        return store, run_prefix(job.metadata.namespace, job.metadata.name, job.metadata.uid or "local")

    def _published(self, job: FineTuneJob) -> tuple[PublishedAdapter, TrainingMetrics]:
        """What the job published and its training figures, read from object storage: the
        manifest is the proof."""
        store, prefix = self._run_store(job)
        record = read_published(store, prefix)
        if record is None:
            raise StorageError(f"{store.describe(prefix)}/published.json is missing")
        adapter = read_adapter(store, job.metadata.namespace, job.spec.output.adapterName, record["version"])
        metrics = adapter.manifest.metrics
        published = PublishedAdapter(
            name=adapter.name,
            version=adapter.version,
            uri=adapter.uri,
            sha256=adapter.manifest_sha256,
            validationLoss=metrics.adapter.validationLoss,
            baseValidationLoss=metrics.base.validationLoss,
            metrics=metrics.adapter.scores(),
            baseMetrics=metrics.base.scores(),
            promotion=adapter.manifest.promotion.model_dump(),
            fewShotMetrics=metrics.fewShot.scores(),
            trainSeconds=metrics.trainSeconds,
            gpuSeconds=metrics.gpuSeconds,
            tokensSeen=metrics.tokensSeen,
            cost=metrics.cost if metrics.cost is not None else run_cost(metrics.gpuSeconds or 0.0, self._price),
            estimatedSeconds=(metrics.estimate or {}).get("seconds"),
        )
        return published, metrics

    # -- bookkeeping -----------------------------------------------------------------------------

    @staticmethod
    def _key(body: dict[str, Any]) -> str:
        return f"{body['metadata']['namespace']}/{body['metadata']['name']}"

    def _record_transition(self, body: dict[str, Any], old: Phase, status: FineTuneJobStatus) -> None:
        new = status.phase
        self.metrics.phases.set(self._key(body), new)
        overfitting = condition_of(status.conditions, "Overfitting")
        if overfitting is not None and overfitting.status == "True" and not _was_overfitting(body):
            # Once, when the condition turns True (while training or at the end), like the phase Events.
            post_event(self.core, body, "Warning", "Overfitting", overfitting.message)
        if old is new and body.get("status"):
            return
        self.metrics.transitions.labels(old.value, new.value).inc()
        post_event(self.core, body, "Warning" if new is Phase.failed else "Normal", new.value, status.message)
        promoted = condition_of(status.conditions, "Promoted")
        if new is Phase.succeeded and promoted is not None:
            # Once, with the phase change: a version that fails its gate is news for whoever serves it.
            if promoted.status == "False":
                self.metrics.not_promoted.inc()
                post_event(self.core, body, "Warning", "NotPromoted", promoted.message)
            else:
                post_event(self.core, body, "Normal", "Promoted", promoted.message)


def _job_name(job: FineTuneJob) -> str:
    """What status.jobName names: the Job, or a multi-node job's Indexed Job (or its per-rank Jobs' prefix)."""
    if job.spec.resources.nodes > 1:
        return multinode.group_job_name(job.metadata.name)
    return jobbuilder.job_name(job.metadata.name)


def _refuse_spec_change(job: FineTuneJob, existing: dict[str, Any], status: FineTuneJobStatus) -> None:
    built_from = (existing["metadata"].get("annotations") or {}).get(jobbuilder.ANNOTATION_SPEC_HASH)
    if built_from and built_from != jobbuilder.spec_hash(job):
        set_condition(
            status.conditions,
            "SpecChangeRefused",
            "True",
            "JobAlreadyStarted",
            "the spec changed after the Job started; the running Job keeps the spec it started with. "
            "Only spec.cancel and spec.suspend may change now: cancel and create a new FineTuneJob to apply changes",
        )


def progress_of(record: dict[str, Any]) -> Progress | None:
    """The Progress fields of a trainer's /progress record (None when it has none yet)."""
    fields = {key: record[key] for key in Progress.model_fields if record.get(key) is not None}
    return Progress(**fields) if fields else None


def overfitting_condition(verdict: OverfittingRecord) -> tuple[str, str, str, str]:
    """The `Overfitting` condition's type, status, reason and message for the trainer's verdict."""
    if not verdict.detected or not verdict.rule:
        return "Overfitting", "False", "NoSignal", verdict.reason
    # The rule's name as a CamelCase reason: risingValidationLoss -> RisingValidationLoss.
    return "Overfitting", "True", verdict.rule[0].upper() + verdict.rule[1:], verdict.reason


def _was_overfitting(body: dict[str, Any]) -> bool:
    """Whether the stored status already said so (its Event was posted then)."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Overfitting" and c.get("status") == "True" for c in conditions)
