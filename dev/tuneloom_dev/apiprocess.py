"""`tuneloom api` as a real child process on 127.0.0.1, for the tests and bench/api.py."""

from __future__ import annotations

import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import openai

from tuneloom.children import ChildServer
from tuneloom.net import free_port


class ApiProcess(ChildServer):
    name = "tuneloom api"

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path, port: int | None = None):
        port = port or free_port()
        command = [sys.executable, "-I", "-m", "tuneloom.cli", "api", "--port", str(port), *args]
        super().__init__(command, log_path, port=port, env=env, startup_timeout_s=120)

    def client(self, key: str, timeout: float = 900) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=timeout)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def kill(self) -> None:
        """SIGKILL to the API alone, as when the machine loses the process: no shutdown code runs."""
        if self.running():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
