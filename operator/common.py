"""What every reconciler shares: conditions, Secrets, object stores, Events and spec parsing."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from tuneloom.api import API_GROUP, API_VERSION, StorageSpec
from tuneloom.jobfile import SpecError, _describe, _field_path
from tuneloom.storage import ObjectStore, S3Connection, StorageError, open_store

log = logging.getLogger("tuneloom.operator")

MANAGER = "tuneloom-operator"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
ADAPTERS = "adapters"
MODELSERVERS = "modelservers"

M = TypeVar("M", bound=BaseModel)


class SecretNotFoundError(StorageError):
    """A Secret the spec names does not exist."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict[str, Any]], kind: str, status: str, reason: str, message: str) -> None:
    """Upserts a condition; lastTransitionTime moves only when its status changes. Empty reason and
    message are left out: some API servers store "" as null, which the schema then rejects."""
    fields = {"status": status, "reason": reason, "message": message}
    for condition in conditions:
        if condition["type"] == kind:
            if condition["status"] != status:
                condition["lastTransitionTime"] = now()
            condition.pop("reason", None)
            condition.pop("message", None)
            condition.update({k: v for k, v in fields.items() if v})
            return
    conditions.append({"type": kind, **{k: v for k, v in fields.items() if v}, "lastTransitionTime": now()})


def status_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from `old` to `new` status: changed fields, and None for removed ones."""
    changes = {key: value for key, value in new.items() if old.get(key) != value}
    changes.update({key: None for key in old if key not in new})
    return changes


def call_json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A kubernetes-client call's reply as plain JSON. The client's model objects cost more CPU to
    build (and to turn back into dicts) than the request itself, which adds up over many jobs."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


def condition_of(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def parse_object(model: type[M], body: dict[str, Any]) -> M:
    """A custom object as its API model; SpecError names every problem as `kind/name: field: what`."""
    source = f"{str(body.get('kind', 'object')).lower()}/{(body.get('metadata') or {}).get('name')}"
    try:
        return model.model_validate({k: v for k, v in body.items() if k != "status"})
    except ValidationError as exc:
        raise SpecError(
            [
                f"{source}: {_field_path(e['loc']) or '(document)'}: {_describe(e)}"
                for e in exc.errors(include_url=False)
            ]
        ) from None


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
        "firstTimestamp": now(),
        "lastTimestamp": now(),
        "count": 1,
    }
    try:
        call_json(core.create_namespaced_event, meta["namespace"], event)
    except ApiException as exc:
        log.warning("could not post event %s on %s: %s", reason, meta["name"], exc.reason)
