"""A large JSONL file cut into spans of lines as its bytes arrive, the spans checked side by side
(one process each) with the same problems, on the same line numbers, as one check of the whole
file; and the checks merged again.

Each span after the first starts at a non-blank line, so a span that ends in blank lines knows
content follows them (`datafile.iter_checked`). Never holds more than a chunk of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneloom.trainer.datafile import Problem, Span, iter_checked
from tuneloom.trainer.quickcheck import quick_check

MIN_SPAN_BYTES = 16 * 1024 * 1024  # below this, a span's own start-up costs more than it saves
_BLANK_BYTES = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes: a line of only these is blank


class SpanCutter:
    """Cuts a file into spans of at least MIN_SPAN_BYTES while it is written: `feed` takes its
    bytes in order and returns the spans they complete, `finish` the last one (to the end).

    A span ends just before a line whose first byte is not blank, so that line is not blank; a
    file with no such line after MIN_SPAN_BYTES stays one span."""

    def __init__(self) -> None:
        self._start, self._first_line = 0, 1  # the open span
        self._offset = 0  # bytes fed so far
        self._newlines = 0  # in the bytes fed so far
        self._ended_in_newline = False  # the last byte fed was "\n"

    def feed(self, data: bytes) -> list[Span]:
        spans, counted = [], 0  # counted: data[:counted] is in self._newlines
        if data and self._ended_in_newline and self._may_cut_at(self._offset) and data[0] not in _BLANK_BYTES:
            spans.append(self._cut(self._offset))
        search = 0
        while (newline := data.find(b"\n", max(search, self._start + MIN_SPAN_BYTES - 1 - self._offset))) != -1:
            search = newline + 1
            if search < len(data) and data[search] not in _BLANK_BYTES:
                self._newlines += data.count(b"\n", counted, search)
                counted = search
                spans.append(self._cut(self._offset + search))
        self._newlines += data.count(b"\n", counted)
        self._offset += len(data)
        self._ended_in_newline = data.endswith(b"\n") if data else self._ended_in_newline
        return spans

    def finish(self) -> Span:
        return Span(self._start, None, self._first_line)

    def _may_cut_at(self, offset: int) -> bool:
        return offset - self._start >= MIN_SPAN_BYTES

    def _cut(self, offset: int) -> Span:
        """The open span, ended at `offset` (a line start; every newline before it is counted)."""
        span = Span(self._start, offset, self._first_line)
        self._start, self._first_line = offset, self._newlines + 1
        return span


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
    for item in iter_checked(path, fmt, source=source, span=span, quick=quick_check(fmt)):
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
