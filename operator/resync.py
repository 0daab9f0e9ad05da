"""Reconciling every unfinished FineTuneJob again and again: the operator's level-triggered half.

A watch event starts a job at once. What no event brings (the trainer's progress, its pod's
state, a retry after an error, a free slot for a queued job) comes from reconciling each unfinished
job again every `interval_s`, counted from its last reconcile. One loop serves every job, where a
kopf timer per object would put kopf's finalizer on each FineTuneJob: one more write per job, and
a `kubectl delete` that hangs whenever the operator is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("tuneloom.operator")

Body = dict[str, Any]


class Resync:
    def __init__(
        self,
        reconcile: Callable[[Body], Any],
        is_finished: Callable[[Body], bool],
        interval_s: float,
        workers: int = 4,
    ):
        self._reconcile = reconcile
        self._is_finished = is_finished
        self._interval_s = interval_s
        self._tick_s = min(0.5, interval_s / 4)
        self._lock = threading.Lock()
        self._bodies: dict[str, Body] = {}  # uid -> the latest body seen, for every unfinished job
        self._due: dict[str, float] = {}  # uid -> when it is next reconciled (monotonic)
        self._in_flight: set[str] = set()
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="resync")
        self._thread = threading.Thread(target=self._run, name="resync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def track(self, body: Body) -> None:
        """Records the latest body of a job; an unfinished one is due `interval_s` from now
        unless it already has a turn."""
        uid = body["metadata"]["uid"]
        with self._lock:
            if self._is_finished(body):
                self._drop(uid)
                return
            self._bodies[uid] = body
            self._due.setdefault(uid, time.monotonic() + self._interval_s)

    def reconciled(self, uid: str) -> None:
        """A reconcile just ran outside the loop: the next one can wait a full interval."""
        with self._lock:
            if uid in self._due:
                self._due[uid] = time.monotonic() + self._interval_s

    def forget(self, uid: str) -> None:
        with self._lock:
            self._drop(uid)

    def _drop(self, uid: str) -> None:
        self._bodies.pop(uid, None)
        self._due.pop(uid, None)

    def _run(self) -> None:
        while not self._stopped.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                due = [uid for uid, at in self._due.items() if at <= now and uid not in self._in_flight]
                for uid in due:
                    self._in_flight.add(uid)
                    self._due[uid] = now + self._interval_s
                bodies = [self._bodies[uid] for uid in due]
            for body in bodies:
                self._pool.submit(self._reconcile_one, body)

    def _reconcile_one(self, body: Body) -> None:
        uid = body["metadata"]["uid"]
        try:
            self._reconcile(body)
        except Exception:  # retried on its next turn, like any other reconcile
            log.exception("%s/%s: reconcile failed", body["metadata"]["namespace"], body["metadata"]["name"])
        finally:
            with self._lock:
                self._in_flight.discard(uid)
