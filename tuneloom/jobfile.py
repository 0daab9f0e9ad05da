"""Reading API documents (FineTuneJob files, and any kind's decoded object), with errors that name
the file or object, the line and the field."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tuneloom.api import FineTuneJob

# A job file is a page of settings. The cap bounds what parsing it can cost, whatever it holds.
MAX_JOB_FILE_BYTES = 1024 * 1024
# A FineTuneJob nests about 5 levels deep; PyYAML's pure-Python composer recurses per level.
MAX_NESTING = 32
# libyaml when PyYAML was built with it: 10 to 20 times faster on a file near the size cap.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

M = TypeVar("M", bound=BaseModel)


class SpecError(ValueError):
    """An API document that cannot be used; `problems` holds one 'where: field: what' line each."""

    def __init__(self, problems: list[str], kind: str = "FineTuneJob"):
        self.problems = problems
        super().__init__(f"invalid {kind}:\n  " + "\n  ".join(problems))


def _describe(error: dict[str, Any], document_kind: str) -> str:
    """One pydantic error as a sentence that says what was wrong and what was given."""
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    bounds = {
        "greater_than": ("> ", "gt"),
        "greater_than_equal": (">= ", "ge"),
        "less_than": ("< ", "lt"),
        "less_than_equal": ("<= ", "le"),
    }
    if kind in bounds:
        symbol, key = bounds[kind]
        return f"must be {symbol}{ctx[key]}, got {given!r}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        explain = f"kubectl explain {document_kind.lower()}.spec"
        return f"unknown field; check its spelling against `{explain}` or the README reference"
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected')}, got {given!r}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{error['msg'].lower()}, got {given!r}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    return f"{error['msg']}, got {given!r}"


def _field_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Maps each key path of a YAML document to its 1-based line, so errors can point at it."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            lines.update(_line_index(value, child))
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_index(item, (*path, index)))
    return lines


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """A missing field has no line of its own; point at its closest existing parent."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def parse_document(model: type[M], data: Any, *, source: str, lines: dict[tuple[Any, ...], int] | None = None) -> M:
    """Validates a decoded document of the API kind `model`; raises SpecError naming every problem as
    `source[:line]: field: what` (`lines`: each key path's line in the file it came from)."""
    kind = model.__name__
    if not isinstance(data, dict):
        raise SpecError([f"{source}: expected a {kind} mapping, got {type(data).__name__}"], kind)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
            line = _nearest_line(lines, loc) if lines else None
            where = f"{source}:{line}" if line else source
            field = _field_path(loc) or "(document)"
            problems.append(f"{where}: {field}: {_describe(error, kind)}")
        raise SpecError(problems, kind) from None


def parse_job(data: Any, *, source: str = "<spec>", lines: dict[tuple[Any, ...], int] | None = None) -> FineTuneJob:
    """Validates a decoded FineTuneJob document; raises SpecError naming every problem."""
    return parse_document(FineTuneJob, data, source=source, lines=lines)


def _read_text(path: Path) -> str:
    """The file's text, never reading more than the cap (a pipe or /dev/zero has no size to check)."""
    try:
        info = path.stat()
        if stat.S_ISREG(info.st_mode) and info.st_size > MAX_JOB_FILE_BYTES:
            raise SpecError([_too_big(path, f"{info.st_size} bytes")])
        with path.open("rb") as handle:
            data = handle.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise SpecError([_too_big(path, f"more than {MAX_JOB_FILE_BYTES} bytes")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not valid UTF-8 (byte {exc.start + 1}); save the file as UTF-8"]) from None


def _too_big(path: Path, size: str) -> str:
    return f"{path}: {size}; a FineTuneJob file may have at most {MAX_JOB_FILE_BYTES} bytes (1 MiB)"


def _refuse_expansion(text: str, source: str) -> None:
    """Refuses aliases and deep nesting, reading only the event stream, before anything is built.

    An alias repeats its anchor's whole value, so ten nested levels of them ("billion laughs")
    turn a 1 KB file into 10**9 values for whatever walks the document. A job file has no need
    for them.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1
            raise SpecError(
                [
                    f"{source}:{line}: YAML aliases (*{event.anchor}) are not allowed in a FineTuneJob file; "
                    "write the values out"
                ]
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                line = event.start_mark.line + 1
                raise SpecError(
                    [f"{source}:{line}: nested more than {MAX_NESTING} levels deep; a FineTuneJob needs about 5"]
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_job(path: str | Path) -> FineTuneJob:
    """Reads one FineTuneJob from a YAML file of at most MAX_JOB_FILE_BYTES, without aliases."""
    path = Path(path)
    text = _read_text(path)
    try:
        _refuse_expansion(text, str(path))
        node = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)  # a safe loader either way: SafeLoader or CSafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError([f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_job(data, source=str(path), lines=_line_index(node) if node is not None else None)
