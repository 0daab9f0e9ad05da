"""API keys and the project each one belongs to. Only SHA-256 hashes are kept; a presented key is
hashed and compared with every known hash in constant time. The keys are read again when their
source changes, so a key added or revoked takes effect without a restart."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from tuneloom.names import DNS_LABEL_RULE, is_dns_label

log = logging.getLogger("tuneloom.api")

DEFAULT_PROJECT = "default"
KEY_PREFIX = "tlk-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeysFileError(ValueError):
    pass


def read_keys_file(path: Path) -> dict[str, list[str]]:
    """`{project: [sha256, ...]}`; a missing file is an empty one (new-key creates it)."""
    if not path.exists():
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot be read: {exc}") from None
    return parse_keys(text, str(path))


def parse_keys(text: str, source: str) -> dict[str, list[str]]:
    """The keys file's format, `{project: [sha256, ...]}`, read from a file or a Secret (`source` names it)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeysFileError(f"{source}: not a JSON object of project -> [sha256, ...]: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(hashes, list) and all(isinstance(h, str) and len(h) == 64 for h in hashes)
        for hashes in data.values()
    ):
        raise KeysFileError(f"{source}: expected {{project: [64-hex sha256, ...]}}")
    bad = [project for project in data if not is_dns_label(project)]
    if bad:
        raise KeysFileError(f"{source}: project {bad[0]!r} is not a DNS label ({DNS_LABEL_RULE})")
    return data


def add_key(path: Path, project: str) -> str:
    """A new random key for `project`; its hash joins the keys file, the key itself is returned once."""
    if not is_dns_label(project):
        raise KeysFileError(f"--project {project!r} is not a DNS label ({DNS_LABEL_RULE})")
    keys = read_keys_file(path)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    keys.setdefault(project, []).append(key_hash(key))
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    temp.chmod(0o600)
    temp.replace(path)
    return key


@dataclass(frozen=True)
class KeyRing:
    hashes: tuple[tuple[str, str], ...]  # (sha256, project)

    @classmethod
    def load(cls, api_key_env: str | None, keys_file: Path | None) -> KeyRing:
        pairs: list[tuple[str, str]] = []
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise KeysFileError(f"--api-key-env {api_key_env}: the variable is unset or empty; set it to a key")
            pairs.append((key_hash(key), DEFAULT_PROJECT))
        if keys_file is not None:
            pairs += [(h, project) for project, hashes in read_keys_file(keys_file).items() for h in hashes]
        if not pairs:
            raise KeysFileError("no API keys: give --api-key-env VAR and/or --keys-file PATH")
        return cls(tuple(pairs))

    @classmethod
    def of(cls, keys: dict[str, list[str]]) -> KeyRing:
        return cls(tuple((h, project) for project, hashes in keys.items() for h in hashes))

    @property
    def projects(self) -> list[str]:
        return sorted({project for _, project in self.hashes})

    def project_of(self, key: str) -> str | None:
        presented = key_hash(key)
        found = None
        for known, project in self.hashes:  # every hash compared, so timing tells nothing
            if hmac.compare_digest(presented, known):
                found = project
        return found


def keys_file_version(path: Path | None) -> Hashable:
    """What changes when the keys file is written (add_key replaces it): its inode, size and mtime."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class RefreshingKeys:
    """The KeyRing that `read` gives, read again whenever `version()` (cheap, asked at every
    request) differs from the last read's. The first read must succeed; a later one that fails
    keeps the keys last read, with a warning."""

    def __init__(self, read: Callable[[], KeyRing], version: Callable[[], Hashable]):
        self.read, self.version = read, version
        self._lock = threading.Lock()
        self._read_version = version()
        self._ring = read()

    def current(self) -> KeyRing:
        with self._lock:
            version = self.version()
            if version != self._read_version:
                self._read_version = version
                try:
                    self._ring = self.read()
                except KeysFileError as exc:
                    log.warning("keeping the API keys last read: %s", exc)
            return self._ring

    @property
    def projects(self) -> list[str]:
        return self.current().projects

    def project_of(self, key: str) -> str | None:
        return self.current().project_of(key)
