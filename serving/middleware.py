"""ASGI middleware in front of vLLM's OpenAI server (`--middleware`).

For each generation request it turns the client's `model` into a pinned, checked adapter
version before vLLM sees it, answers problems with a clear OpenAI-style error and the right HTTP
status, and counts requests and tokens per adapter. Runtime load requests may name a registry
version (`lora_path: tuneloom://<ns>/<name>@<version>`); it fetches that and passes the local
path on. An unload waits for the adapter's requests in flight and holds back new ones until it is
done (see `AdapterGates`). Everything else goes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from tuneloom.serving import metrics
from tuneloom.serving.adapters import REGISTRY_SCHEME, AdapterSource
from tuneloom.serving.names import AdapterError, AdapterRef, InvalidAdapterName

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"


class AdapterRouting:
    def __init__(self, app: ASGIApp, source: AdapterSource | None = None):
        from tuneloom.serving.plugin import adapter_source

        self.app = app
        self.source = source or adapter_source()
        key = os.environ.get("VLLM_API_KEY")
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self._gates = AdapterGates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            self.source is None
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or path not in GENERATION_PATHS | {LOAD_PATH, UNLOAD_PATH}
            or not self._authorized(scope)  # vLLM's own check answers 401; nothing is revealed here
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            request = json.loads(body)
        except ValueError:
            await self.app(scope, _replay(body, receive), send)  # vLLM reports malformed JSON itself
            return
        if not isinstance(request, dict):
            await self.app(scope, _replay(body, receive), send)
            return
        if path == LOAD_PATH:
            await self._load(scope, request, body, receive, send)
        elif path == UNLOAD_PATH:
            await self._unload(scope, request, body, receive, send)
        else:
            await self._generate(scope, request, body, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if self._key_digest is None:
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._key_digest)

    async def _generate(self, scope: Scope, request: dict, body: bytes, receive: Receive, send: Send) -> None:
        model = request.get("model")
        started = time.monotonic()
        adapter: str | None = None  # the pinned name vLLM sees; None for the base model
        if model is None or (isinstance(model, str) and self.source.is_base_model(model)):
            label = self.source.settings.served_model_name
        else:
            try:
                ref = await self._pinned_and_fetched(model)
            except AdapterError as exc:
                metrics.requests.labels(exc.metrics_label, str(int(exc.status))).inc()
                await _send_error(send, exc)
                return
            label, adapter = ref.key, ref.internal_name
            request["model"] = adapter
            body = json.dumps(request).encode()
            scope = _with_content_length(scope, len(body))
        recorder = _ResponseRecorder(send)
        try:
            async with self._gates.shared(adapter):
                await self.app(scope, _replay(body, receive), recorder.send)
        finally:
            metrics.requests.labels(label, str(recorder.status)).inc()
            metrics.request_duration.labels(label).observe(time.monotonic() - started)
            if recorder.completion_tokens:
                metrics.generated_tokens.labels(label).inc(recorder.completion_tokens)

    async def _load(self, scope: Scope, request: dict, body: bytes, receive: Receive, send: Send) -> None:
        lora_path = request.get("lora_path")
        if isinstance(lora_path, str) and lora_path.startswith(REGISTRY_SCHEME):
            try:
                ref = await self._pinned_and_fetched(lora_path[len(REGISTRY_SCHEME) :], require_version=True)
                if request.get("lora_name") != ref.internal_name:
                    raise InvalidAdapterName(f"lora_name must be {ref.internal_name!r} for {lora_path!r}")
            except AdapterError as exc:
                await _send_error(send, exc)
                return
            request["lora_path"] = str(self.source.settings.adapter_cache_dir / ref.namespace / ref.name / ref.version)
            body = json.dumps(request).encode()
            scope = _with_content_length(scope, len(body))
        await self.app(scope, _replay(body, receive), send)

    async def _unload(self, scope: Scope, request: dict, body: bytes, receive: Receive, send: Send) -> None:
        from tuneloom.serving.plugin import resolver

        recorder = _ResponseRecorder(send)
        async with self._gates.exclusive(str(request.get("lora_name"))):
            await self.app(scope, _replay(body, receive), recorder.send)
        if recorder.status == 200 and resolver() is not None:
            resolver().forget(str(request.get("lora_name")))

    async def _pinned_and_fetched(self, model: Any, *, require_version: bool = False) -> AdapterRef:
        if not isinstance(model, str):
            raise InvalidAdapterName("'model' must be a string")
        ref = self.source.parse(model)
        if require_version and ref.version is None:
            raise InvalidAdapterName(f"{model!r}: a runtime load names one version, as NAMESPACE/NAME@VERSION")
        ref = await asyncio.to_thread(self.source.pin, ref)
        await asyncio.to_thread(self.source.local_dir, ref)
        return ref


class AdapterGates:
    """Per adapter name: generation requests share it, an unload takes it alone.

    vLLM keys LoRA requests by name. If a name is unloaded while requests of it still run and is
    then loaded again (by the preload sync or the resolver), one batch holds two engine ids under
    one name; vLLM's set of LoRA requests keeps only one of them, and the engine dies with a
    KeyError in `convert_mapping` (vllm 0.32). So an unload waits until the name's requests have
    finished, and requests that arrive meanwhile wait until the unload is done.
    """

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._unloading: set[str] = set()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self, name: str | None) -> AsyncIterator[None]:
        if name is None:  # the base model
            yield
            return
        async with self._changed:
            await self._changed.wait_for(lambda: name not in self._unloading)
            self._running[name] = self._running.get(name, 0) + 1
        try:
            yield
        finally:
            async with self._changed:
                self._running[name] -= 1
                if not self._running[name]:
                    del self._running[name]
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: name not in self._unloading)
            self._unloading.add(name)  # from here on, new requests for `name` wait
            await self._changed.wait_for(lambda: name not in self._running)
        try:
            yield
        finally:
            async with self._changed:
                self._unloading.discard(name)
                self._changed.notify_all()


class _ResponseRecorder:
    """Passes the response through while noting its status and the completion tokens it reports."""

    def __init__(self, send: Send):
        self._send = send
        self.status = 500
        self.completion_tokens = 0
        self._streamed_chunks = 0
        self._buffer = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and self.status == 200:
            self._buffer += message.get("body", b"")
            if not message.get("more_body", False):
                self._count_tokens()
        await self._send(message)

    def _count_tokens(self) -> None:
        text = self._buffer.decode("utf-8", errors="replace")
        self._buffer = b""
        if not text.startswith("data:"):
            with contextlib.suppress(ValueError, AttributeError):
                self.completion_tokens = _generated(json.loads(text).get("usage") or {})
            return
        # A stream: usage arrives only when the client asked for it; otherwise each content
        # chunk vLLM sends carries one token.
        chunks = 0
        for line in text.splitlines():
            payload = line.removeprefix("data:").strip()
            if not payload or payload == "[DONE]":
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if event.get("usage"):
                self.completion_tokens = _generated(event["usage"])
                return
            chunks += sum(1 for choice in event.get("choices", []) if (choice.get("delta") or {}).get("content"))
        self.completion_tokens = chunks


def _generated(usage: dict[str, Any]) -> int:
    """Completion tokens in a usage block (`output_tokens` in the Responses API)."""
    return int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the (possibly rewritten) body once, then the client's own events
    (so a disconnect still reaches vLLM and aborts the generation)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_content_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


async def _send_error(send: Send, error: AdapterError) -> None:
    status = int(error.status)
    payload = {"error": {"message": str(error), "type": error.error_type, "param": "model", "code": status}}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
