"""A large JSONL file cut into spans of lines that are checked side by side (one process each),
with the same problems, on the same line numbers, as one check of the whole file.

Each span after the first starts at a non-blank line, so a span that ends in blank lines knows
content follows them (`datafile.iter_checked`). Never holds more than a chunk of the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from tuneloom.trainer.datafile import WHOLE_FILE, Span

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
