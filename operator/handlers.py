"""kopf handlers: each one hands the object to its reconciler, which writes back its status.

An object whose generation its status has not observed yet (new, its spec changed, a job
cancelled) is reconciled as soon as its watch event arrives. A resync loop per kind reconciles
every object again at that kind's pace: unfinished FineTuneJobs every few seconds (pods, progress,
a free slot), ModelServers (their pods and adapters) and Adapters (a newer registry version, a
failed check to retry) less often. That is what makes the operator level-triggered and
restart-safe: nothing depends on having seen a particular event.

Low-level event handlers rather than kopf's on.create/on.update and timers: those make kopf write
its own state into every object (an annotation after each change, a finalizer for the timers),
one more write per change, and a delete that hangs whenever the operator is down. The operator
writes only `status`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import kopf

from tuneloom.api import API_GROUP, API_VERSION, FineTuneJobStatus
from tuneloom.metrics import serve_metrics
from tuneloom.operator.adapters import AdapterReconciler
from tuneloom.operator.common import ADAPTERS, MODELSERVERS, api_client, read_status
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.metrics import OperatorMetrics
from tuneloom.operator.reconciler import PLURAL, TERMINAL, FineTuneJobReconciler
from tuneloom.operator.resync import Resync
from tuneloom.operator.servers import ServerReconciler

CONFIG = OperatorConfig.from_env()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The reconcilers post one event per phase change; kopf's per-handler events would drown them.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.execution.max_workers = CONFIG.handler_threads
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    serve_metrics(metrics.registry, CONFIG.metrics_port, CONFIG.bind_address)
    api = api_client()
    memo.adapters = AdapterReconciler(api)
    memo.reconciler = FineTuneJobReconciler(CONFIG, api, metrics, memo.adapters)
    memo.servers = ServerReconciler(CONFIG, api, metrics)
    memo.resyncs = {
        PLURAL: Resync(
            memo.reconciler.reconcile,
            memo.reconciler.list_training_objects,
            _is_finished,
            CONFIG.reconcile_interval_s,
        ),
        ADAPTERS: _resync_each(memo.adapters.reconcile, CONFIG.adapter_resync_interval_s),
        MODELSERVERS: _resync_each(memo.servers.reconcile, CONFIG.server_sync_interval_s),
    }
    for resync in memo.resyncs.values():
        resync.start()


@kopf.on.cleanup()
def stop_resyncs(memo: kopf.Memo, **_: Any) -> None:
    for resync in memo.resyncs.values():
        resync.stop()


class _Reconciles(Protocol):
    def reconcile(self, body: dict[str, Any]) -> Any: ...

    def forget(self, body: dict[str, Any]) -> None: ...


def _resync_each(reconcile: Callable[[dict[str, Any]], Any], interval_s: float) -> Resync[None]:
    """A resync loop for objects that never finish and whose reconciles need no shared listing."""
    return Resync(lambda body, _: reconcile(body), lambda: None, lambda _: False, interval_s)


def _is_finished(body: dict[str, Any]) -> bool:
    return read_status(FineTuneJobStatus, body).phase in TERMINAL


def _unobserved(body: dict[str, Any]) -> bool:
    """Created, or its spec changed (which bumps the generation), since its status was written."""
    return (body.get("status") or {}).get("observedGeneration") != body["metadata"].get("generation")


def _on_event(event: kopf.RawEvent, body: kopf.Body, reconciler: _Reconciles, resync: Resync[Any]) -> None:
    obj = dict(body)
    if event["type"] == "DELETED":
        resync.forget(obj["metadata"]["uid"])
        reconciler.forget(obj)
        return
    resync.track(obj)
    if _unobserved(obj):
        reconciler.reconcile(obj)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_job_event(event: kopf.RawEvent, memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    # Once deleted, its Job and Pods go with it through their owner references.
    _on_event(event, body, memo.reconciler, memo.resyncs[PLURAL])


@kopf.on.event(API_GROUP, API_VERSION, ADAPTERS)
def on_adapter_event(event: kopf.RawEvent, memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    # Once deleted, the registry keeps its versions: an Adapter object is a view of them, not their owner.
    _on_event(event, body, memo.adapters, memo.resyncs[ADAPTERS])


@kopf.on.event(API_GROUP, API_VERSION, MODELSERVERS)
def on_server_event(event: kopf.RawEvent, memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    # Once deleted, its Deployment and Service go with it through their owner references.
    _on_event(event, body, memo.servers, memo.resyncs[MODELSERVERS])
