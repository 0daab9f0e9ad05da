"""Committed object sets and the adapter registry, on a local directory and on real S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from tuneloom import __version__
from tuneloom.names import AdapterId
from tuneloom.registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    commit_files,
    download_adapter,
    fetch_committed,
    list_versions,
    next_version,
    publish_adapter,
    read_adapter,
)
from tuneloom.storage import (
    ChecksumMismatchError,
    InvalidKeyError,
    LocalStore,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    sha256_file,
)

NS = "team-a"
NAME = "support-bot"


def _adapter_files(folder: Path, seed: str = "a") -> dict[str, Path]:
    """A small stand-in adapter: real file names, random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / ADAPTER_CONFIG
    config.write_text(json.dumps({"r": 8, "seed": seed}))
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(os.urandom(4096))
    return {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: weights}


def _publish(store: ObjectStore, tmp_path: Path, version: str | None = None, seed: str = "a") -> None:
    files = _adapter_files(tmp_path / f"src-{seed}-{version}", seed)
    publish_adapter(store, NS, NAME, files, {"baseModel": {"name": "smollm2"}}, version=version)


def _abandon(store: ObjectStore, version: str) -> None:
    """Files of an upload that died before its manifest was written."""
    prefix = AdapterId(NS, NAME, version).store_prefix
    store.put_bytes(f"{prefix}/{ADAPTER_CONFIG}", b"{}")
    store.put_bytes(f"{prefix}/{ADAPTER_WEIGHTS}", b"partial")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# --- publish, read, download --------------------------------------------------------------------


def test_publish_read_download_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path / "src")
    published = publish_adapter(store, NS, NAME, files, {"baseModel": {"name": "smollm2"}, "job": "j1"})
    assert published.version == "1"
    assert published.uri == store.describe(f"adapters/{NS}/{NAME}/1")
    manifest = published.manifest
    assert (manifest.name, manifest.namespace, manifest.version) == (NAME, NS, "1")
    assert published.id == AdapterId(NS, NAME, "1")
    assert manifest.baseModel.name == "smollm2"
    assert manifest.model_extra["job"] == "j1"
    assert manifest.model_extra["tuneloomVersion"] == __version__
    assert datetime.fromisoformat(manifest.model_extra["createdAt"].replace("Z", "+00:00")).tzinfo is not None
    weights = files[ADAPTER_WEIGHTS]
    assert manifest.files[ADAPTER_WEIGHTS].model_dump() == {"sha256": sha256_file(weights), "size": 4096}

    read = read_adapter(store, NS, NAME)
    assert read == published

    dest = tmp_path / "cache" / "support-bot-1"
    downloaded = download_adapter(store, NS, NAME, "1", dest)
    assert downloaded == published
    assert (dest / ADAPTER_WEIGHTS).read_bytes() == weights.read_bytes()
    assert json.loads((dest / MANIFEST).read_text()) == manifest.model_dump(exclude_defaults=True)
    assert sorted(p.name for p in dest.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST])
    assert not _leftovers(dest.parent)


def test_versions_are_ordered_numerically(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "10")
    _publish(store, tmp_path, "2")
    _publish(store, tmp_path, "9")
    assert list_versions(store, NS, NAME) == ["2", "9", "10"]
    assert read_adapter(store, NS, NAME).version == "10"
    assert next_version(store, NS, NAME) == "11"


def test_unknown_adapter(store: ObjectStore, tmp_path: Path) -> None:
    assert list_versions(store, NS, NAME) == []
    assert next_version(store, NS, NAME) == "1"
    with pytest.raises(ObjectNotFoundError, match=f"adapter {NS}/{NAME}: no committed version"):
        read_adapter(store, NS, NAME)
    with pytest.raises(ObjectNotFoundError, match="does not exist or was never committed"):
        read_adapter(store, NS, NAME, "3")
    with pytest.raises(ObjectNotFoundError, match=f"adapter {NS}/{NAME} version 3"):
        download_adapter(store, NS, NAME, "3", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --- the manifest is the commit -----------------------------------------------------------------


def test_uncommitted_version_is_invisible(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "1")
    _abandon(store, "2")
    assert list_versions(store, NS, NAME) == ["1"]
    assert read_adapter(store, NS, NAME).version == "1"
    with pytest.raises(ObjectNotFoundError, match="never committed"):
        read_adapter(store, NS, NAME, "2")
    dest = tmp_path / "dest"
    with pytest.raises(ObjectNotFoundError):
        download_adapter(store, NS, NAME, "2", dest)
    assert not dest.exists()


def test_next_version_skips_abandoned_attempts(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "1")
    _abandon(store, "2")
    assert next_version(store, NS, NAME) == "3"
    assert publish_adapter(store, NS, NAME, _adapter_files(tmp_path / "b"), {}).version == "3"
    assert list_versions(store, NS, NAME) == ["1", "3"]


def test_abandoned_attempt_can_be_completed(store: ObjectStore, tmp_path: Path) -> None:
    _abandon(store, "1")
    files = _adapter_files(tmp_path / "src")
    publish_adapter(store, NS, NAME, files, {}, version="1")
    download_adapter(store, NS, NAME, "1", tmp_path / "dest")
    assert (tmp_path / "dest" / ADAPTER_WEIGHTS).read_bytes() == files[ADAPTER_WEIGHTS].read_bytes()


def test_committed_version_is_immutable(store: ObjectStore, tmp_path: Path) -> None:
    first = _adapter_files(tmp_path / "first", "first")
    publish_adapter(store, NS, NAME, first, {}, version="1")
    before = {key: store.get_bytes(key) for key in store.list()}
    second = _adapter_files(tmp_path / "second", "second")
    with pytest.raises(ObjectExistsError, match="already committed"):
        publish_adapter(store, NS, NAME, second, {}, version="1")
    assert {key: store.get_bytes(key) for key in store.list()} == before


def test_commit_files_refuses_before_uploading(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("sets/x/manifest.json", b"{}")
    extra = tmp_path / "extra.txt"
    extra.write_text("new")
    with pytest.raises(ObjectExistsError):
        commit_files(store, "sets/x", {"extra.txt": extra}, {})
    assert list(store.list("sets/")) == ["sets/x/manifest.json"]


def test_commit_and_fetch_nested_files(store: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    data = tmp_path / "src" / "data.jsonl"
    data.write_text('{"a": 1}\n')
    manifest, sha = commit_files(store, "sets/y", {"sub/data.jsonl": data}, {"kind": "dataset"})
    assert manifest["kind"] == "dataset"
    assert manifest["files"]["sub/data.jsonl"]["size"] == data.stat().st_size
    assert sha == _sha256(store.get_bytes("sets/y/manifest.json"))
    fetched = fetch_committed(store, "sets/y", tmp_path / "out")
    assert fetched == manifest
    assert (tmp_path / "out" / "sub" / "data.jsonl").read_text() == '{"a": 1}\n'


# --- verification -------------------------------------------------------------------------------


def test_tampered_file_is_detected_and_nothing_is_left(store: ObjectStore, tmp_path: Path) -> None:
    published = publish_adapter(store, NS, NAME, _adapter_files(tmp_path / "src"), {})
    store.put_bytes(f"{AdapterId(NS, NAME, '1').store_prefix}/{ADAPTER_WEIGHTS}", b"tampered weights")
    dest = tmp_path / "cache" / "adapter"
    with pytest.raises(ChecksumMismatchError) as caught:
        download_adapter(store, NS, NAME, "1", dest)
    message = str(caught.value)
    assert ADAPTER_WEIGHTS in message
    assert published.manifest.files[ADAPTER_WEIGHTS].sha256 in message
    assert _sha256(b"tampered weights") in message
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_existing_destination_is_not_touched(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "1")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="choose an empty or new destination"):
        download_adapter(store, NS, NAME, "1", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert not _leftovers(tmp_path)


def test_manifest_with_traversal_names_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    evil = {"files": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}}
    store.put_bytes("sets/evil/manifest.json", json.dumps(evil).encode())
    with pytest.raises(InvalidKeyError):
        fetch_committed(store, "sets/evil", tmp_path / "out" / "dest")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out" / "dest").exists()


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "a/b", "Upper", "-lead", "trail-", "", "x" * 64, "a_b"])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="DNS-1123"):
        AdapterId(NS, name)
    with pytest.raises(ValueError, match="DNS-1123"):
        AdapterId(name, NAME)


@pytest.mark.parametrize("version", ["0", "01", "-1", "1.0", "latest", "../1"])
def test_invalid_versions_are_rejected(version: str) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        AdapterId(NS, NAME, version)


def test_publish_needs_the_adapter_files(tmp_path: Path) -> None:
    files = _adapter_files(tmp_path / "src")
    del files[ADAPTER_WEIGHTS]
    with pytest.raises(ValueError, match=ADAPTER_WEIGHTS):
        publish_adapter(LocalStore(tmp_path / "store"), NS, NAME, files, {})
