"""Names every component agrees on: DNS labels, adapter versions and the adapter identity.

An adapter is `<namespace>/<name>`, and one committed version of it `<namespace>/<name>@<version>`.
That text is the name vLLM holds the version under, what `/v1/models` lists, what a ModelServer
loads and what the metrics label. `AdapterId` is the one place it is parsed and formatted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# DNS-1123 label: names become path segments, Kubernetes names and vLLM model names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# Versions are "1", "2", ...; 18 digits keep them within a signed 64-bit integer.
VERSION_PATTERN = r"^[1-9][0-9]{0,17}$"
ADAPTERS_ROOT = "adapters"

_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
NAME_FORMS = "NAME, NAME@VERSION or NAMESPACE/NAME[@VERSION]"
DNS_LABEL_RULE = "lowercase letters, digits and '-', 1-63 characters, starting and ending with a letter or digit"


def is_dns_label(value: str) -> bool:
    return isinstance(value, str) and bool(_DNS_LABEL.match(value))


def validate_label(value: str, what: str) -> str:
    if not is_dns_label(value):
        raise ValueError(f"{what} {value!r} is not a DNS-1123 label ({DNS_LABEL_RULE})")
    return value


def is_version(value: str) -> bool:
    return isinstance(value, str) and bool(_VERSION.match(value))


def validate_version(version: str) -> str:
    if not is_version(version):
        raise ValueError(f"adapter version {version!r} must be a positive integer string such as '1'")
    return version


@dataclass(frozen=True)
class AdapterId:
    """An adapter, or one version of it (`version` None: whichever is latest when resolved)."""

    namespace: str
    name: str
    version: str | None = None

    def __post_init__(self) -> None:
        validate_label(self.namespace, "namespace")
        validate_label(self.name, "adapter name")
        if self.version is not None:
            validate_version(self.version)

    @classmethod
    def parse(cls, text: str, default_namespace: str) -> AdapterId:
        """`[namespace/]name[@version]` as a user writes it; ValueError naming the accepted forms."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"an adapter must be named as {NAME_FORMS}")
        reference, at, version = text.partition("@")
        namespace, slash, name = reference.rpartition("/")
        try:
            return cls(namespace if slash else default_namespace, name, version if at else None)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}; use {NAME_FORMS}") from None

    @classmethod
    def parse_served(cls, text: str) -> AdapterId | None:
        """The id of a pinned `namespace/name@version` (as vLLM lists it), or None for anything else."""
        reference, at, version = str(text).partition("@")
        namespace, slash, name = reference.partition("/")
        if not (at and slash):
            return None
        try:
            return cls(namespace, name, version)
        except ValueError:
            return None

    @property
    def key(self) -> str:
        """`namespace/name`: the same for every version (the metrics label)."""
        return f"{self.namespace}/{self.name}"

    @property
    def served_name(self) -> str:
        """`namespace/name@version`: the name vLLM holds this version under."""
        if self.version is None:
            raise ValueError(f"{self.key}: an unpinned adapter has no served name; pin a version first")
        return f"{self.key}@{self.version}"

    @property
    def store_prefix(self) -> str:
        """`adapters/<namespace>/<name>[/<version>]`: where the registry keeps it."""
        parts = [ADAPTERS_ROOT, self.namespace, self.name]
        return "/".join(parts if self.version is None else [*parts, self.version])

    def pinned(self, version: str) -> AdapterId:
        return AdapterId(self.namespace, self.name, version)

    def __str__(self) -> str:
        return self.key if self.version is None else self.served_name
