"""Committed object sets and the adapter registry built on them.

A version is a folder of files plus a `manifest.json` written LAST and only if absent. The
manifest is the commit: readers look only at versions that have one, it records the SHA-256 and
size of every file so downloads are verified, and its conditional write makes a committed
version immutable. No locks or databases are needed, on S3 or on a local disk.

Adapters live at `adapters/<namespace>/<name>/<version>/` with versions "1", "2", ...
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloom import __version__
from tuneloom.names import ADAPTERS_ROOT, AdapterId, is_version, validate_label
from tuneloom.storage import (
    ChecksumMismatchError,
    CorruptObjectError,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    join_key,
    sha256_file,
    validate_key,
)

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# A fully fine-tuned model (manifest kind "full"): a transformers directory, its weights in one
# safetensors file or in shards listed by the index.
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
EVALUATION_FILE = "evaluation.json"  # every prompt both models answered, written by the trainer
LOSS_HISTORY_FILE = "loss_history.json"  # every step's training loss and every evaluation, by the trainer


# --- committed object sets ----------------------------------------------------------------------


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The canonical serialisation; its SHA-256 identifies a committed version."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def commit_files(
    store: ObjectStore, prefix: str, files: Mapping[str, Path], manifest: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """Uploads `files` under `prefix/`, then commits them by writing `prefix/manifest.json`.

    Returns the manifest written (the given dict plus "files": {name: {"sha256", "size"}}) and the
    SHA-256 of its bytes. Raises ObjectExistsError, before uploading anything, if the set is
    already committed, and also if another writer commits the same prefix first.
    """
    if "files" in manifest:
        raise ValueError("the manifest's 'files' entry is computed by commit_files; do not pass one")
    return commit_uploaded(store, prefix, upload_files(store, prefix, files), manifest)


def upload_files(store: ObjectStore, prefix: str, files: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """The first half of `commit_files`, for sets that several writers upload (the ranks of a sharded
    checkpoint): uploads `files` under `prefix/` uncommitted; returns their {name: {"sha256", "size"}}."""
    names = [_file_name(name) for name in files]
    if store.exists(join_key(prefix, MANIFEST)):
        raise ObjectExistsError(
            f"{store.describe(prefix)}: already committed ({MANIFEST} exists); committed versions are "
            "immutable, publish a new version instead"
        )
    recorded = {}
    for name in names:
        path = Path(files[name])
        recorded[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        _upload_uncommitted(store, join_key(prefix, name), path)
    return recorded


def commit_uploaded(
    store: ObjectStore, prefix: str, recorded: Mapping[str, dict[str, Any]], manifest: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The second half of `commit_files`: commits files `upload_files` uploaded (`recorded`, merged
    over every writer) by writing `prefix/manifest.json`."""
    written = {**manifest, "files": dict(recorded)}
    data = manifest_bytes(written)
    store.put_bytes(join_key(prefix, MANIFEST), data, if_absent=True)
    return written, _sha256_bytes(data)


def _upload_uncommitted(store: ObjectStore, key: str, path: Path) -> None:
    """Uploads a file of a not-yet-committed set, replacing one left by an abandoned attempt.

    Overwriting is safe: without a manifest no reader can see or trust these files, and the
    manifest we write afterwards records the hashes of what we uploaded. The conditional first
    try keeps the common case (a fresh version) a single request with no overwrite.
    """
    try:
        store.put_file(key, path, if_absent=True)
    except ObjectExistsError:
        store.put_file(key, path)


def fetch_committed(store: ObjectStore, prefix: str, dest: Path) -> dict[str, Any]:
    """Downloads a committed set into the new directory `dest`, verifying every file; returns its manifest."""
    manifest, _ = _fetch_committed(store, prefix, Path(dest))
    return manifest


def _fetch_committed(store: ObjectStore, prefix: str, dest: Path) -> tuple[dict[str, Any], str]:
    """Downloads into a temp dir beside `dest` and renames it into place only once all files check out."""
    data, manifest = _read_manifest(store, prefix)
    dest = dest.absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for name, expected in _manifest_files(store, prefix, manifest).items():
            local = staging / name
            store.download_file(join_key(prefix, name), local)
            _verify(store.describe(join_key(prefix, name)), local, expected)
        (staging / MANIFEST).write_bytes(data)
        _move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest, _sha256_bytes(data)


def _read_manifest(store: ObjectStore, prefix: str) -> tuple[bytes, dict[str, Any]]:
    try:
        data = store.get_bytes(join_key(prefix, MANIFEST))
    except ObjectNotFoundError as exc:
        raise ObjectNotFoundError(
            f"{store.describe(prefix)}: no {MANIFEST}: this version does not exist or was never "
            "committed (an interrupted upload leaves files without a manifest); check the name and version"
        ) from exc
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise CorruptObjectError(f"{store.describe(join_key(prefix, MANIFEST))}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CorruptObjectError(f"{store.describe(join_key(prefix, MANIFEST))}: not a JSON object")
    return data, manifest


def _manifest_files(store: ObjectStore, prefix: str, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's file table, with names checked so a crafted manifest cannot write outside dest."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptObjectError(f"{store.describe(join_key(prefix, MANIFEST))}: has no 'files' table")
    for name in files:
        _file_name(name)
    return files


def _verify(where: str, local: Path, expected: Mapping[str, Any]) -> None:
    _check(where, sha256_file(local), local.stat().st_size, expected)


def _check(where: str, actual_sha: str, actual_size: int, expected: Mapping[str, Any]) -> None:
    if actual_sha != expected.get("sha256") or actual_size != expected.get("size"):
        raise ChecksumMismatchError(
            f"{where}: checksum mismatch: expected sha256 {expected.get('sha256')} ({expected.get('size')} "
            f"bytes), got {actual_sha} ({actual_size} bytes); the stored file was altered or damaged "
            "after commit, publish a new version"
        )


def _move_into_place(staging: Path, dest: Path) -> None:
    """Renames the verified directory to `dest` (allowed onto an empty directory only)."""
    try:
        staging.rename(dest)
    except OSError as exc:
        raise StorageError(
            f"{dest}: cannot move the download into place ({exc.strerror}); remove it or choose "
            "an empty or new destination"
        ) from exc


def _file_name(name: str) -> str:
    validate_key(name)
    if name == MANIFEST:
        raise ValueError(f"{MANIFEST} is written by commit_files; it cannot be one of the files")
    return name


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- adapter registry ---------------------------------------------------------------------------


class _Record(BaseModel):
    # Manifests outlive the code that wrote them: fields this version does not know are kept.
    model_config = ConfigDict(extra="allow")


class EvaluatedMetrics(_Record):
    """Held-out figures of one model (the base or the adapter); generation metrics are extra fields."""

    validationLoss: float | None = None
    tokenAccuracy: float | None = None

    def scores(self) -> dict[str, float]:
        """The generation metrics (exact_match, json_valid, ...): every number but the loss."""
        extra = self.model_extra or {}
        figures = {"tokenAccuracy": self.tokenAccuracy, **extra}
        return {k: float(v) for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class OverfittingRecord(_Record):
    """The trainer's overfitting verdict on its evaluation history (`tuneloom.trainer.overfitting`)."""

    detected: bool = False
    rule: str | None = None  # the rule that fired: risingValidationLoss or lossRatio
    reason: str = ""  # the numbers that made it fire


class TrainingMetrics(_Record):
    base: EvaluatedMetrics = Field(default_factory=EvaluatedMetrics)
    adapter: EvaluatedMetrics = Field(default_factory=EvaluatedMetrics)
    fewShot: EvaluatedMetrics = Field(default_factory=EvaluatedMetrics)  # empty before the baseline existed
    steps: int = 0
    tokensSeen: int | None = None  # absent from manifests older than the API's trained_tokens
    preemptedAtSteps: list[int] = Field(default_factory=list)
    trainSeconds: float | None = None
    gpuSeconds: float | None = None  # absent from manifests older than the estimate
    cost: float | None = None
    estimate: dict[str, Any] | None = None  # `Estimate.to_status` before training
    overfitting: OverfittingRecord | None = None  # absent from manifests older than the detector


class BaseModelRecord(_Record):
    name: str | None = None
    configSha256: str | None = None


class FileRecord(_Record):
    sha256: str
    size: int


class Promotion(_Record):
    """The promotion gate's verdict (`tuneloom.promotion.decide`). An unpromoted version is kept as
    evidence, but a bare name never resolves to it."""

    promoted: bool = True
    reasons: list[str] = Field(default_factory=list)  # each names a metric, its value and the threshold


class AdapterManifest(_Record):
    """`manifest.json` of an adapter version: what it is, what it was trained on, how it scored."""

    namespace: str
    name: str
    version: str
    kind: str = "lora"
    baseModel: BaseModelRecord = Field(default_factory=BaseModelRecord)
    metrics: TrainingMetrics = Field(default_factory=TrainingMetrics)
    files: dict[str, FileRecord] = Field(default_factory=dict)
    importedFrom: dict[str, Any] | None = None
    # Manifests written before the gate existed have none: they count as promoted.
    promotion: Promotion = Field(default_factory=Promotion)

    @property
    def id(self) -> AdapterId:
        return AdapterId(self.namespace, self.name, self.version)


@dataclass(frozen=True)
class AdapterVersion:
    """One committed adapter version, as recorded by its manifest."""

    id: AdapterId
    uri: str
    manifest: AdapterManifest
    manifest_sha256: str

    @property
    def namespace(self) -> str:
        return self.id.namespace

    @property
    def name(self) -> str:
        return self.id.name

    @property
    def version(self) -> str:
        return str(self.id.version)


def _adapter_version(store: ObjectStore, adapter: AdapterId, manifest: Mapping[str, Any], sha: str) -> AdapterVersion:
    where = store.describe(f"{adapter.store_prefix}/{MANIFEST}")
    try:
        parsed = AdapterManifest.model_validate(manifest)
    except ValidationError as exc:
        raise CorruptObjectError(f"{where}: not an adapter manifest: {_problems(exc)}") from None
    recorded = (parsed.namespace, parsed.name, parsed.version)
    if recorded != (adapter.namespace, adapter.name, adapter.version):
        raise CorruptObjectError(f"{where}: records {'/'.join(recorded)}, not {adapter}: it was copied or altered")
    return AdapterVersion(adapter, store.describe(adapter.store_prefix), parsed, sha)


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())


def _version_dirs(store: ObjectStore, namespace: str, name: str) -> dict[int, set[str]]:
    """Every numeric version folder under the adapter, committed or not, with its file names."""
    base = AdapterId(namespace, name).store_prefix + "/"
    found: dict[int, set[str]] = {}
    for key in store.list(base):
        version, _, rest = key[len(base) :].partition("/")
        if rest and is_version(version):
            found.setdefault(int(version), set()).add(rest)
    return found


def list_versions(store: ObjectStore, namespace: str, name: str) -> list[str]:
    """Committed versions (those with a manifest), oldest first."""
    found = _version_dirs(store, namespace, name)
    return [str(v) for v in sorted(found) if MANIFEST in found[v]]


def next_version(store: ObjectStore, namespace: str, name: str) -> str:
    """One past the highest version folder seen, so an abandoned attempt's number is never reused."""
    found = _version_dirs(store, namespace, name)
    return str(max(found, default=0) + 1)


def publish_adapter(
    store: ObjectStore,
    namespace: str,
    name: str,
    files: Mapping[str, Path],
    manifest: Mapping[str, Any],
    version: str | None = None,
) -> AdapterVersion:
    """Commits an adapter as a new immutable version (the next free one unless `version` is given).

    Two publishers racing for the same version are refused at the manifest (ObjectExistsError) but
    may overwrite each other's files first; the operator publishes one version per job, and
    fetch_committed's checksums would catch such damage.
    """
    adapter = AdapterId(namespace, name, version or None)
    if manifest.get("kind") == "full":
        missing = [] if any(f in files for f in MODEL_WEIGHTS) else [" or ".join(MODEL_WEIGHTS)]
        missing += [] if MODEL_CONFIG in files else [MODEL_CONFIG]
    else:
        missing = [f for f in ADAPTER_FILES if f not in files]
    if missing:
        raise ValueError(f"adapter {adapter.key}: missing {', '.join(missing)}")
    if adapter.version is None:
        adapter = adapter.pinned(next_version(store, namespace, name))
    record = {
        **manifest,
        "name": name,
        "namespace": namespace,
        "version": adapter.version,
        "createdAt": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "tuneloomVersion": __version__,
    }
    # Checked before anything is uploaded: a manifest readers could not parse would be a committed
    # version nobody can serve.
    try:
        AdapterManifest.model_validate({**record, "files": {}})
    except ValidationError as exc:
        raise ValueError(f"adapter {adapter}: not a valid manifest: {_problems(exc)}") from None
    written, sha = commit_files(store, adapter.store_prefix, files, record)
    return _adapter_version(store, adapter, written, sha)


def _pinned(store: ObjectStore, namespace: str, name: str, version: str | None) -> AdapterId:
    adapter = AdapterId(namespace, name, version)
    if adapter.version is not None:
        return adapter
    versions = list_versions(store, namespace, name)
    if not versions:
        raise ObjectNotFoundError(
            f"adapter {adapter.key}: no committed version under {store.describe(adapter.store_prefix)}; "
            "publish one first"
        )
    return adapter.pinned(versions[-1])


def read_adapter(store: ObjectStore, namespace: str, name: str, version: str | None = None) -> AdapterVersion:
    """The manifest of a committed version (None: the latest); ObjectNotFoundError if there is none."""
    adapter = _pinned(store, namespace, name, version)
    try:
        data, manifest = _read_manifest(store, adapter.store_prefix)
    except ObjectNotFoundError as exc:
        raise ObjectNotFoundError(f"adapter {adapter.key} version {adapter.version}: {exc}") from exc
    return _adapter_version(store, adapter, manifest, _sha256_bytes(data))


def read_latest_promoted(store: ObjectStore, namespace: str, name: str) -> AdapterVersion:
    """The newest version that passed its promotion gate (what a bare name serves); the newest of
    all when none did, so its reasons can be shown. ObjectNotFoundError if there is no version."""
    versions = list_versions(store, namespace, name)
    newest = read_adapter(store, namespace, name, versions[-1] if versions else None)
    if newest.manifest.promotion.promoted:
        return newest
    for version in reversed(versions[:-1]):
        earlier = read_adapter(store, namespace, name, version)
        if earlier.manifest.promotion.promoted:
            return earlier
    return newest


def download_adapter(store: ObjectStore, namespace: str, name: str, version: str | None, dest: Path) -> AdapterVersion:
    """Downloads and verifies a committed version into the new directory `dest` (None: the latest)."""
    adapter = _pinned(store, namespace, name, version)
    try:
        manifest, sha = _fetch_committed(store, adapter.store_prefix, Path(dest))
    except ObjectNotFoundError as exc:
        raise ObjectNotFoundError(f"adapter {adapter.key} version {adapter.version}: {exc}") from exc
    try:
        return _adapter_version(store, adapter, manifest, sha)
    except CorruptObjectError:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def read_version_file(store: ObjectStore, adapter: AdapterVersion, name: str) -> bytes | None:
    """One file of a committed version, verified against its manifest; None when the manifest does
    not list it (a version published before the file existed)."""
    expected = adapter.manifest.files.get(name)
    if expected is None:
        return None
    key = join_key(adapter.id.store_prefix, name)
    data = store.get_bytes(key)
    _check(store.describe(key), _sha256_bytes(data), len(data), expected.model_dump())
    return data


# `<root>/adapters/<namespace>/<name>[/<version>]`, the form `tuneloom train` prints a version's URI in.
_ADAPTER_URI = re.compile(
    rf"^(?:(?P<root>.*)/)?{ADAPTERS_ROOT}/(?P<namespace>[^/]+)/(?P<name>[^/]+)(?:/(?P<version>[^/]+))?/*$"
)


def split_adapter_uri(uri: str) -> tuple[str, AdapterId]:
    """The store root and the adapter (a version, or None: the latest) of an adapter's URI; ValueError
    naming the expected form."""
    match = _ADAPTER_URI.match(uri)
    if match is None:
        raise ValueError(
            f"{uri!r} is not an adapter's URI: expected STORE/{ADAPTERS_ROOT}/NAMESPACE/NAME[/VERSION], "
            f"e.g. out/store/{ADAPTERS_ROOT}/default/support-tickets/1 (the URI `tuneloom train` prints)"
        )
    try:
        adapter = AdapterId(match["namespace"], match["name"], match["version"])
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    root = match["root"]
    # No root: the URI is relative to a store in the working directory; an empty one: the filesystem's.
    return ("." if root is None else root or "/"), adapter


# -- training runs -------------------------------------------------------------------------------
# A run's checkpoints and its "published" record live under one prefix per job identity. The
# record is how a rerun knows it already published, and how the operator finds the version a job
# wrote without taking the pod's word for it.

PUBLISHED = "published.json"
PREEMPTIONS = "preemptions.json"  # the steps at which the trainer saved a checkpoint on SIGTERM
_STEP_DIR = re.compile(r"^step-(\d+)/")


def run_prefix(namespace: str, job_name: str, run_id: str) -> str:
    """`checkpoints/<namespace>/<job>/<run id>`: the uid on a cluster, `local` on a laptop."""
    return f"checkpoints/{validate_label(namespace, 'namespace')}/{job_name}/{run_id}"


def committed_steps(store: ObjectStore, prefix: str) -> list[int]:
    """The steps of the run's committed checkpoints (`prefix/step-<N>/` with its manifest), in order;
    one without a manifest was interrupted and does not count."""
    steps = []
    for key in store.list(prefix + "/"):
        match = _STEP_DIR.match(key[len(prefix) + 1 :])
        if match and key.endswith(f"/{MANIFEST}"):
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_manifest(store: ObjectStore, prefix: str, step: int) -> dict[str, Any]:
    """A committed checkpoint's manifest: its step, its figures (`metrics`, absent from checkpoints
    older than them) and its files."""
    return _read_manifest(store, f"{prefix}/step-{step:08d}")[1]


def read_published(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(f"{prefix}/{PUBLISHED}"))
    except ObjectNotFoundError:
        return None


def write_published(store: ObjectStore, prefix: str, record: Mapping[str, Any]) -> None:
    store.put_bytes(f"{prefix}/{PUBLISHED}", json.dumps(record).encode())


def read_preemptions(store: ObjectStore, prefix: str) -> list[int]:
    """The steps at which earlier runs of the job stopped on SIGTERM and saved a checkpoint, oldest first."""
    try:
        return json.loads(store.get_bytes(f"{prefix}/{PREEMPTIONS}"))["steps"]
    except ObjectNotFoundError:
        return []


def write_preemptions(store: ObjectStore, prefix: str, steps: list[int]) -> None:
    store.put_bytes(f"{prefix}/{PREEMPTIONS}", json.dumps({"steps": steps}).encode())
