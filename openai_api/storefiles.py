"""File records as JSON objects in the object store, beside the files' bytes: Kubernetes mode keeps
no state of its own, so a restarted (or a second) API pod sees every file. One object a file, at
`api/file-records/<project>/<file id>.json`; listing reads the project's records, newest first by
creation time (then id)."""

from __future__ import annotations

from tuneloom.storage import ObjectNotFoundError, ObjectStore

from .objects import page_after
from .state import FileRecord

RECORDS = "api/file-records"


def record_key(project: str, file_id: str) -> str:
    return f"{RECORDS}/{project}/{file_id}.json"


class StoreFileIndex:
    def __init__(self, store: ObjectStore):
        self.store = store

    def add_file(self, record: FileRecord) -> None:
        self.store.put_bytes(record_key(record.project, record.id), record.model_dump_json().encode(), if_absent=True)

    def file(self, project: str, file_id: str) -> FileRecord | None:
        if "/" in file_id or not file_id:  # an id never names another project's prefix
            return None
        try:
            return FileRecord.model_validate_json(self.store.get_bytes(record_key(project, file_id)))
        except ObjectNotFoundError:
            return None

    def files(
        self, project: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool = True
    ) -> tuple[list[FileRecord], bool]:
        records = []
        for key in self.store.list(f"{RECORDS}/{project}/"):
            try:
                records.append(FileRecord.model_validate_json(self.store.get_bytes(key)))
            except ObjectNotFoundError:
                continue  # deleted while listing
        records.sort(key=lambda r: (r.created_at, r.id), reverse=newest_first)
        records = [r for r in records if purpose is None or r.purpose == purpose]
        return page_after(records, after, limit, lambda record: record.id)

    def delete_file(self, project: str, file_id: str) -> None:
        self.store.delete(record_key(project, file_id))
