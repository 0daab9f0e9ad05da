"""Child processes: servers on loopback that a parent starts and waits for, and children that must
not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tuneloom.net import answers_ok

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A Popen preexec_fn: the kernel sends the child SIGKILL when the thread that started it ends
    (Linux; elsewhere a no-op). So start such children from a thread that lives as long as the process."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildServer:
    """A server as a child process on 127.0.0.1, leading its own process group. start() waits until
    GET /health answers 200; stop() ends the whole group."""

    name = "server"

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        *,
        port: int,
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 420.0,
        die_with_parent: bool = False,
    ):
        self.command, self.port = list(command), port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # appended: a restarted server keeps its earlier log
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._healthy():
            self._still_starting(deadline)
            time.sleep(0.5)
        return self

    def _still_starting(self, deadline: float) -> None:
        """Raises, with the log's tail, once the server has exited or the deadline has passed."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        if time.monotonic() > deadline:
            self.stop()
            waited = f"{self.startup_timeout_s:.0f} s"
            raise RuntimeError(f"{self.name} not healthy after {waited}:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        return answers_ok(f"{self.url}/health")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if not self.running():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
