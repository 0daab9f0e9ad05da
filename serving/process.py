"""`tuneloom serve` as a child process on loopback, for a client that needs a server of its own for a while
(the quick start's `ask_over_http.py`, `tuneloom api`, benchmarks, tests)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuneloom.children import ChildServer
from tuneloom.net import free_port


class ServingProcess(ChildServer):
    """Starts `tuneloom serve` and waits until vLLM's /health answers; stops the whole process group."""

    name = "tuneloom serve"

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
        port = port or free_port()
        command = [
            *(sys.executable, "-I", "-m", "tuneloom.cli", "serve"),
            *("--base-model", str(base_model), "--store", store, "--host", "127.0.0.1", "--port", str(port)),
            *args,
        ]
        super().__init__(
            command, log_path, port=port, env=env, startup_timeout_s=startup_timeout_s, die_with_parent=die_with_parent
        )
