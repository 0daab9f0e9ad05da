"""What a client may put in `model`, and the versioned names vLLM sees.

Clients send `name` (the latest version) or `name@3` (pinned), optionally as `namespace/name`.
vLLM caches an adapter under the name it was first resolved by, so the server never hands it a
floating name: every request is rewritten to `<namespace>/<name>@<version>`, and a new version
is a new name that vLLM has never seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from tuneloom.registry import validate_label, validate_version

UNRESOLVED_LABEL = "(unresolved)"


class AdapterError(Exception):
    """An adapter that cannot be served, with the HTTP status and OpenAI error type to answer with."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "InternalServerError"
    reason = "error"  # the metrics label
    # Whether the name is known to be a real adapter. Metrics label the rest as one series, so
    # clients sending made-up names cannot create unbounded label values.
    names_real_adapter = True

    def __init__(self, message: str, ref: AdapterRef | None = None):
        super().__init__(message)
        self.ref = ref

    @property
    def metrics_label(self) -> str:
        return self.ref.key if self.ref is not None and self.names_real_adapter else UNRESOLVED_LABEL


class InvalidAdapterName(AdapterError):
    status = HTTPStatus.BAD_REQUEST
    error_type = "BadRequestError"
    reason = "invalid_name"
    names_real_adapter = False


class ForbiddenNamespace(AdapterError):
    status = HTTPStatus.FORBIDDEN
    error_type = "PermissionDeniedError"
    reason = "forbidden_namespace"
    names_real_adapter = False


class AdapterNotFound(AdapterError):
    status = HTTPStatus.NOT_FOUND
    error_type = "NotFoundError"
    reason = "not_found"
    names_real_adapter = False


class WrongBaseModel(AdapterError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY
    error_type = "UnprocessableEntityError"
    reason = "wrong_base_model"


class CorruptAdapter(AdapterError):
    """The store holds damaged or incomplete files: the server's side of the request failed."""

    status = HTTPStatus.BAD_GATEWAY
    error_type = "BadGatewayError"
    reason = "corrupt"


class StorageUnavailable(AdapterError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "ServiceUnavailableError"
    reason = "storage_unavailable"


@dataclass(frozen=True)
class AdapterRef:
    namespace: str
    name: str
    version: str | None = None  # None: whatever is latest when resolved

    @property
    def key(self) -> str:
        """`namespace/name`: the metrics label, the same for every version."""
        return f"{self.namespace}/{self.name}"

    @property
    def internal_name(self) -> str:
        """The name vLLM holds this version under."""
        if self.version is None:
            raise ValueError(f"{self.key}: an unpinned reference has no internal name")
        return f"{self.key}@{self.version}"

    def pinned(self, version: str) -> AdapterRef:
        return AdapterRef(self.namespace, self.name, version)


def parse_model(model: str, namespace: str, allowed_namespaces: frozenset[str]) -> AdapterRef:
    """`[namespace/]name[@version]` as a client sends it; namespace defaults to the server's own."""
    if not isinstance(model, str) or not model:
        raise InvalidAdapterName("'model' must name the base model or an adapter")
    reference, at, version = model.partition("@")
    owner, slash, name = reference.rpartition("/")
    owner = owner if slash else namespace
    try:
        validate_label(name, "adapter name")
        validate_label(owner, "namespace")
        if at:
            validate_version(version)
    except ValueError as exc:
        hint = "use NAME, NAME@VERSION or NAMESPACE/NAME[@VERSION]"
        raise InvalidAdapterName(f"model {model!r}: {exc}; {hint}") from None
    if owner not in allowed_namespaces:
        raise ForbiddenNamespace(
            f"model {model!r}: this server serves adapters of namespace(s) {', '.join(sorted(allowed_namespaces))}, "
            f"not {owner!r}"
        )
    return AdapterRef(owner, name, version if at else None)
