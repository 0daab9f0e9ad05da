"""kopf handlers: each one hands the object to its reconciler, which writes back its status.

Create and spec changes react at once; timers reconcile every non-terminal FineTuneJob every few
seconds, every ModelServer (its pods and their adapters) and every Adapter (a newer registry
version, a failed check to retry) at their own pace. That is what makes the operator
level-triggered and restart-safe: nothing depends on having seen an event.
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


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
def on_change(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    memo.reconciler.reconcile(dict(body))


@kopf.timer(
    API_GROUP,
    API_VERSION,
    PLURAL,
    interval=CONFIG.reconcile_interval_s,
    # kopf starts a timer at once by default; the create handler has just reconciled the job.
    initial_delay=CONFIG.reconcile_interval_s,
    when=lambda status, **_: status.get("phase") not in _TERMINAL,
)
def on_timer(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    memo.reconciler.reconcile(dict(body))


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, optional=True)
def on_delete(memo: kopf.Memo, body: kopf.Body, **_: Any) -> None:
    # The Job, its Pods and the ConfigMap go with the FineTuneJob through their owner references.
    memo.reconciler.forget(dict(body))


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
