"""The adapters a server may serve: names to versions, versions to verified local directories.

One `AdapterSource` per API-server process, shared by the HTTP middleware (which turns a
client's name into a pinned version and reports problems with the right status) and the vLLM
resolver (which hands vLLM the local directory). Everything here is synchronous, blocking I/O;
async callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloom.models import cache_dir, model_config_hash
from tuneloom.registry import download_adapter, list_versions, read_adapter
from tuneloom.serving import metrics
from tuneloom.serving.names import (
    AdapterError,
    AdapterNotFound,
    AdapterRef,
    CorruptAdapter,
    StorageUnavailable,
    WrongBaseModel,
    parse_model,
)
from tuneloom.storage import CorruptObjectError, ObjectNotFoundError, ObjectStore, StorageError, open_store

log = logging.getLogger("tuneloom.serving")

REGISTRY_SCHEME = "tuneloom://"  # lora_path of a runtime load request that names a registry version


@dataclass(frozen=True)
class ServingSettings:
    """What `tuneloom serve` passes to the vLLM process, through the environment."""

    store_uri: str
    base_model_dir: Path
    served_model_name: str
    namespace: str = "default"
    allowed_namespaces: frozenset[str] = frozenset()  # beyond its own namespace, which is always allowed
    adapter_cache_dir: Path = field(default_factory=lambda: cache_dir() / "adapters")
    latest_ttl_s: float = 2.0  # how long "latest" may lag a newly published version

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_namespaces", frozenset(self.allowed_namespaces) | {self.namespace})

    def to_env(self) -> dict[str, str]:
        return {
            "TUNELOOM_STORE": self.store_uri,
            "TUNELOOM_BASE_MODEL_DIR": str(self.base_model_dir),
            "TUNELOOM_SERVED_MODEL_NAME": self.served_model_name,
            "TUNELOOM_SERVING_NAMESPACE": self.namespace,
            "TUNELOOM_ALLOWED_NAMESPACES": ",".join(sorted(self.allowed_namespaces)),
            "TUNELOOM_ADAPTER_CACHE_DIR": str(self.adapter_cache_dir),
            "TUNELOOM_LATEST_TTL_SECONDS": str(self.latest_ttl_s),
        }

    @classmethod
    def from_env(cls) -> ServingSettings | None:
        """None when the process was not started by `tuneloom serve` (the plugin then stays idle)."""
        env = os.environ
        if not env.get("TUNELOOM_STORE"):
            return None
        allowed = frozenset(n for n in env.get("TUNELOOM_ALLOWED_NAMESPACES", "").split(",") if n)
        return cls(
            store_uri=env["TUNELOOM_STORE"],
            base_model_dir=Path(env["TUNELOOM_BASE_MODEL_DIR"]),
            served_model_name=env["TUNELOOM_SERVED_MODEL_NAME"],
            namespace=env.get("TUNELOOM_SERVING_NAMESPACE", "default"),
            allowed_namespaces=allowed,
            adapter_cache_dir=Path(env.get("TUNELOOM_ADAPTER_CACHE_DIR") or cache_dir() / "adapters"),
            latest_ttl_s=float(env.get("TUNELOOM_LATEST_TTL_SECONDS", "2")),
        )


class AdapterSource:
    def __init__(self, settings: ServingSettings, store: ObjectStore | None = None):
        self.settings = settings
        self._store = store
        self._base_config = model_config_hash(settings.base_model_dir)
        self._latest: dict[str, tuple[float, str]] = {}
        self._manifests: dict[str, dict[str, Any]] = {}  # versions are immutable: cached for good
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.settings.store_uri)
        return self._store

    def is_base_model(self, model: str) -> bool:
        return model == self.settings.served_model_name

    def parse(self, model: str) -> AdapterRef:
        return parse_model(model, self.settings.namespace, self.settings.allowed_namespaces)

    def pin(self, ref: AdapterRef) -> AdapterRef:
        """The same reference with a version: the latest committed one unless it names one."""
        if ref.version is not None:
            return ref
        cached = self._latest.get(ref.key)
        if cached and time.monotonic() - cached[0] < self.settings.latest_ttl_s:
            return ref.pinned(cached[1])
        versions = self._storage_call(ref, lambda: list_versions(self.store, ref.namespace, ref.name))
        if not versions:
            error = AdapterNotFound(f"adapter {ref.key!r} does not exist: no committed version in the store", ref)
            metrics.load_failures.labels(error.metrics_label, error.reason).inc()
            raise error
        self._latest[ref.key] = (time.monotonic(), versions[-1])
        return ref.pinned(versions[-1])

    def check(self, ref: AdapterRef) -> dict[str, Any]:
        """The manifest of a pinned version, refused when it was trained on another base model."""
        manifest = self._manifests.get(ref.internal_name)
        if manifest is None:
            manifest = self._storage_call(
                ref, lambda: read_adapter(self.store, ref.namespace, ref.name, ref.version).manifest
            )
            self._manifests[ref.internal_name] = manifest
        base = manifest.get("baseModel", {})
        if base.get("configSha256") and base["configSha256"] != self._base_config:
            raise WrongBaseModel(
                f"adapter {ref.internal_name!r} was trained on base model {base.get('name', '?')!r}, which is not "
                f"the one this server runs ({self.settings.served_model_name!r}); serve it from a ModelServer "
                "with that base model",
                ref,
            )
        return manifest

    def local_dir(self, ref: AdapterRef) -> Path:
        """A verified local copy of a pinned version, downloaded on first use."""
        self.check(ref)
        dest = self.settings.adapter_cache_dir / ref.namespace / ref.name / str(ref.version)
        with self._lock(ref.internal_name):
            if dest.is_dir():
                metrics.cache_hits.labels(ref.key).inc()
                return dest
            metrics.cache_misses.labels(ref.key).inc()
            started = time.monotonic()
            dest.parent.mkdir(parents=True, exist_ok=True)
            # download_adapter verifies every checksum in a staging folder and moves it into
            # place only when all match: a partial or corrupt download never appears at `dest`.
            self._storage_call(ref, lambda: download_adapter(self.store, ref.namespace, ref.name, ref.version, dest))
            metrics.load_duration.labels(ref.key).observe(time.monotonic() - started)
            log.info("fetched adapter %s in %.2f s", ref.internal_name, time.monotonic() - started)
            return dest

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _storage_call(self, ref: AdapterRef, call):
        try:
            return call()
        except ObjectNotFoundError as exc:
            error: AdapterError = AdapterNotFound(f"adapter {_shown(ref)!r} does not exist: {exc}")
        except CorruptObjectError as exc:
            error = CorruptAdapter(f"adapter {_shown(ref)!r} is damaged in the store and is not served: {exc}")
        except (StorageError, OSError) as exc:
            error = StorageUnavailable(f"adapter {_shown(ref)!r}: the object store could not be read: {exc}")
        error.ref = ref
        metrics.load_failures.labels(error.metrics_label, error.reason).inc()
        raise error


def _shown(ref: AdapterRef) -> str:
    return ref.internal_name if ref.version else ref.key
