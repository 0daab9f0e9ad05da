"""A large JSONL file cut into spans of lines that are checked side by side (one process each),
with the same problems, on the same line numbers, as one check of the whole file; and the
checks merged again.

Each span after the first starts at a non-blank line, so a span that ends in blank lines knows
content follows them (`datafile.iter_checked`). Never holds more than a chunk of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tuneloom.trainer.datafile import WHOLE_FILE, Problem, Span, iter_checked

CHUNK = 1024 * 1024
MIN_SPAN_BYTES = 16 * 1024 * 1024  # below this, a span's own start-up costs more than it saves


def split_spans(path: Path | str, count: int) -> list[Span]:
    """Up to `count` spans of about equal size covering the file, in order."""
    path = Path(path)
    size = path.stat().st_size
    count = min(count, size // MIN_SPAN_BYTES)
    if count <= 1:
        return [WHOLE_FILE]
    with path.open("rb") as handle:
        found = {_content_line_after(handle, size * k // count) for k in range(1, count)}
        starts = sorted({0} | {start for start in found if start is not None})
        first_lines = _line_numbers(handle, starts)
    ends = [*starts[1:], None]
    return [Span(start, end, line) for start, end, line in zip(starts, ends, first_lines, strict=True)]


def _content_line_after(handle: IO[bytes], offset: int) -> int | None:
    """Where the first non-blank line starting at or after `offset` (> 0) starts; None if none does."""
    handle.seek(offset - 1)
    _skip_rest_of_line(handle)  # offset - 1 is in the line before, or is its "\n"
    while True:
        start = handle.tell()
        piece = handle.readline(CHUNK)
        blank = not piece.strip()
        while piece and blank and not piece.endswith(b"\n"):  # a long line, read a chunk at a time
            piece = handle.readline(CHUNK)
            blank = not piece.strip()
        if not piece:
            return None
        if not blank:
            return start


def _skip_rest_of_line(handle: IO[bytes]) -> None:
    while (piece := handle.readline(CHUNK)) and not piece.endswith(b"\n"):
        pass


def _line_numbers(handle: IO[bytes], starts: list[int]) -> list[int]:
    """The line number at each of `starts` (ascending offsets of line starts)."""
    handle.seek(0)
    numbers, newlines, position = [], 0, 0
    for start in starts:
        while position < start:
            chunk = handle.read(min(CHUNK, start - position))
            newlines += chunk.count(b"\n")
            position += len(chunk)
        numbers.append(newlines + 1)
    return numbers


@dataclass(frozen=True)
class SpanCheck:
    """What a check of a span (or of several, merged) found: examples, the first problems, and how many."""

    examples: int
    first: list[Problem]
    problems: int


def check_span(path: str, fmt: str, source: str, span: Span, listed: int) -> SpanCheck:
    """The lines of `span` checked as `fmt`, problems named after `source`, the first `listed` of
    them kept; holds none of the file in memory (this runs in a worker process)."""
    examples, first, problems = 0, [], 0
    for item in iter_checked(path, fmt, source=source, span=span):
        if isinstance(item, Problem):
            problems += 1
            first += [item] if len(first) < listed else []
        else:
            examples += 1
    return SpanCheck(examples, first, problems)


def merge_checks(parts: list[SpanCheck], listed: int) -> SpanCheck:
    """The checks of a file's spans, in order, as one check of the whole file."""
    first = [problem for part in parts for problem in part.first][:listed]
    return SpanCheck(sum(part.examples for part in parts), first, sum(part.problems for part in parts))
