"""The adapters a server may serve: names to versions, versions to verified local directories.

One `AdapterCatalog` per API-server process. The HTTP middleware resolves each request's name
once (to a pinned version and its verified local copy) and reports problems with the right
status; the vLLM resolver then takes the local copy the middleware resolved. Everything here is
synchronous, blocking I/O; async callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tuneloom.locks import KeyedLocks
from tuneloom.models import cache_dir, model_config_hash
from tuneloom.names import AdapterId
from tuneloom.registry import ADAPTER_FILES, MANIFEST, AdapterVersion, download_adapter, list_versions, read_adapter
from tuneloom.serving import metrics
from tuneloom.serving.names import (
    AdapterError,
    AdapterNotFound,
    CorruptAdapter,
    InvalidAdapterName,
    NotPromoted,
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
    # Serve a pinned unpromoted version (for inspection); "latest" never means one.
    allow_unpromoted: bool = False

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
            "TUNELOOM_ALLOW_UNPROMOTED": "1" if self.allow_unpromoted else "0",
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
            allow_unpromoted=env.get("TUNELOOM_ALLOW_UNPROMOTED", "0").lower() in ("1", "true", "yes"),
        )


@dataclass(frozen=True)
class ResolvedAdapter:
    adapter: AdapterId  # pinned to a committed version
    path: Path  # its verified local copy


_T = TypeVar("_T")


class AdapterCatalog:
    def __init__(self, settings: ServingSettings, store: ObjectStore | None = None):
        self.settings = settings
        self._store = store
        self._base_config = model_config_hash(settings.base_model_dir)
        self._versions: dict[str, tuple[float, list[str]]] = {}
        self._manifests: dict[str, AdapterVersion] = {}  # versions are immutable: cached for good
        self._damaged: dict[str, tuple[float, CorruptAdapter]] = {}
        self._resolved: dict[str, Path] = {}  # served name -> local copy, for the vLLM resolver
        self._locks = KeyedLocks()

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.settings.store_uri)
        return self._store

    def is_base_model(self, model: str) -> bool:
        return model == self.settings.served_model_name

    def parse(self, model: str) -> AdapterId:
        return parse_model(model, self.settings.namespace, self.settings.allowed_namespaces)

    def resolve(self, model: Any, *, require_version: bool = False) -> ResolvedAdapter:
        """A client's `model` as a committed version with a verified local copy.

        A pinned version must still be committed, and promoted unless the server allows unpromoted
        ones. "Latest" is the newest promoted version that passes verification: an unpromoted one is
        passed over, and a damaged one is skipped (logged and counted), so it cannot take the name down.
        """
        if not isinstance(model, str):
            raise InvalidAdapterName("'model' must be a string")
        adapter = self.parse(model)
        if require_version and adapter.version is None:
            raise InvalidAdapterName(f"{model!r}: a runtime load names one version, as NAMESPACE/NAME@VERSION")
        versions = self._committed_versions(adapter)
        if adapter.version is not None:
            if adapter.version not in versions:
                raise self._failed(AdapterNotFound(f"adapter {str(adapter)!r} does not exist in the registry"))
            if not self.settings.allow_unpromoted and (refused := self._unpromoted(adapter)) is not None:
                raise self._failed(refused)
            return self._resolved_copy(adapter)
        if not versions:
            raise self._failed(
                AdapterNotFound(f"adapter {adapter.key!r} does not exist: no committed version in the store")
            )
        passed_over: AdapterError | None = None
        for version in reversed(versions):
            pinned = adapter.pinned(version)
            try:
                if (refused := self._unpromoted(pinned)) is not None:
                    passed_over = passed_over or refused
                    continue
                return self._resolved_copy(pinned)
            except CorruptAdapter as exc:
                passed_over = passed_over or exc
                metrics.skipped_versions.labels(adapter.key).inc()
                log.warning("latest of %s skips version %s, which fails verification", adapter.key, version)
        assert passed_over is not None
        if isinstance(passed_over, NotPromoted):
            raise self._failed(
                NotPromoted(
                    f"adapter {adapter.key!r} has no promoted version to serve; the newest: {passed_over}", adapter
                )
            )
        raise passed_over  # counted where it was found

    def _unpromoted(self, adapter: AdapterId) -> NotPromoted | None:
        """Why a pinned version is not served by its promotion gate (None: it was promoted, or its
        manifest predates the gate)."""
        promotion = self._verified_manifest(adapter).manifest.promotion
        if promotion.promoted:
            return None
        why = "; ".join(promotion.reasons) or "no reason recorded"
        return NotPromoted(
            f"adapter {str(adapter)!r} was not promoted ({why}); it is kept as evidence but not served. "
            "Serve it for inspection with a ModelServer's allowUnpromoted or tuneloom serve --allow-unpromoted",
            adapter,
        )

    def resolved_path(self, served_name: str) -> Path | None:
        """The local copy of a version `resolve` returned, by its served name (None: never resolved)."""
        return self._resolved.get(served_name)

    def _resolved_copy(self, adapter: AdapterId) -> ResolvedAdapter:
        path = self.local_dir(adapter)
        self._resolved[adapter.served_name] = path
        return ResolvedAdapter(adapter, path)

    def _committed_versions(self, adapter: AdapterId) -> list[str]:
        """Committed versions of an adapter, listed at most every `latest_ttl_s`."""
        cached = self._versions.get(adapter.key)
        if cached and time.monotonic() - cached[0] < self.settings.latest_ttl_s:
            return cached[1]
        versions = self._storage_call(adapter, lambda: list_versions(self.store, adapter.namespace, adapter.name))
        self._versions[adapter.key] = (time.monotonic(), versions)
        return versions

    def _verified_manifest(self, adapter: AdapterId) -> AdapterVersion:
        """A pinned version's manifest, refused when it lacks an adapter's files or is for another base model."""
        found = self._manifests.get(adapter.served_name)
        if found is not None:
            return found
        found = self._storage_call(
            adapter, lambda: read_adapter(self.store, adapter.namespace, adapter.name, adapter.version)
        )
        missing = [name for name in ADAPTER_FILES if name not in found.manifest.files]
        if missing:
            log.warning("adapter %s: manifest %s lists no %s", adapter, found.uri, ", ".join(missing))
            raise self._failed(
                CorruptAdapter(
                    f"adapter {str(adapter)!r} is damaged in the store and is not served: its manifest lists no "
                    f"{', '.join(missing)}; publish a new version",
                    adapter,
                )
            )
        base = found.manifest.baseModel
        if base.configSha256 and base.configSha256 != self._base_config:
            raise WrongBaseModel(
                f"adapter {str(adapter)!r} was trained on base model {_without_path(str(base.name or '?'))!r}, "
                f"which is not the one this server runs ({self.settings.served_model_name!r}); serve it from a "
                "ModelServer with that base model",
                adapter,
            )
        self._manifests[adapter.served_name] = found
        return found

    def local_dir(self, adapter: AdapterId) -> Path:
        """A verified local copy of a pinned version, downloaded on first use."""
        damaged = self._damaged.get(adapter.served_name)
        if damaged and time.monotonic() - damaged[0] < DAMAGED_RETRY_S:
            raise self._failed(damaged[1])
        manifest_sha = self._verified_manifest(adapter).manifest_sha256
        dest = self.settings.adapter_cache_dir / adapter.namespace / adapter.name / str(adapter.version)
        with self._locks.lock(adapter.served_name):
            if dest.is_dir() and _sha256_of(dest / MANIFEST) == manifest_sha:
                metrics.cache_hits.labels(adapter.key).inc()
                return dest
            # A copy of another manifest (the version was removed and published again) is not trusted.
            shutil.rmtree(dest, ignore_errors=True)
            metrics.cache_misses.labels(adapter.key).inc()
            started = time.monotonic()
            dest.parent.mkdir(parents=True, exist_ok=True)
            # download_adapter verifies every checksum in a staging folder and moves it into
            # place only when all match: a partial or corrupt download never appears at `dest`.
            try:
                self._storage_call(
                    adapter,
                    lambda: download_adapter(self.store, adapter.namespace, adapter.name, adapter.version, dest),
                )
            except CorruptAdapter as exc:
                self._damaged[adapter.served_name] = (time.monotonic(), exc)
                raise
            metrics.load_duration.labels(adapter.key).observe(time.monotonic() - started)
            log.info("fetched adapter %s in %.2f s", adapter, time.monotonic() - started)
            return dest

    def _storage_call(self, adapter: AdapterId, call: Callable[[], _T]) -> _T:
        """Runs a registry read; a failure becomes an AdapterError whose message names no server path
        (the log line has the details)."""
        shown = str(adapter)
        try:
            return call()
        except ObjectNotFoundError as exc:
            detail, error = exc, AdapterNotFound(f"adapter {shown!r} does not exist in the registry")
        except CorruptObjectError as exc:
            detail, error = (
                exc,
                CorruptAdapter(
                    f"adapter {shown!r} is damaged in the store and is not served: its manifest or a file does "
                    "not check out; publish a new version"
                ),
            )
        except (StorageError, OSError) as exc:
            detail, error = exc, StorageUnavailable(f"adapter {shown!r}: the object store could not be read")
        log.warning("adapter %s: %s", shown, detail)
        error.adapter = adapter
        raise self._failed(error)

    @staticmethod
    def _failed(error: AdapterError) -> AdapterError:
        metrics.load_failures.labels(error.metrics_label, error.reason).inc()
        return error


def _without_path(name: str) -> str:
    """A base model's name as a client may see it: a hub id as is, a directory or URI by its last part."""
    return name.rstrip("/").rsplit("/", 1)[-1] if name.startswith(("/", ".", "file:", "s3:")) else name


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
