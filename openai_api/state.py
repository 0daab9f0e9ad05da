"""The API's state in an embedded SQLite database: files, jobs, events, checkpoints and deleted
models. The only module that writes SQL. Every write is one transaction, so a killed API loses
nothing it has answered for."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, project TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    store_key TEXT NOT NULL, examples INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0,
    format TEXT NOT NULL DEFAULT 'chat');
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, project TEXT NOT NULL,
    created_at INTEGER NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, step INTEGER NOT NULL,
    created_at INTEGER NOT NULL, metrics TEXT NOT NULL, UNIQUE (job_id, step));
CREATE TABLE IF NOT EXISTS deleted_models (
    model_id TEXT PRIMARY KEY, project TEXT NOT NULL, deleted_at INTEGER NOT NULL);
"""


class FileRecord(BaseModel):
    id: str
    project: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    store_key: str
    examples: int = 0
    # The data format its lines were checked as on upload: "chat" or "preference" (pairs, for DPO).
    format: str = "chat"


class JobRecord(BaseModel):
    """A job as the API keeps it: the request as resolved, and where the run stands."""

    id: str
    project: str
    created_at: int
    model: str  # as the client sent it
    base_model: str  # the base model's id (models.BaseModel.id)
    method: str = "supervised"  # OpenAI's method.type: supervised or dpo
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    suffix: str | None = None
    seed: int
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    adapter_name: str
    fine_tuned_model: str
    status: str = "validating_files"
    adapter_version: str | None = None
    # The trainer's promotion verdict on the final version ({"promoted", "reasons"}); an unpromoted
    # version is kept in the registry but is not the job's fine_tuned_model.
    promotion: dict[str, Any] | None = None
    final_step: int | None = None  # the final version's step: its checkpoint is that version
    finished_at: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    error: dict[str, Any] | None = None
    result_files: list[str] = Field(default_factory=list)
    # Set before the trainer is signalled, so a restart in between still ends the job as asked.
    stopping: str | None = None

    @property
    def model_created(self) -> bool:
        """Whether the job made its fine_tuned_model: it succeeded and its version was promoted."""
        return self.status == "succeeded" and (self.promotion is None or bool(self.promotion.get("promoted", True)))


class EventRecord(BaseModel):
    seq: int
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class CheckpointRecord(BaseModel):
    seq: int
    job_id: str
    step: int
    created_at: int
    metrics: dict[str, Any]


class NewEvent(BaseModel):
    message: str
    level: str = "info"
    type: str = "message"
    data: dict[str, Any] | None = None
    created_at: int | None = None


def _page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    return rows[:limit], len(rows) > limit


class State:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A database made before files had a format gains the column; its files were all chat."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(files)")}
        if "format" not in columns:
            self._db.execute("ALTER TABLE files ADD COLUMN format TEXT NOT NULL DEFAULT 'chat'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # files

    def add_file(self, record: FileRecord) -> None:
        fields = record.model_dump()
        names = ", ".join(fields)
        self._write([(f"INSERT INTO files ({names}) VALUES ({', '.join('?' * len(fields))})", list(fields.values()))])

    def file(self, project: str, file_id: str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE id = ? AND project = ? AND deleted = 0", (file_id, project))
        return FileRecord.model_validate(dict(rows[0])) if rows else None

    def files(
        self, project: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool = True
    ) -> tuple[list[FileRecord], bool]:
        sql, args = "SELECT * FROM files WHERE project = ? AND deleted = 0", [project]
        if purpose:
            sql, args = sql + " AND purpose = ?", [*args, purpose]
        if after:
            sql += f" AND seq {'<' if newest_first else '>'} (SELECT seq FROM files WHERE id = ?)"
            args.append(after)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self._query(sql, [*args, limit + 1])
        return _page([FileRecord.model_validate(dict(row)) for row in rows], limit)

    def delete_file(self, project: str, file_id: str) -> None:
        self._write([("UPDATE files SET deleted = 1 WHERE id = ? AND project = ?", (file_id, project))])

    # jobs

    def add_job(self, job: JobRecord, first_event: NewEvent) -> None:
        self._write(
            [
                (
                    "INSERT INTO jobs (id, project, created_at, record) VALUES (?, ?, ?, ?)",
                    (job.id, job.project, job.created_at, job.model_dump_json()),
                ),
                self._event_insert(job.id, first_event),
            ]
        )

    def job(self, job_id: str, project: str | None = None) -> JobRecord | None:
        rows = self._query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        job = JobRecord.model_validate_json(rows[0]["record"]) if rows else None
        return job if job and (project is None or job.project == project) else None

    def jobs(self, project: str, *, after: str | None, limit: int, metadata: dict[str, str]) -> tuple[list, bool]:
        sql, args = "SELECT record FROM jobs WHERE project = ?", [project]
        if after:
            sql, args = sql + " AND seq < (SELECT seq FROM jobs WHERE id = ?)", [*args, after]
        for key, value in metadata.items():
            sql, args = sql + " AND json_extract(record, '$.metadata.' || json_quote(?)) = ?", [*args, key, value]
        rows = self._query(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1])
        return _page([JobRecord.model_validate_json(row["record"]) for row in rows], limit)

    def jobs_in(self, statuses: Sequence[str]) -> list[JobRecord]:
        """Jobs in these statuses, oldest first: the order they run in."""
        marks = ", ".join("?" * len(statuses))
        rows = self._query(
            f"SELECT record FROM jobs WHERE json_extract(record, '$.status') IN ({marks}) ORDER BY seq", statuses
        )
        return [JobRecord.model_validate_json(row["record"]) for row in rows]

    def job_counts(self) -> dict[str, int]:
        rows = self._query("SELECT json_extract(record, '$.status') AS status, COUNT(*) AS n FROM jobs GROUP BY 1")
        return {row["status"]: row["n"] for row in rows}

    def job_for_model(self, project: str, fine_tuned_model: str) -> JobRecord | None:
        rows = self._query(
            "SELECT record FROM jobs WHERE project = ? AND json_extract(record, '$.fine_tuned_model') = ?",
            (project, fine_tuned_model),
        )
        return JobRecord.model_validate_json(rows[0]["record"]) if rows else None

    def update_job(
        self, job: JobRecord, events: Sequence[NewEvent] = (), checkpoints: Sequence[tuple[int, dict]] = ()
    ) -> None:
        """Saves `job` with the events and checkpoints that go with the change, in one transaction."""
        statements = [("UPDATE jobs SET record = ? WHERE id = ?", (job.model_dump_json(), job.id))]
        statements += [self._event_insert(job.id, event) for event in events]
        statements += [
            (
                "INSERT OR REPLACE INTO checkpoints (job_id, step, created_at, metrics) VALUES (?, ?, ?, ?)",
                (job.id, step, int(time.time()), json.dumps(metrics)),
            )
            for step, metrics in checkpoints
        ]
        self._write(statements)

    @staticmethod
    def _event_insert(job_id: str, event: NewEvent) -> tuple[str, Sequence[Any]]:
        data = json.dumps(event.data) if event.data is not None else None
        created = event.created_at or int(time.time())
        return (
            "INSERT INTO events (job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, created, event.level, event.message, event.type, data),
        )

    # events and checkpoints

    def events(self, job_id: str, *, after: int | None, limit: int) -> tuple[list[EventRecord], bool]:
        """Newest first, as OpenAI lists them; `after` is the seq of the last event seen."""
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if after is not None:
            sql, args = sql + " AND seq < ?", [*args, after]
        rows = self._query(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1])
        return _page([self._event(row) for row in rows], limit)

    def all_events(self, job_id: str) -> list[EventRecord]:
        return [
            self._event(row) for row in self._query("SELECT * FROM events WHERE job_id = ? ORDER BY seq", (job_id,))
        ]

    @staticmethod
    def _event(row: sqlite3.Row) -> EventRecord:
        fields = dict(row)
        fields["data"] = json.loads(fields["data"]) if fields["data"] else None
        return EventRecord.model_validate(fields)

    def checkpoints(self, job_id: str, *, after: int | None, limit: int) -> tuple[list[CheckpointRecord], bool]:
        sql, args = "SELECT * FROM checkpoints WHERE job_id = ?", [job_id]
        if after is not None:
            sql, args = sql + " AND step < ?", [*args, after]
        rows = self._query(sql + " ORDER BY step DESC LIMIT ?", [*args, limit + 1])
        records = [CheckpointRecord.model_validate({**dict(r), "metrics": json.loads(r["metrics"])}) for r in rows]
        return _page(records, limit)

    # models

    def delete_model(self, project: str, model_id: str) -> None:
        self._write(
            [
                (
                    "INSERT OR IGNORE INTO deleted_models (model_id, project, deleted_at) VALUES (?, ?, ?)",
                    (model_id, project, int(time.time())),
                )
            ]
        )

    def model_deleted(self, model_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM deleted_models WHERE model_id = ?", (model_id,)))
