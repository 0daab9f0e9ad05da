"""Bringing inputs (base models, datasets) from object storage onto local disk, for the trainer
and the server alike, and telling early, with the setting named, when they are not there."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from contextlib import suppress
from pathlib import Path

from tuneloom.models import cache_dir, config_hash, find_prepared, known_model, model_config_hash
from tuneloom.storage import ObjectStore, StorageError, open_store

log = logging.getLogger("tuneloom.inputs")


def _is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :]) if uri.startswith("file://") else Path(uri)


def split_s3(uri: str) -> tuple[str, str]:
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
    parent, name = split_s3(uri)
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


class BaseModelUnavailableError(FileNotFoundError):
    """The base model is not where its setting says, or cannot be had without a download that
    is not allowed or not possible; the message names the setting and what to do."""


# Long enough for the hub to answer a HEAD request; short enough that an unreachable hub costs
# seconds, not the minute of retries from_pretrained spends before it gives up.
HUB_TIMEOUT_S = 5.0


def resolve_base_model(base_model: str, *, field: str = "spec.baseModel") -> str:
    """What `from_pretrained` should load: a local directory, or a hub id the hub has.

    s3:// prefixes are downloaded into the cache; hub ids resolve to a prepared model or the
    Hugging Face cache before the hub is asked. Raises BaseModelUnavailableError, naming `field`.
    """
    if not _is_remote(base_model):
        return _local_or_hub(base_model, field)
    dest = _download_cache("base-models", base_model)
    if not dest.exists():
        store = open_store(base_model)
        _require_s3_model(store, field)
        _download_prefix(store, dest)
    return str(dest)


def check_base_model(base_model: str, *, field: str = "spec.baseModel") -> None:
    """Raises what resolve_base_model would, without downloading anything: cheap enough to run
    before any data is read or any model is loaded."""
    if not _is_remote(base_model):
        _local_or_hub(base_model, field)
    elif not _download_cache("base-models", base_model).exists():
        _require_s3_model(open_store(base_model), field)


def base_model_config_hash(base_model: str, store: ObjectStore | None) -> str | None:
    """The base model's config hash without fetching its weights: from the config.json in `store`
    (the base model's prefix, opened with the caller's credentials), else from a prepared known
    model; None when neither can be read."""
    data = None
    if store is not None:
        with suppress(StorageError, ValueError):
            data = store.get_bytes("config.json")
    try:
        if data is not None:
            return config_hash(json.loads(data))
        prepared = find_prepared(base_model)
        return None if prepared is None else model_config_hash(prepared)
    except (OSError, ValueError):
        return None


def _require_s3_model(store: ObjectStore, field: str) -> None:
    if not store.exists("config.json"):
        raise BaseModelUnavailableError(
            f"{field}: {store.describe('config.json')} does not exist; point it at the prefix that holds a "
            "Hugging Face model directory (config.json, *.safetensors, the tokenizer files)"
        )


def _local_or_hub(base_model: str, field: str) -> str:
    path = local_path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelUnavailableError(
                f"{field}: {path} has no config.json, so it is not a Hugging Face model directory; "
                "point it at the folder save_pretrained wrote"
            )
        return str(path)
    if path.exists():
        raise BaseModelUnavailableError(f"{field}: {path} is a file; give the model's directory")
    if base_model.startswith(("file://", "/", ".", "~")):
        raise BaseModelUnavailableError(
            f"{field}: directory {path} does not exist; give an existing Hugging Face model directory"
        )
    prepared = find_prepared(base_model)
    if prepared:
        return str(prepared)
    return _from_hub(base_model, field)


def _from_hub(repo_id: str, field: str) -> str:
    """The Hugging Face cache's copy of `repo_id`, or `repo_id` itself once the hub has said it
    has it; else BaseModelUnavailableError saying what would make it available."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        raise BaseModelUnavailableError(
            f"{field}: {repo_id!r} is neither an existing directory nor a valid hub id (OWNER/NAME)"
        ) from None
    if isinstance(cached, str):
        return str(Path(cached).parent)  # the cached snapshot: loads offline
    missing = f"{field}: {repo_id} is not a local directory, not prepared and not in the Hugging Face cache"
    known = known_model(repo_id)
    hint = (
        f"run `tuneloom models prepare {known.name}`"
        if known
        else "download it first (`hf download " + repo_id + "`) or give a model directory or s3:// prefix"
    )
    if constants.is_offline_mode():
        raise BaseModelUnavailableError(f"{missing}, and offline mode (HF_HUB_OFFLINE) forbids asking the hub; {hint}")
    why = _hub_refusal(repo_id)
    if why:
        raise BaseModelUnavailableError(f"{missing}, and {why}; {hint}")
    return repo_id


@functools.lru_cache(maxsize=8)
def _hub_refusal(repo_id: str) -> str | None:
    """Why the hub will not give `repo_id`'s config.json within HUB_TIMEOUT_S, or None if it will.
    Cached: the check before the run and the resolution that loads the model ask once."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        return "the Hugging Face hub has no such model (or it is private: set HF_TOKEN)"
    except EntryNotFoundError:
        return "its hub repository has no config.json"
    except Exception as exc:  # every transport error of whichever HTTP client the hub library uses
        return f"the Hugging Face hub did not answer ({type(exc).__name__}, waited at most {HUB_TIMEOUT_S:.0f} s)"
    return None
