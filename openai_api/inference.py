"""Inference: one `tuneloom serve` (vLLM) per base model, started on first use and kept running,
and the proxy that sends chat, completions and responses requests to it with streaming intact.

Clients name fine-tuned models by their `ft:` ids; vLLM knows them by the registry's pinned
`namespace/name@version`. The proxy rewrites `model` on the way in and back on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tuneloom.names import AdapterId
from tuneloom.serving.process import ServingProcess

from .errors import ApiError
from .models import BaseModel

log = logging.getLogger("tuneloom.api")

SERVE_KEY_ENV = "TUNELOOM_API_SERVE_KEY"
PROXY_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=600.0)


@dataclass(frozen=True)
class Target:
    """Where a request goes: the base model's server and the name vLLM knows the model by."""

    base: BaseModel
    served_name: str
    project: str | None = None  # a fine-tuned model's: its server must allow this namespace


class ServeManager:
    def __init__(
        self,
        store: str,
        work_dir: Path,
        projects: Callable[[], list[str]],
        max_model_len: int | None,
        startup_timeout_s: float,
    ):
        self.store, self.work_dir, self.projects = store, work_dir, projects
        self.max_model_len, self.startup_timeout_s = max_model_len, startup_timeout_s
        # The API's own key for its servers (loopback only): no client reaches them around the API.
        self.key = secrets.token_urlsafe(24)
        self._servers: dict[str, ServingProcess] = {}
        self._allowed: dict[str, frozenset[str]] = {}  # the projects each server was started for
        self._groups_file = work_dir / "process-groups"
        reap_orphans(self._groups_file)
        self._lock = threading.Lock()
        # One long-lived thread starts every server: each dies with the thread that started it.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-starter")
        self.client = httpx.AsyncClient(timeout=PROXY_TIMEOUT)

    async def server_for(self, base: BaseModel, project: str | None) -> ServingProcess:
        """The running server of `base`, started if there is none or if it does not allow
        `project` (a project whose key was added after it started)."""
        with self._lock:
            server = self._usable(base, project)
        if server is not None:
            return server
        return await asyncio.wrap_future(self._starter.submit(self._start, base, project))

    def _usable(self, base: BaseModel, project: str | None) -> ServingProcess | None:
        server = self._servers.get(base.id)
        if server is None or not server.running():
            return None
        return server if project is None or project in self._allowed[base.id] else None

    def _start(self, base: BaseModel, project: str | None) -> ServingProcess:
        with self._lock:
            usable, running = self._usable(base, project), self._servers.get(base.id)
        if usable is not None:
            return usable  # started while this request waited its turn
        if running is not None:
            log.info("restarting tuneloom serve for %s to serve project %s", base.id, project)
            running.stop()
        allowed = sorted(set(self.projects()) | ({project} if project else set()))
        args = ["--api-key-env", SERVE_KEY_ENV, "--served-model-name", base.id]
        args += ["--allowed-namespaces", ",".join(allowed)]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / f"serve-{len(self._servers)}.log"
        log.info("starting tuneloom serve for %s (log %s)", base.id, log_path)
        server = ServingProcess(
            base.directory,
            self.store,
            log_path,
            args=args,
            env={SERVE_KEY_ENV: self.key},
            startup_timeout_s=self.startup_timeout_s,
            die_with_parent=True,
        )
        try:
            server.start()
        except RuntimeError:
            log.exception("tuneloom serve for %s did not start", base.id)
            raise ApiError(
                503,
                "The inference server for this model did not start; retry in a minute",
                type="server_error",
                code="server_unavailable",
            ) from None
        with self._lock:
            self._servers[base.id], self._allowed[base.id] = server, frozenset(allowed)
            with self._groups_file.open("a") as groups:
                groups.write(f"{server.process.pid}\n")
        return server

    def close(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
        for server in servers:
            server.stop()
        self._starter.shutdown(wait=False)

    async def forward(self, target: Target, path: str, body: dict[str, Any], client_name: str):
        """vLLM's answer: (status, media type, body or async byte stream)."""
        server = await self.server_for(target.base, target.project)
        return await proxy(self.client, server.url, self.key, target.served_name, path, body, client_name)


async def proxy(
    client: httpx.AsyncClient,
    server_url: str,
    key: str | None,
    served_name: str,
    path: str,
    body: dict[str, Any],
    client_name: str,
):
    """Sends `body` to the vLLM server at `server_url` as `served_name`; its answer (status, media
    type, body or async byte stream) names the model as the client did."""
    payload = json.dumps({**body, "model": served_name}).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = client.build_request("POST", f"{server_url}{path}", content=payload, headers=headers)
    response = await client.send(request, stream=True)
    rename = ModelRenamer(served_name, client_name)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return response.status_code, "text/event-stream", rename.stream(response)
    try:
        content = await response.aread()
    finally:
        await response.aclose()
    return response.status_code, response.headers.get("content-type", "application/json"), rename.body(content)


def reap_orphans(groups_file: Path) -> None:
    """Ends what servers of an API that was killed left behind. `tuneloom serve` dies with the API,
    but vLLM's engine processes outlive it; each server led its own process group, recorded here."""
    if not groups_file.exists():
        return
    for line in groups_file.read_text().split():
        group = int(line)
        for member in _group_members(group):
            if b"vllm" in _cmdline(member).lower():  # a reused group id is left alone
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(member, signal.SIGKILL)
                    log.info("ended pid %d, left over from an earlier API's inference server", member)
    groups_file.unlink()


def _group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == group:
                    members.append(int(entry.name))
    return members


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class ModelRenamer:
    """Puts the client's model name back where vLLM wrote its own, in a body or an SSE stream."""

    def __init__(self, served: str, client: str):
        self.served, self.client = served, client

    def _fix(self, value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("model") == self.served:
                value["model"] = self.client
            for key in ("response",):  # the Responses API nests the model in stream events
                if isinstance(value.get(key), dict):
                    self._fix(value[key])
        return value

    def body(self, content: bytes) -> bytes:
        try:
            return json.dumps(self._fix(json.loads(content))).encode()
        except ValueError:
            return content

    def line(self, line: bytes) -> bytes:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            return line
        return b"data: " + self.body(line[len(b"data: ") :])

    async def stream(self, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for line in response.aiter_lines():
                yield self.line(line.encode()) + b"\n"
        finally:
            await response.aclose()


def adapter_served_name(project: str, adapter_name: str, version: str) -> str:
    return AdapterId(project, adapter_name, version).served_name
