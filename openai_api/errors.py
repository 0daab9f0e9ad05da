"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, the message saying what to do."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(what: str, identifier: str, param: str | None = None) -> ApiError:
    # Another project's ids get this too: 404, never 403, so ids leak nothing across projects.
    return ApiError(404, f"No such {what}: {identifier!r}.", param=param, code=f"{what.replace(' ', '_')}_not_found")


def found(record: T | None, what: str, identifier: str, param: str | None = None) -> T:
    """`record`, or the 404 that says no such `what` (a lookup scoped to the caller's project)."""
    if record is None:
        raise not_found(what, identifier, param)
    return record


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)
