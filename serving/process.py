"""`tuneloom serve` as a child process on loopback, for a client that needs a server of its own for a while
(the quick start's `ask_over_http.py`, benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tuneloom.children import die_with_parent
from tuneloom.net import free_port


class ServingProcess:
    """Starts `tuneloom serve` and waits until vLLM's /health answers; stops the whole process group."""

    def __init__(
        self,
        base_model: Path | str,
        store: str,
        log_path: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        startup_timeout_s: float = 420.0,
        die_with_parent: bool = False,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [
            *(sys.executable, "-I", "-m", "tuneloom.cli", "serve"),
            *("--base-model", str(base_model), "--store", store, "--host", "127.0.0.1", "--port", str(self.port)),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServingProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
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
            if self.process.poll() is not None:
                raise RuntimeError(f"tuneloom serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                waited = f"{self.startup_timeout_s:.0f} s"
                raise RuntimeError(f"tuneloom serve not healthy after {waited}:\n{self.log_tail()}")
            time.sleep(1)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ServingProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
