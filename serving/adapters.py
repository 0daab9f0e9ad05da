"""The adapters a server may serve: names to versions, versions to verified local directories.

One `AdapterSource` per API-server process, shared by the HTTP middleware (which turns a
client's name into a pinned version and reports problems with the right status) and the vLLM
resolver (which hands vLLM the local directory). Everything here is synchronous, blocking I/O;
async callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloom.models import cache_dir, model_config_hash
from tuneloom.registry import ADAPTER_FILES, MANIFEST, download_adapter, list_versions, read_adapter
from tuneloom.serving import metrics
from tuneloom.serving.names import (
    AdapterError,
    AdapterNotFound,
    AdapterRef,
    CorruptAdapter,
    InvalidAdapterName,
    StorageUnavailable,
    WrongBaseModel,
    parse_model,
)
from tuneloom.storage import CorruptObjectError, ObjectNotFoundError, ObjectStore, StorageError, open_store

log = logging.getLogger("tuneloom.serving")

REGISTRY_SCHEME = "tuneloom://"  # lora_path of a runtime load request that names a registry version
# A version found damaged is not downloaded again for this long (it is immutable: it stays damaged).
DAMAGED_RETRY_S = 30.0


@dataclass(frozen=True)
class ServingSettings:
    """What `tuneloom serve` passes to the vLLM process, through the environment."""

    store_uri: str
    base_model_dir: Path
    served_model_name: str
    namespace: str = "default"
    allowed_namespaces: frozenset[str] = frozenset()  # beyond its own namespace, which is always allowed
    adapter_cache_dir: Path = field(default_factory=lambda: cache_dir() / "adapters")
    latest_ttl_s: float = 2.0  # how long "latest" (and a removed version) may lag the store
    max_request_bytes: int = 32 * 2**20  # the largest request body the middleware reads

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
            "TUNELOOM_MAX_REQUEST_BYTES": str(self.max_request_bytes),
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
            max_request_bytes=int(env.get("TUNELOOM_MAX_REQUEST_BYTES") or cls.max_request_bytes),
        )


@dataclass(frozen=True)
class ResolvedAdapter:
    ref: AdapterRef  # pinned to a committed version
    path: Path  # its verified local copy


class AdapterSource:
    def __init__(self, settings: ServingSettings, store: ObjectStore | None = None):
        self.settings = settings
        self._store = store
        self._base_config = model_config_hash(settings.base_model_dir)
        self._versions: dict[str, tuple[float, list[str]]] = {}
        self._manifests: dict[str, tuple[dict[str, Any], str]] = {}  # versions are immutable: cached for good
        self._damaged: dict[str, tuple[float, CorruptAdapter]] = {}
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

    def resolve(self, model: Any, *, require_version: bool = False) -> ResolvedAdapter:
        """A client's `model` as a committed version with a verified local copy.

        A pinned version must still be committed. "Latest" is the newest version that passes
        verification: a damaged one is skipped (logged and counted), so it cannot take the name down.
        """
        if not isinstance(model, str):
            raise InvalidAdapterName("'model' must be a string")
        ref = self.parse(model)
        if require_version and ref.version is None:
            raise InvalidAdapterName(f"{model!r}: a runtime load names one version, as NAMESPACE/NAME@VERSION")
        versions = self._committed_versions(ref)
        if ref.version is not None:
            if ref.version not in versions:
                raise self._failed(AdapterNotFound(f"adapter {ref.internal_name!r} does not exist in the registry"))
            return ResolvedAdapter(ref, self.local_dir(ref))
        if not versions:
            raise self._failed(
                AdapterNotFound(f"adapter {ref.key!r} does not exist: no committed version in the store")
            )
        damaged: CorruptAdapter | None = None
        for version in reversed(versions):
            pinned = ref.pinned(version)
            try:
                return ResolvedAdapter(pinned, self.local_dir(pinned))
            except CorruptAdapter as exc:
                damaged = damaged or exc
                metrics.skipped_versions.labels(ref.key).inc()
                log.warning("latest of %s skips version %s, which fails verification", ref.key, version)
        assert damaged is not None
        raise damaged

    def _committed_versions(self, ref: AdapterRef) -> list[str]:
        """Committed versions of an adapter, listed at most every `latest_ttl_s`."""
        cached = self._versions.get(ref.key)
        if cached and time.monotonic() - cached[0] < self.settings.latest_ttl_s:
            return cached[1]
        versions = self._storage_call(ref, lambda: list_versions(self.store, ref.namespace, ref.name))
        self._versions[ref.key] = (time.monotonic(), versions)
        return versions

    def check(self, ref: AdapterRef) -> dict[str, Any]:
        """The manifest of a pinned version, refused when it is inconsistent or for another base model."""
        manifest, _ = self._manifest(ref)
        base = manifest.get("baseModel") or {}
        if base.get("configSha256") and base["configSha256"] != self._base_config:
            trained_on = _without_path(str(base.get("name", "?")))
            raise WrongBaseModel(
                f"adapter {ref.internal_name!r} was trained on base model {trained_on!r}, "
                f"which is not the one this server runs ({self.settings.served_model_name!r}); serve it from a "
                "ModelServer with that base model",
                ref,
            )
        return manifest

    def _manifest(self, ref: AdapterRef) -> tuple[dict[str, Any], str]:
        """(manifest, its sha256), checked against the reference and the files an adapter needs."""
        cached = self._manifests.get(ref.internal_name)
        if cached is not None:
            return cached
        version = self._storage_call(ref, lambda: read_adapter(self.store, ref.namespace, ref.name, ref.version))
        manifest = version.manifest
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        problems = [f"it lists no {name}" for name in ADAPTER_FILES if name not in files]
        recorded = (manifest.get("namespace"), manifest.get("name"), manifest.get("version"))
        if recorded != (ref.namespace, ref.name, ref.version):
            problems.append("it names another adapter version")
        if problems:
            log.warning("adapter %s: manifest %s: %s", ref.internal_name, version.uri, "; ".join(problems))
            raise self._failed(
                CorruptAdapter(
                    f"adapter {ref.internal_name!r} is damaged in the store and is not served: its manifest is "
                    f"inconsistent ({'; '.join(problems)}); publish a new version",
                    ref,
                )
            )
        self._manifests[ref.internal_name] = (manifest, version.manifest_sha256)
        return manifest, version.manifest_sha256

    def local_dir(self, ref: AdapterRef) -> Path:
        """A verified local copy of a pinned version, downloaded on first use."""
        damaged = self._damaged.get(ref.internal_name)
        if damaged and time.monotonic() - damaged[0] < DAMAGED_RETRY_S:
            raise self._failed(damaged[1])
        self.check(ref)
        _, manifest_sha = self._manifest(ref)
        dest = self.settings.adapter_cache_dir / ref.namespace / ref.name / str(ref.version)
        with self._lock(ref.internal_name):
            if dest.is_dir() and _sha256_of(dest / MANIFEST) == manifest_sha:
                metrics.cache_hits.labels(ref.key).inc()
                return dest
            # A copy of another manifest (the version was removed and published again) is not trusted.
            shutil.rmtree(dest, ignore_errors=True)
            metrics.cache_misses.labels(ref.key).inc()
            started = time.monotonic()
            dest.parent.mkdir(parents=True, exist_ok=True)
            # download_adapter verifies every checksum in a staging folder and moves it into
            # place only when all match: a partial or corrupt download never appears at `dest`.
            try:
                self._storage_call(
                    ref, lambda: download_adapter(self.store, ref.namespace, ref.name, ref.version, dest)
                )
            except CorruptAdapter as exc:
                self._damaged[ref.internal_name] = (time.monotonic(), exc)
                raise
            metrics.load_duration.labels(ref.key).observe(time.monotonic() - started)
            log.info("fetched adapter %s in %.2f s", ref.internal_name, time.monotonic() - started)
            return dest

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _storage_call(self, ref: AdapterRef, call):
        """Runs a registry read; a failure becomes an AdapterError whose message names no server path
        (the log line has the details)."""
        try:
            return call()
        except ObjectNotFoundError as exc:
            detail, error = exc, AdapterNotFound(f"adapter {_shown(ref)!r} does not exist in the registry")
        except CorruptObjectError as exc:
            detail, error = (
                exc,
                CorruptAdapter(
                    f"adapter {_shown(ref)!r} is damaged in the store and is not served: a file does not match its "
                    "manifest; publish a new version"
                ),
            )
        except (StorageError, OSError) as exc:
            detail, error = exc, StorageUnavailable(f"adapter {_shown(ref)!r}: the object store could not be read")
        log.warning("adapter %s: %s", _shown(ref), detail)
        error.ref = ref
        raise self._failed(error)

    @staticmethod
    def _failed(error: AdapterError) -> AdapterError:
        metrics.load_failures.labels(error.metrics_label, error.reason).inc()
        return error


def _shown(ref: AdapterRef) -> str:
    return ref.internal_name if ref.version else ref.key


def _without_path(name: str) -> str:
    """A base model's name as a client may see it: a hub id as is, a directory or URI by its last part."""
    return name.rstrip("/").rsplit("/", 1)[-1] if name.startswith(("/", ".", "file:", "s3:")) else name


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
