"""kopf handlers: each one hands the object to its reconciler, which writes back its status.

A FineTuneJob whose generation its status has not observed yet (a new job, a spec change, a
cancel) is reconciled as soon as its watch event arrives; the resync loop reconciles every
unfinished one again every few seconds. ModelServers (their pods and adapters) and Adapters (a
newer registry version, a failed check to retry) react to creates and spec changes, and timers
revisit them at their own pace. That is what makes the operator level-triggered and restart-safe:
nothing depends on having seen a particular event.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tuneloom.api import API_GROUP, API_VERSION
from tuneloom.metrics import serve_metrics
from tuneloom.operator.adapters import AdapterReconciler
from tuneloom.operator.common import ADAPTERS, MODELSERVERS
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.metrics import OperatorMetrics
from tuneloom.operator.reconciler import PLURAL, TERMINAL, Reconciler
from tuneloom.operator.resync import Resync
from tuneloom.operator.servers import ServerReconciler

CONFIG = OperatorConfig.from_env()
_TERMINAL = {phase.value for phase in TERMINAL}


def _api_client() -> k8s.ApiClient:
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base in annotations: the CRD's status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tuneloom.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="tuneloom.dev")
    # The reconciler posts one event per phase change; kopf's per-handler events would drown them.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    serve_metrics(metrics.registry, CONFIG.metrics_port, CONFIG.bind_address)
    api = _api_client()
    memo.adapters = AdapterReconciler(api)
    memo.reconciler = Reconciler(CONFIG, api, metrics, memo.adapters)
    memo.servers = ServerReconciler(CONFIG, api, metrics)
    memo.resync = Resync(
        memo.reconciler.reconcile, memo.reconciler.list_training_objects, _is_finished, CONFIG.reconcile_interval_s
    )
    memo.resync.start()


@kopf.on.cleanup()
def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.stop()


def _is_finished(body: dict[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in _TERMINAL


def _unobserved(body: dict[str, Any]) -> bool:
    """Created, or its spec changed (which bumps the generation), since its status was written."""
    return (body.get("status") or {}).get("observedGeneration") != body["metadata"].get("generation")


# A low-level event handler rather than on.create/on.update: those make kopf write its own state
# into every object after each change, a second write per job that the status already covers.
@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_event(event: kopf.RawEvent, memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    job = dict(body)
    uid = job["metadata"]["uid"]
    if event["type"] == "DELETED":
        # The Job and its Pods go with the FineTuneJob through their owner references.
        memo.resync.forget(uid)
        memo.reconciler.forget(job)
        return
    memo.resync.track(job)
    if _unobserved(job):
        memo.reconciler.reconcile(job)


# -- Adapters ------------------------------------------------------------------------------------


@kopf.on.create(API_GROUP, API_VERSION, ADAPTERS)
@kopf.on.update(API_GROUP, API_VERSION, ADAPTERS, field="spec")
def on_adapter_change(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    memo.adapters.reconcile(dict(body))


@kopf.timer(API_GROUP, API_VERSION, ADAPTERS, interval=CONFIG.adapter_resync_interval_s)
def on_adapter_timer(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    memo.adapters.reconcile(dict(body))


@kopf.on.delete(API_GROUP, API_VERSION, ADAPTERS, optional=True)
def on_adapter_delete(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    # The registry keeps its versions: an Adapter object is a view of them, not their owner.
    memo.adapters.forget(dict(body))


# -- ModelServers --------------------------------------------------------------------------------


@kopf.on.create(API_GROUP, API_VERSION, MODELSERVERS)
@kopf.on.update(API_GROUP, API_VERSION, MODELSERVERS, field="spec")
def on_server_change(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    memo.servers.reconcile(dict(body))


@kopf.timer(API_GROUP, API_VERSION, MODELSERVERS, interval=CONFIG.server_sync_interval_s)
def on_server_timer(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    memo.servers.reconcile(dict(body))


@kopf.on.delete(API_GROUP, API_VERSION, MODELSERVERS, optional=True)
def on_server_delete(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    # The Deployment and the Service go with the ModelServer through their owner references.
    memo.servers.forget(dict(body))
