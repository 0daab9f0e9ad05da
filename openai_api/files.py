"""Uploaded files: as they arrive, written to a temporary file, sent to the object store in parts
and checked in spans of lines; committed to the store only once the check passed. A FileIndex holds their records (the
local database, or the store itself in Kubernetes mode); the store holds their bytes."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from openai.types import FileObject

from tuneloom.children import die_with_parent
from tuneloom.storage import ObjectStore
from tuneloom.trainer.datafile import WHOLE_FILE, Problem, Span, sniff_format
from tuneloom.trainer.dataspans import SpanCheck, SpanCutter, check_span, merge_checks
from tuneloom.trainer.estimate import available_cores

from .errors import ApiError, bad_request, found
from .jobs import new_id
from .state import FileRecord

FINE_TUNE = "fine-tune"
RESULTS = "fine-tune-results"
CHECK_PROCESSES = min(8, available_cores())  # spans of an upload checked at once


def file_object(record: FileRecord) -> dict[str, Any]:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        filename=record.filename,
        object="file",
        purpose=record.purpose,
        status="processed",
    ).model_dump(mode="json")


def problems_message(filename: str, first: list[Problem], total: int) -> str:
    listed = [str(problem) for problem in first]
    if total > len(first):
        listed.append(f"and {total - len(first)} more")
    noun = "problem" if total == 1 else "problems"
    return (
        f"{filename} is not valid fine-tuning data ({total} {noun}); fix these lines and upload it again "
        '(one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]}):\n' + "\n".join(listed)
    )


class FileIndex(Protocol):
    """Where file records live, each scoped to its project."""

    def add_file(self, record: FileRecord) -> None: ...
    def file(self, project: str, file_id: str) -> FileRecord | None: ...
    def files(
        self, project: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool = True
    ) -> tuple[list[FileRecord], bool]: ...
    def delete_file(self, project: str, file_id: str) -> None: ...


def refuse_purpose(purpose: str) -> None:
    if purpose != FINE_TUNE:
        raise bad_request(f"purpose {purpose!r} is not supported here; use purpose='{FINE_TUNE}'", "purpose")


class FileService:
    def __init__(self, index: FileIndex, store: ObjectStore, work_dir: Path, problems_listed: int):
        self.index, self.store, self.work_dir, self.problems_listed = index, store, work_dir, problems_listed
        work_dir.mkdir(parents=True, exist_ok=True)
        # An upload is checked beside its transfer to the store (the longer of the two is its time),
        # in spans side by side, in processes: threads would hold the GIL that the transfer needs.
        # The workers die with this thread (build the service in one that lives as long as the API).
        self._checker = ProcessPoolExecutor(
            CHECK_PROCESSES, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent
        )
        for _ in range(CHECK_PROCESSES):  # all started now, from this thread, importing the checker
            self._checker.submit(check_span, os.devnull, "chat", "warm-up", WHOLE_FILE, 0)

    def close(self) -> None:
        self._checker.shutdown(cancel_futures=True)

    @staticmethod
    def store_key(project: str, file_id: str) -> str:
        return f"api/files/{project}/{file_id}"

    def uri(self, record: FileRecord) -> str:
        """Where the trainer reads the file from."""
        return self.store.describe(record.store_key)

    def receive(self, filename: str, project: str, on_bytes: Callable[[int], None]) -> IncomingFile:
        """A fine-tuning file about to arrive, written to with IncomingFile.write."""
        return IncomingFile(self, Path(filename or "upload.jsonl").name, project, on_bytes)

    def add_result(self, project: str, filename: str, content: bytes, file_id: str | None = None) -> FileRecord:
        """A job's result file; `file_id` names it where the id must be known before the file is
        made (Kubernetes mode), else it gets a new one."""
        record = self._new_record(filename, RESULTS, project, len(content), file_id)
        self.store.put_bytes(record.store_key, content, if_absent=True)
        self.index.add_file(record)
        return record

    def _new_record(
        self, filename: str, purpose: str, project: str, size: int, file_id: str | None = None
    ) -> FileRecord:
        file_id = file_id or new_id("file")
        return FileRecord(
            id=file_id,
            project=project,
            filename=filename,
            purpose=purpose,
            bytes=size,
            created_at=int(time.time()),
            store_key=self.store_key(project, file_id),
        )

    def get(self, project: str, file_id: str) -> FileRecord:
        return found(self.index.file(project, file_id), "file", file_id, "file_id")

    def download(self, record: FileRecord) -> Path:
        """A local copy of the content; the caller removes it."""
        dest = Path(tempfile.mkdtemp(dir=self.work_dir, prefix="download-")) / "content"
        self.store.download_file(record.store_key, dest)
        return dest

    def delete(self, record: FileRecord) -> None:
        self.index.delete_file(record.project, record.id)
        self.store.delete(record.store_key)

    @staticmethod
    def remove_download(path: Path) -> None:
        shutil.rmtree(path.parent, ignore_errors=True)


class IncomingFile:
    """An upload as it arrives: its bytes go to a temporary file, from there to the store in parts
    as they are complete, and in spans of whole lines to the checker's processes; `finish` waits
    for the check and only then commits the object to the store and lists the file."""

    def __init__(self, service: FileService, filename: str, project: str, on_bytes: Callable[[int], None]):
        self.service, self.filename, self.on_bytes = service, filename, on_bytes
        self.record = service._new_record(filename, FINE_TUNE, project, 0)
        # Unbuffered: each write is in the file for the store's threads and the checkers at once.
        self._temp = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by discard)
            dir=service.work_dir, prefix="upload-", suffix=".jsonl", buffering=0
        )
        try:
            self._staged = service.store.stage_file(self.record.store_key, Path(self._temp.name), if_absent=True)
        except BaseException:
            self._temp.close()
            raise
        self._cutter = SpanCutter()
        self._checks: list[Future[SpanCheck]] = []
        self._committed = self._discarded = False

    def write(self, data: bytes) -> None:
        self._temp.write(data)
        self.record.bytes += len(data)
        self.on_bytes(len(data))
        self._staged.grown(self.record.bytes)
        self._check(self._cutter.feed(data))

    def _check(self, spans: list[Span]) -> None:
        if spans and not self._checks:
            # The first span holds at least one complete line: the first, which sniff_format reads
            # (unless the file starts with a span of blank lines, which is refused as any format).
            self.record.format = sniff_format(self._temp.name)
        submit, listed = self.service._checker.submit, self.service.problems_listed
        self._checks += [
            submit(check_span, self._temp.name, self.record.format, self.filename, span, listed) for span in spans
        ]

    def finish(self, purpose: str) -> FileRecord:
        """The stored, listed file; an ApiError naming every problem (up to the cap) if it is refused."""
        try:
            refuse_purpose(purpose)
            self._check([self._cutter.finish()])
            checked = merge_checks([check.result() for check in self._checks], self.service.problems_listed)
            if checked.problems:
                message = problems_message(self.filename, checked.first, checked.problems)
                raise ApiError(400, message, param="file", code="invalid_file")
            self._staged.commit()
            self._committed = True
        finally:
            self.discard()
        self.record.examples = checked.examples
        self.service.index.add_file(self.record)  # after the bytes: a listed file always has content
        return self.record

    def discard(self) -> None:
        """Drops what was received unless it was committed; safe to call more than once."""
        if self._discarded:
            return
        self._discarded = True
        for check in self._checks:
            check.cancel()
        if not self._committed:
            self._staged.abort()
        self._temp.close()
