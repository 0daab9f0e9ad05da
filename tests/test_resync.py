"""The resync loop's bookkeeping (pure logic: the reconcile and listing are plain functions)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from tuneloom.operator.resync import Resync

from .kube import wait_for


def _body(uid: str, phase: str | None = None) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "namespace": "team-a", "name": uid}, "status": {"phase": phase} if phase else {}}


class Recorder:
    def __init__(self, failing: set[str] = frozenset()):
        self.reconciled: Counter[str] = Counter()
        self.listings = 0
        self.seen_listings: set[int] = set()
        self.failing = failing
        self._lock = threading.Lock()

    def prepare(self) -> int:
        with self._lock:
            self.listings += 1
            return self.listings

    def reconcile(self, body: dict[str, Any], listing: int) -> None:
        with self._lock:
            self.reconciled[body["metadata"]["uid"]] += 1
            self.seen_listings.add(listing)
        if body["metadata"]["uid"] in self.failing:
            raise RuntimeError("the API server said no")


def _resync(recorder: Recorder) -> Resync[int]:
    finished = lambda body: body["status"].get("phase") == "Succeeded"  # noqa: E731
    return Resync(recorder.reconcile, recorder.prepare, finished, interval_s=0.02)


def test_every_unfinished_job_is_reconciled_again_with_one_listing_per_pass() -> None:
    recorder = Recorder()
    resync = _resync(recorder)
    for uid in ("a", "b", "c"):
        resync.track(_body(uid, "Running"))
    resync.start()
    try:
        wait_for(lambda: min(recorder.reconciled[uid] for uid in "abc") >= 3, "three passes over every job")
    finally:
        resync.stop()
    # Each pass listed once, and reconciled every job once with that listing.
    assert recorder.reconciled["a"] == recorder.reconciled["b"] == recorder.reconciled["c"] == recorder.listings
    assert recorder.seen_listings == set(range(1, recorder.listings + 1))


def test_finished_and_forgotten_jobs_drop_out_and_failures_do_not_stop_the_loop() -> None:
    recorder = Recorder(failing={"flaky"})
    resync = _resync(recorder)
    for uid in ("done", "deleted", "flaky", "running"):
        resync.track(_body(uid, "Running"))
    resync.track(_body("done", "Succeeded"))  # its latest body says it is finished
    resync.forget("deleted")
    resync.start()
    try:
        wait_for(lambda: recorder.reconciled["running"] >= 3, "passes after a failing reconcile")
    finally:
        resync.stop()
    assert recorder.reconciled["flaky"] >= 3  # retried on every pass
    assert recorder.reconciled["done"] == 0 and recorder.reconciled["deleted"] == 0
