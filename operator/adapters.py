"""Reconciling Adapters: an adapter is Ready only once its files in object storage check out.

A registry source is resolved to a committed version (the latest unless pinned) and downloaded
with `download_adapter`, which verifies every file against the manifest's sha256. A PEFT folder
trained elsewhere is checked and imported into the registry as a new version first, so servers
only ever read registry versions. Then the adapter must be a LoRA adapter (adapter_config.json,
a complete safetensors file) for the Adapter's base model. Every failing check sets Ready=False
with a reason and a message a user can act on.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tuneloom.api import (
    API_GROUP,
    API_VERSION,
    FULL_API_VERSION,
    Adapter,
    AdapterPhase,
    AdapterStatus,
    FineTuneJob,
    LoadedOn,
)
from tuneloom.inputs import base_model_config_hash
from tuneloom.jobfile import SpecError
from tuneloom.locks import KeyedLocks
from tuneloom.models import known_model
from tuneloom.operator.common import (
    ADAPTERS,
    LABEL_MANAGED,
    MANAGER,
    MODELSERVERS,
    SecretNotFoundError,
    condition_of,
    open_object_store,
    parse_object,
    post_event,
    read_custom,
    read_status,
    set_condition,
    status_patch,
)
from tuneloom.operator.jobbuilder import LABEL_JOB
from tuneloom.registry import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    MANIFEST,
    AdapterManifest,
    AdapterVersion,
    BaseModelRecord,
    download_adapter,
    fetch_committed,
    list_versions,
    publish_adapter,
    read_adapter,
    read_latest_promoted,
)
from tuneloom.storage import (
    ChecksumMismatchError,
    CorruptObjectError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    sha256_file,
)

log = logging.getLogger("tuneloom.operator.adapters")

# Verdicts that stand until the spec or the checked version changes; any other failure (storage
# unreachable, Secret missing, version not there yet) is retried on every pass.
_FINAL_REASONS = {"Verified", "ChecksumMismatch", "CorruptManifest", "BaseModelMismatch", "InvalidAdapter"}
# A safetensors header larger than this is not an adapter's (and would not fit in memory anyway).
_MAX_HEADER_BYTES = 100_000_000


class AdapterProblem(Exception):
    """A check failed: `reason` becomes the Ready condition's reason, the message its message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def registry_name(adapter: Adapter) -> str:
    """The adapter's name in the registry: an imported folder goes under the Adapter's own name."""
    registry = adapter.spec.source.registry
    return (registry.name if registry else None) or adapter.metadata.name


def adapter_for_job(job: FineTuneJob) -> dict[str, Any]:
    """The Adapter a succeeded FineTuneJob leaves behind. It has no owner, so it outlives the job,
    and it follows the registry's latest version, as clients sending `model=<name>` do."""
    storage = job.spec.storage.model_dump(mode="json", exclude_none=True)
    return {
        "apiVersion": FULL_API_VERSION,
        "kind": "Adapter",
        "metadata": {
            "name": job.spec.output.adapterName,
            "namespace": job.metadata.namespace,
            "labels": {LABEL_MANAGED: MANAGER, LABEL_JOB: job.metadata.name},
        },
        "spec": {
            "baseModel": job.spec.baseModel,
            "source": {"registry": {"name": job.spec.output.adapterName}},
            "storage": {"uri": job.spec.output.uri, **storage},
        },
    }


def same_base_model(a: str, b: str) -> bool:
    """Whether two base model references name the same model: equal, or the same known model by
    short name or hub id (which compare case-insensitively)."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    known = known_model(a)
    return known is not None and known == known_model(b)


def check_peft_files(directory: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter, after checking it and that the weights file is a
    complete safetensors file with LoRA tensors. Raises AdapterProblem(InvalidAdapter)."""
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterProblem("InvalidAdapter", f"{ADAPTER_CONFIG} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterProblem("InvalidAdapter", f"{ADAPTER_CONFIG} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterProblem("InvalidAdapter", f"{ADAPTER_CONFIG}: peft_type is {peft_type}; only LoRA can be served")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterProblem("InvalidAdapter", f"{ADAPTER_CONFIG}: r must be a positive integer, got {rank!r}")
    names = safetensors_names(directory / ADAPTER_WEIGHTS)
    if not any("lora_" in name for name in names):
        raise AdapterProblem("InvalidAdapter", f"{ADAPTER_WEIGHTS} holds no LoRA tensors (lora_A / lora_B)")
    return config


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, after checking from its header that the file is
    exactly as long as the header says: a truncated or padded upload fails here, without torch."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterProblem("InvalidAdapter", f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise AdapterProblem("InvalidAdapter", f"{path.name} is not a safetensors file (bad header)") from None
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise AdapterProblem(
            "InvalidAdapter", f"{path.name} is {size} bytes but its header describes {expected}: truncated or damaged"
        )
    return [key for key in header if key != "__metadata__"]


def set_loaded_on(
    custom: k8s.CustomObjectsApi,
    adapter_namespace: str,
    adapter_name: str,
    server_namespace: str,
    server_name: str,
    pods: list[str],
) -> None:
    """Sets (or, with no pods, removes) one ModelServer's entry in an Adapter's status.loadedOn.

    Each ModelServer writes its own entry, concurrently with the others, so every write is a
    read-modify-write guarded by resourceVersion and retried on conflict."""
    for _ in range(5):
        body = read_custom(custom, ADAPTERS, adapter_namespace, adapter_name)
        if body is None:
            return
        current = read_status(AdapterStatus, body).loadedOn
        others = [e for e in current if (e.namespace, e.modelServer) != (server_namespace, server_name)]
        entry = [LoadedOn(modelServer=server_name, namespace=server_namespace, pods=sorted(pods))] if pods else []
        wanted = sorted(others + entry, key=lambda e: (e.namespace, e.modelServer))
        if wanted == current:
            return
        patch = {
            "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
            "status": {"loadedOn": [e.model_dump(mode="json") for e in wanted]},
        }
        try:
            custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, adapter_namespace, ADAPTERS, adapter_name, patch
            )
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    log.warning("%s/%s: loadedOn kept conflicting; the next pass sets it", adapter_namespace, adapter_name)


class AdapterReconciler:
    def __init__(self, api: k8s.ApiClient):
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        # One reconcile per Adapter at a time: the resync loop, its event handler and a FineTuneJob's
        # success may all reach the same Adapter at once.
        self._locks = KeyedLocks()

    # -- entry points ----------------------------------------------------------------------------

    def reconcile(self, body: dict[str, Any]) -> dict[str, Any]:
        """Brings the Adapter's status up to date; returns the fields it changed."""
        meta = body["metadata"]
        with self._locks.lock(meta["uid"]):
            fresh = read_custom(self.custom, ADAPTERS, meta["namespace"], meta["name"])
            if fresh is None:
                return {}
            old = fresh.get("status") or {}
            status = self._reconcile(fresh)
            changes = status_patch(old, status)
            if changes:
                self.custom.patch_namespaced_custom_object_status(
                    API_GROUP, API_VERSION, meta["namespace"], ADAPTERS, meta["name"], {"status": changes}
                )
            if old.get("phase") != status.phase.value and status.phase is not AdapterPhase.pending:
                kind = "Warning" if status.phase is AdapterPhase.failed else "Normal"
                post_event(self.core, fresh, kind, status.phase.value, status.message)
            self._prune_loaded_on(fresh, status)
            return changes

    def forget(self, body: dict[str, Any]) -> None:
        self._locks.forget(body["metadata"]["uid"])

    def upsert_for_job(self, job: FineTuneJob) -> dict[str, Any]:
        """Creates the job's Adapter, or points an existing one of that name at the registry again."""
        desired = adapter_for_job(job)
        namespace, name = job.metadata.namespace, job.spec.output.adapterName
        try:
            return self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, ADAPTERS, desired)
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = read_custom(self.custom, ADAPTERS, namespace, name) or {}
        labels = (existing.get("metadata") or {}).get("labels") or {}
        if existing.get("spec") == desired["spec"] and labels.items() >= desired["metadata"]["labels"].items():
            return existing
        # A replace, not a merge patch: the new spec must not keep a hand-made Adapter's source.uri
        # beside source.registry. The resourceVersion in `existing` makes it conditional.
        existing["spec"] = desired["spec"]
        existing["metadata"]["labels"] = {**labels, **desired["metadata"]["labels"]}
        return self.custom.replace_namespaced_custom_object(API_GROUP, API_VERSION, namespace, ADAPTERS, name, existing)

    # -- the checks ------------------------------------------------------------------------------

    def _reconcile(self, body: dict[str, Any]) -> AdapterStatus:
        meta = body["metadata"]
        status = read_status(AdapterStatus, body, phase=AdapterPhase.pending, conditions=[])
        previous = status.model_copy(deep=True)
        status.observedGeneration = meta.get("generation")
        try:
            adapter = parse_object(Adapter, body)
        except SpecError as exc:
            return _fail(status, "InvalidSpec", "; ".join(exc.problems))
        was_ready = condition_of(previous.conditions, "Ready")
        unchanged = (
            previous.observedGeneration == meta.get("generation")
            and was_ready is not None
            and was_ready.reason in _FINAL_REASONS
        )
        try:
            store = open_object_store(self.core, meta["namespace"], adapter.spec.storage.uri, adapter.spec.storage)
            if adapter.spec.source.uri is not None:
                if unchanged:
                    return status  # imported and checked; versions never change
                found = self._import(adapter, store)
            else:
                pinned = adapter.spec.source.registry.version if adapter.spec.source.registry else None
                if pinned is None:
                    # The latest a server would serve under the bare name: unpromoted versions are passed over.
                    found = read_latest_promoted(store, meta["namespace"], registry_name(adapter))
                else:
                    found = read_adapter(store, meta["namespace"], registry_name(adapter), pinned)
                checked = (previous.version, previous.sha256)
                if unchanged and checked == (found.version, found.manifest_sha256):
                    return status  # the latest is still the version checked
            return self._verify(adapter, store, found, status)
        except AdapterProblem as exc:
            return _fail(status, exc.reason, str(exc))
        except ChecksumMismatchError as exc:
            return _fail(status, "ChecksumMismatch", str(exc))
        except CorruptObjectError as exc:
            return _fail(status, "CorruptManifest", str(exc))
        except SecretNotFoundError as exc:
            return _fail(status, "SecretNotFound", str(exc))
        except ObjectNotFoundError as exc:
            return _fail(status, "NotFound", str(exc))
        except StorageError as exc:
            if unchanged and was_ready is not None and was_ready.status == "True":
                # A store that is briefly unreachable must not unload a verified adapter everywhere.
                status.message = f"version {previous.version} is Ready; looking for a newer one failed: {exc}"
                return status
            return _fail(status, "StorageUnavailable", f"{exc}; retrying")

    def _verify(
        self, adapter: Adapter, store: ObjectStore, found: AdapterVersion, status: AdapterStatus
    ) -> AdapterStatus:
        """Downloads the version (checking every sha256), then checks the files and the base model."""
        status.version, status.uri, status.sha256 = found.version, found.uri, found.manifest_sha256
        status.model = None
        with tempfile.TemporaryDirectory(prefix="tuneloom-adapter-") as tmp:
            local = Path(tmp) / "adapter"
            download_adapter(store, found.namespace, found.name, found.version, local)
            missing = [name for name in ADAPTER_FILES if not (local / name).is_file()]
            if missing:
                raise AdapterProblem("InvalidAdapter", f"version {found.version} has no {', '.join(missing)}")
            config = check_peft_files(local)
        how = self._check_base_model(adapter, found.manifest.baseModel, config)
        tuned, base = found.manifest.metrics.adapter, found.manifest.metrics.base
        # Unknown metrics are None, which the patch deletes: no value of an older version stays.
        status.rank, status.tokenAccuracy = config["r"], tuned.tokenAccuracy
        status.validationLoss, status.baseValidationLoss = tuned.validationLoss, base.validationLoss
        promotion = found.manifest.promotion
        status.promoted, status.promotionReasons = promotion.promoted, promotion.reasons
        status.model = found.id.served_name
        status.phase = AdapterPhase.ready
        status.message = f"version {found.version} verified: every file matches its sha256; {how}"
        set_condition(status.conditions, "Ready", "True", "Verified", status.message)
        return status

    def _check_base_model(self, adapter: Adapter, recorded: BaseModelRecord | None, peft_config: dict[str, Any]) -> str:
        """How the base model matched; AdapterProblem(BaseModelMismatch) when it does not."""
        wanted = adapter.spec.baseModel
        if recorded is not None and (recorded.name or recorded.configSha256):
            recorded_hash, recorded_name = recorded.configSha256, recorded.name
            if recorded_hash:
                actual = self._base_model_hash(adapter)
                if actual is not None:
                    if actual != recorded_hash:
                        raise AdapterProblem(
                            "BaseModelMismatch",
                            f"the adapter was trained on {recorded_name} (config sha256 {recorded_hash[:12]}), but "
                            f"spec.baseModel {wanted} has config sha256 {actual[:12]}: it is another model; set "
                            "spec.baseModel to the model it was trained on",
                        )
                    return "the base model's config hash matches the manifest"
            if recorded_name and not same_base_model(recorded_name, wanted):
                raise AdapterProblem(
                    "BaseModelMismatch",
                    f"the manifest says the adapter was trained on {recorded_name}, but spec.baseModel is {wanted}",
                )
            why = "its config.json was not reachable" if recorded_hash else "the manifest records no config hash"
            return f"the base model's name matches the manifest ({why}, so no hashes were compared)"
        claimed = peft_config.get("base_model_name_or_path")
        if not claimed:
            return f"{ADAPTER_CONFIG} names no base model, so it was not compared"
        if not same_base_model(claimed, wanted):
            raise AdapterProblem(
                "BaseModelMismatch",
                f"{ADAPTER_CONFIG} says base_model_name_or_path {claimed}, but spec.baseModel is {wanted}",
            )
        return f"the base model's name matches {ADAPTER_CONFIG}"

    def _base_model_hash(self, adapter: Adapter) -> str | None:
        """The base model's config hash when the operator can read its config.json: from object
        storage (with the Adapter's connection), a local directory, or a prepared known model."""
        base = adapter.spec.baseModel
        try:
            store = open_object_store(self.core, adapter.metadata.namespace, base, adapter.spec.storage)
        except (StorageError, ValueError):
            store = None
        return base_model_config_hash(base, store)

    # -- importing a PEFT folder -----------------------------------------------------------------

    def _import(self, adapter: Adapter, store: ObjectStore) -> AdapterVersion:
        """The registry version holding the PEFT folder's files: found, if an earlier pass imported
        them (so a restart never imports twice), else published now, after the folder checks out."""
        source_uri = adapter.spec.source.uri or ""
        namespace, name = adapter.metadata.namespace, registry_name(adapter)
        source = open_object_store(self.core, namespace, source_uri, adapter.spec.storage)
        with tempfile.TemporaryDirectory(prefix="tuneloom-import-") as tmp:
            folder = Path(tmp) / "source"
            manifest = self._fetch_source(source, folder)
            config = check_peft_files(folder)
            self._check_base_model(adapter, manifest.baseModel if manifest else None, config)
            files = {path.name: path for path in sorted(folder.iterdir()) if path.is_file() and path.name != MANIFEST}
            hashes = {file: sha256_file(path) for file, path in files.items()}
            imported_from = {"uri": source_uri, "files": hashes}
            for version in reversed(list_versions(store, namespace, name)):
                earlier = read_adapter(store, namespace, name, version)
                if earlier.manifest.importedFrom == imported_from:
                    return earlier
            base_model = manifest.baseModel if manifest else BaseModelRecord(name=adapter.spec.baseModel)
            record = {
                "kind": "lora",
                "baseModel": base_model.model_dump(),
                "metrics": manifest.metrics.model_dump() if manifest else {},
                "importedFrom": imported_from,
            }
            published = publish_adapter(store, namespace, name, files, record)
        log.info("imported %s into %s as version %s", source_uri, published.uri, published.version)
        return published

    @staticmethod
    def _fetch_source(source: ObjectStore, folder: Path) -> AdapterManifest | None:
        """Downloads a PEFT folder; one that carries a manifest (a version copied out of a registry)
        is verified against it."""
        if source.exists(MANIFEST):
            manifest = fetch_committed(source, "", folder)
            try:
                return AdapterManifest.model_validate(manifest)
            except ValidationError as exc:
                raise AdapterProblem(
                    "InvalidAdapter", f"{source.describe(MANIFEST)}: not an adapter manifest: {exc}"
                ) from None
        folder.mkdir()
        for name in ADAPTER_FILES:
            try:
                source.download_file(name, folder / name)
            except ObjectNotFoundError:
                needed = " and ".join(ADAPTER_FILES)
                raise AdapterProblem(
                    "NotFound", f"{source.describe(name)} does not exist: a PEFT adapter folder holds {needed}"
                ) from None
        return None

    # -- loadedOn --------------------------------------------------------------------------------

    def _prune_loaded_on(self, body: dict[str, Any], status: AdapterStatus) -> None:
        """Drops entries of ModelServers that no longer exist (one deleted while the operator was down)."""
        meta = body["metadata"]
        for entry in status.loadedOn:
            if read_custom(self.custom, MODELSERVERS, entry.namespace, entry.modelServer) is None:
                set_loaded_on(self.custom, meta["namespace"], meta["name"], entry.namespace, entry.modelServer, [])


def _fail(status: AdapterStatus, reason: str, message: str) -> AdapterStatus:
    status.model = None  # ModelServers load only what has a model id: a Ready version
    status.phase, status.message = AdapterPhase.failed, message
    set_condition(status.conditions, "Ready", "False", reason, message)
    return status
