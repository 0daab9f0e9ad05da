"""Free loopback ports and readiness checks, for servers started on this machine (`tuneloom serve` as
a child process)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from contextlib import ExitStack

LOCALHOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now on 127.0.0.1; the sockets are held open together so
    none repeats (the caller binds them soon after)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOCALHOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def answers_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 now (a server's health or readiness route)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
