"""What every reconciler shares: typed status and conditions, Secrets, object stores, Events and
spec parsing."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from tuneloom.api import API_GROUP, API_VERSION, Condition, StorageSpec
from tuneloom.jobfile import parse_document
from tuneloom.storage import ObjectStore, S3Connection, StorageError, open_store

log = logging.getLogger("tuneloom.operator")

MANAGER = "tuneloom-operator"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
ADAPTERS = "adapters"
MODELSERVERS = "modelservers"

M = TypeVar("M", bound=BaseModel)


class SecretNotFoundError(StorageError):
    """A Secret the spec names does not exist."""


def api_client() -> k8s.ApiClient:
    """In a pod, its ServiceAccount's; elsewhere KUBECONFIG's."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


def now() -> datetime:
    """The time to the second, as Kubernetes timestamps are written."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def read_status(model: type[M], body: dict[str, Any], **first: Any) -> M:
    """The object's status as its model; none yet is an empty one. `first`: fields every pass writes,
    with the value a new object starts from.

    Only the fields the stored status holds (and those `first` names) count as set, and status_patch
    writes no other: a field another writer owns (an Adapter's loadedOn) or one this pass never
    reached keeps what is stored instead of getting its default. A field that does not validate
    (a hand-edited status) is dropped, and the patch then deletes it."""
    stored = body.get("status")
    stored = stored if isinstance(stored, dict) else {}
    try:
        return model.model_validate({**first, **stored})
    except ValidationError as exc:
        bad = {error["loc"][0] for error in exc.errors(include_url=False) if error["loc"]}
        meta = body.get("metadata") or {}
        log.warning("%s/%s: dropping unreadable status fields %s", meta.get("namespace"), meta.get("name"), bad)
        return model.model_validate({**first, **{key: value for key, value in stored.items() if key not in bad}})


def status_patch(old: dict[str, Any], new: BaseModel) -> dict[str, Any]:
    """A merge patch from the stored status `old` to `new`: its changed fields, and None (which
    deletes) for a field it no longer has, such as one set to None."""
    wanted = new.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    changes = {key: value for key, value in wanted.items() if old.get(key) != value}
    changes.update({key: None for key in old if key not in wanted})
    return changes


def set_condition(conditions: list[Condition], kind: str, status: str, reason: str, message: str) -> None:
    """Upserts a condition; lastTransitionTime moves only when its status changes. Empty reason and
    message are left out: some API servers store "" as null, which the schema then rejects."""
    old = condition_of(conditions, kind)
    since = old.lastTransitionTime if old is not None and old.status == status else now()
    texts = {key: text for key, text in (("reason", reason), ("message", message)) if text}
    condition = Condition(type=kind, status=status, lastTransitionTime=since, **texts)
    if old is None:
        conditions.append(condition)
    else:
        conditions[conditions.index(old)] = condition


def condition_of(conditions: list[Condition], kind: str) -> Condition | None:
    return next((condition for condition in conditions if condition.type == kind), None)


def call_json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A kubernetes-client call's reply as plain JSON. The client's model objects cost more CPU to
    build (and to turn back into dicts) than the request itself, which adds up over many jobs."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


def parse_object(model: type[M], body: dict[str, Any]) -> M:
    """A custom object's spec as its API model (its status is read apart, by read_status); SpecError
    names every problem as `kind/name: field: what`."""
    source = f"{str(body.get('kind', 'object')).lower()}/{(body.get('metadata') or {}).get('name')}"
    return parse_document(model, {k: v for k, v in body.items() if k != "status"}, source=source)


def read_custom(custom: k8s.CustomObjectsApi, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def read_secret(core: k8s.CoreV1Api, namespace: str, name: str) -> dict[str, str] | None:
    """The Secret's decoded data, or None when it does not exist. Values stay in memory: they never
    go into a status, an Event or a log line."""
    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


def open_object_store(core: k8s.CoreV1Api, namespace: str, uri: str, storage: StorageSpec) -> ObjectStore:
    """The store at `uri`, reached with the connection `storage` names and the keys in its Secret
    (read in `namespace`). Without a Secret, boto3 falls back to the operator's own identity (its
    environment, IRSA)."""
    if not uri.startswith("s3://"):
        return open_store(uri)
    keys: dict[str, str] = {}
    if storage.credentialsSecret:
        found = read_secret(core, namespace, storage.credentialsSecret)
        if found is None:
            raise SecretNotFoundError(
                f"Secret {namespace}/{storage.credentialsSecret} (storage.credentialsSecret) does not exist; create it "
                "with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        keys = found
    connection = S3Connection(
        endpoint=storage.endpoint,
        region=storage.region,
        access_key_id=keys.get("AWS_ACCESS_KEY_ID"),
        secret_access_key=keys.get("AWS_SECRET_ACCESS_KEY"),
    )
    return open_store(uri, connection=connection)


def post_event(core: k8s.CoreV1Api, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """An Event on `body`. An event is news, not state: failing to post one never fails a reconcile."""
    meta = body["metadata"]
    stamp = now().strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGER},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        call_json(core.create_namespaced_event, meta["namespace"], event)
    except ApiException as exc:
        log.warning("could not post event %s on %s: %s", reason, meta["name"], exc.reason)
