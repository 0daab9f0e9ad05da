"""What a client may put in `model`, and the errors a server answers about adapters with.

Clients send `name` (the latest version) or `name@3` (pinned), optionally as `namespace/name`.
vLLM caches an adapter under the name it was first resolved by, so the server never hands it a
floating name: every request is rewritten to the version's served name (`AdapterId.served_name`,
`<namespace>/<name>@<version>`), and a new version is a new name that vLLM has never seen.
"""

from __future__ import annotations

from http import HTTPStatus

from tuneloom.names import AdapterId

UNRESOLVED_LABEL = "(unresolved)"


class AdapterError(Exception):
    """An adapter that cannot be served, with the HTTP status and OpenAI error type to answer with."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "InternalServerError"
    reason = "error"  # the metrics label
    # Whether the name is known to be a real adapter. Metrics label the rest as one series, so
    # clients sending made-up names cannot create unbounded label values.
    names_real_adapter = True

    def __init__(self, message: str, adapter: AdapterId | None = None):
        super().__init__(message)
        self.adapter = adapter

    @property
    def metrics_label(self) -> str:
        return self.adapter.key if self.adapter is not None and self.names_real_adapter else UNRESOLVED_LABEL


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


class NotPromoted(AdapterError):
    """A committed version that failed its promotion gate: kept as evidence, not served."""

    status = HTTPStatus.CONFLICT
    error_type = "ConflictError"
    reason = "not_promoted"


class CorruptAdapter(AdapterError):
    """The store holds damaged or incomplete files: the server's side of the request failed."""

    status = HTTPStatus.BAD_GATEWAY
    error_type = "BadGatewayError"
    reason = "corrupt"


class StorageUnavailable(AdapterError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "ServiceUnavailableError"
    reason = "storage_unavailable"


def parse_model(model: str, namespace: str, allowed_namespaces: frozenset[str]) -> AdapterId:
    """`[namespace/]name[@version]` as a client sends it; namespace defaults to the server's own."""
    if not isinstance(model, str) or not model:
        raise InvalidAdapterName("'model' must name the base model or an adapter")
    try:
        adapter = AdapterId.parse(model, namespace)
    except ValueError as exc:
        raise InvalidAdapterName(f"model {exc}") from None
    if adapter.namespace not in allowed_namespaces:
        raise ForbiddenNamespace(
            f"model {model!r}: this server serves adapters of namespace(s) {', '.join(sorted(allowed_namespaces))}, "
            f"not {adapter.namespace!r}"
        )
    return adapter
