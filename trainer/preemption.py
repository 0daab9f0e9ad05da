"""SIGTERM means preemption: finish the step in progress, save a checkpoint, exit "preempted".

Kubernetes sends SIGTERM to a pod it evicts, preempts or deletes, and SIGKILL once the pod's
terminationGracePeriodSeconds (`spec.checkpointing.gracePeriodSeconds`) have passed. While the
training loop runs, the signal only raises a flag: the loop looks at it at each step boundary,
where the model and the optimizer agree, so a step is never cut in half. A checkpoint write
under way finishes first, and a second SIGTERM changes nothing. A SIGKILL during the write
leaves the previous checkpoint in charge: a checkpoint counts only once its manifest, written
last, is there. Before training there is nothing to save, so the signal stops the run at once;
during the final evaluation it stops it too, and the trained weights are saved as a checkpoint
at the last step, so the retry goes straight to evaluating. Publishing is deferred as a whole:
it is short, and a half-published adapter would only be written again.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("tuneloom.trainer")


class Preempted(BaseException):
    """The run stopped on SIGTERM; `step` is where the next run resumes (None: before training).

    A BaseException, like KeyboardInterrupt: it may arrive anywhere outside the training loop,
    and no `except Exception` on the way (a storage retry, say) may swallow it."""

    def __init__(self, step: int | None):
        self.step = step
        where = "before training" if step is None else f"at step {step}: checkpoint saved"
        super().__init__(f"preempted {where}")


class PreemptionWatch:
    """Turns SIGTERM into a stop at the next step boundary while `deferred`, into Preempted outside."""

    def __init__(self) -> None:
        self.requested = False
        self._deferring = False
        self._previous: signal.Handlers | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionWatch]:
        # Python delivers signals to the main thread only; a run started from another thread
        # (an embedding application) keeps that application's handling.
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, SIGTERM only sets `requested`: the caller stops at a boundary of its choosing."""
        outer, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = outer

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        again = self.requested
        self.requested = True
        if not self._deferring:
            raise Preempted(None)
        if again:
            log.warning("SIGTERM again: still finishing the step and its checkpoint")
        else:
            log.info("SIGTERM: stopping after the step in progress, with a checkpoint")
