"""Bringing a job's inputs (datasets, base model) from object storage onto local disk."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from tuneloom.models import cache_dir, find_prepared
from tuneloom.storage import ObjectStore, open_store

log = logging.getLogger("tuneloom.trainer")


def _is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :]) if uri.startswith("file://") else Path(uri)


def _split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b/name -> (s3://bucket/a/b, name)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return parent, name


def _download_cache(kind: str, uri: str) -> Path:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_dir() / kind / digest


def fetch_file(uri: str) -> Path:
    """A local path holding the file at `uri` (downloaded to the cache when remote)."""
    if not _is_remote(uri):
        return local_path(uri)
    parent, name = _split_s3(uri)
    dest = _download_cache("datasets", uri) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Always fetched again: a dataset at a URI may be replaced, and the manifest records its hash.
    open_store(parent).download_file(name, dest)
    return dest


def _download_prefix(store: ObjectStore, dest: Path) -> None:
    keys = list(store.list(""))
    if not keys:
        raise FileNotFoundError(f"{store.uri}: no files under this prefix; expected a Hugging Face model directory")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for number, key in enumerate(keys, 1):
        log.info("downloading base model file %d/%d: %s", number, len(keys), key)
        target = staging / key
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, target)
    staging.rename(dest)


def resolve_base_model(base_model: str) -> str:
    """What `from_pretrained` should load: a local directory, or a hub id as a last resort."""
    if _is_remote(base_model):
        dest = _download_cache("base-models", base_model)
        if not dest.exists():
            _download_prefix(open_store(base_model), dest)
        return str(dest)
    path = local_path(base_model)
    if path.is_dir():
        return str(path)
    if base_model.startswith(("file://", "/", ".")):
        raise FileNotFoundError(f"spec.baseModel: directory {path} does not exist")
    prepared = find_prepared(base_model)
    return str(prepared) if prepared else base_model
