"""Reconciling every unfinished object of a kind again and again: the level-triggered half.

A watch event reconciles a new or changed object at once. What no event brings (a job's progress
and pod state, a server's pods, a retry after an error, a free slot for a queued job) comes from a
resync pass over every unfinished object every `interval_s`. A pass lists what its reconciles read
once, up front (`prepare`), so that its cost in API requests does not grow with the number of
objects. One loop serves a whole kind, where a kopf timer per object would put kopf's finalizer on
each one: one more write per object, and a `kubectl delete` that hangs whenever the operator is down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

log = logging.getLogger("tuneloom.operator")

Body = dict[str, Any]
Listed = TypeVar("Listed")


class Resync(Generic[Listed]):
    def __init__(
        self,
        reconcile: Callable[[Body, Listed], Any],
        prepare: Callable[[], Listed],
        is_finished: Callable[[Body], bool],
        interval_s: float,
        workers: int = 4,
    ):
        self._reconcile = reconcile
        self._prepare = prepare
        self._is_finished = is_finished
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._bodies: dict[str, Body] = {}  # uid -> the latest body seen, for every unfinished object
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
        """Records the latest body of an object: the next passes reconcile it until it is finished."""
        uid = body["metadata"]["uid"]
        with self._lock:
            if self._is_finished(body):
                self._bodies.pop(uid, None)
            else:
                self._bodies[uid] = body

    def forget(self, uid: str) -> None:
        with self._lock:
            self._bodies.pop(uid, None)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            with self._lock:
                bodies = list(self._bodies.values())
            if bodies:
                self._pass(bodies)

    def _pass(self, bodies: list[Body]) -> None:
        try:
            listed = self._prepare()
        except Exception:  # the next pass tries again
            log.exception("resync: listing the training objects failed")
            return
        # The pass ends when its last reconcile does, so that two passes never overlap.
        wait([self._pool.submit(self._reconcile_one, body, listed) for body in bodies])

    def _reconcile_one(self, body: Body, listed: Listed) -> None:
        try:
            self._reconcile(body, listed)
        except Exception:  # retried on the next pass, like any other reconcile
            log.exception("%s/%s: reconcile failed", body["metadata"]["namespace"], body["metadata"]["name"])
