"""One lock per key (a job, an adapter version), made on first use: work on one object runs one at
a time, while work on different objects runs side by side."""

from __future__ import annotations

import threading


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, key: str) -> None:
        """Drops a key that is gone for good (a deleted object), so the locks do not pile up."""
        with self._guard:
            self._locks.pop(key, None)
