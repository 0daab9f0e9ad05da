"""A `multipart/form-data` body read as it arrives: the file part's bytes go straight to the sink
that `open_file` gives (never spooled, copied or held whole), the other fields are kept as text.

FastAPI's `UploadFile` spools the whole body before the route runs; this lets an upload's
storage and check start with its first bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from .errors import ApiError

MAX_FIELD_BYTES = 64 * 1024  # a text field (purpose) is a word; more is not a form this API takes


class FileSink(Protocol):
    def write(self, data: bytes) -> None: ...


class _Dropped:
    def write(self, data: bytes) -> None:
        pass


DROPPED = _Dropped()  # a sink for a file part that is read only to reach the end of the body
Sink = TypeVar("Sink", bound=FileSink)


@dataclass
class Form(Generic[Sink]):
    fields: dict[str, str] = field(default_factory=dict)
    file: Sink | None = None


def _malformed(why: str) -> ApiError:
    return ApiError(400, f"Invalid request: the body is not a readable multipart/form-data form ({why})")


async def read_form(request: Request, file_field: str, open_file: Callable[[str, dict[str, str]], Sink]) -> Form[Sink]:
    """The form in `request`'s body; the part named `file_field` is written to the sink that
    `open_file(its filename, the fields read before it)` gives, which may refuse it by raising."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise _malformed("send it as multipart/form-data with a boundary, as the OpenAI SDK's files.create does")
    form: Form[Sink] = Form()
    part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.header_field.lower()] = part.header_value
        part.header_field, part.header_value = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if part.name == file_field and form.file is None:
            filename = disposition.get(b"filename", b"").decode("utf-8", "replace")
            form.file = part.sink = open_file(filename, form.fields)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.sink is not None:
            part.sink.write(data[start:end])
            return
        part.value += data[start:end]
        if len(part.value) > MAX_FIELD_BYTES:
            raise ApiError(
                400, f"Invalid request: field {part.name!r} is over {MAX_FIELD_BYTES} bytes", param=part.name
            )

    def on_part_end() -> None:
        nonlocal part
        if part.sink is None:
            form.fields.setdefault(part.name, part.value.decode("utf-8", "replace"))
        part = _Part()

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise _malformed(str(error)) from None
    return form


@dataclass
class _Part:
    """The part being read."""

    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    value: bytes = b""
    sink: FileSink | None = None
