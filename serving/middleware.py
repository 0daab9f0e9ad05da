"""ASGI middleware in front of vLLM's OpenAI server (`--middleware`): the server's one policy.

Every request passes here first (vLLM adds `--middleware` classes outermost). It:
- checks the API key on every route but the open ones (`policy.OPEN_PATHS`), whatever routes
  vLLM has, and answers 401 OpenAI-style;
- applies each route's policy (see `policy.py`): for a pinned route, turns the client's `model`
  into a committed, verified adapter version before vLLM sees it, gates the request against
  unloads, and counts it per adapter; runtime loads accept registry versions only; refused
  routes get 403;
- writes the access log itself, without query strings (they may carry credentials), in place of
  uvicorn's, which `tuneloom serve` turns off.
Problems are answered with a clear OpenAI-style error and the right HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from tuneloom.serving import metrics
from tuneloom.serving.adapters import REGISTRY_SCHEME, AdapterCatalog, ResolvedAdapter
from tuneloom.serving.names import AdapterError
from tuneloom.serving.policy import Policy, RouteRule, route_rules

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("tuneloom.serving.access")
log = logging.getLogger("tuneloom.serving")

_UNMATCHED = RouteRule("", Policy.PLAIN)  # vLLM answers 404 (after the key check)


class ClientError(Exception):
    """A request refused before it reaches vLLM, answered as OpenAI does."""

    def __init__(self, status: HTTPStatus, message: str, *, param: str | None = None, error_type: str = ""):
        super().__init__(message)
        self.status, self.param = status, param
        self.error_type = error_type or _ERROR_TYPES.get(status, "APIError")

    @classmethod
    def of(cls, error: AdapterError, param: str = "model") -> ClientError:
        return cls(error.status, str(error), param=param, error_type=error.error_type)


_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.FORBIDDEN: "PermissionDeniedError",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
}


class AdapterRouting:
    def __init__(self, app: ASGIApp, catalog: AdapterCatalog | None = None):
        from tuneloom.serving.plugin import adapter_catalog, log_through_vllm

        log_through_vllm()  # the API server process may have configured vLLM's logging after the plugin ran
        self.app = app
        self.catalog = catalog or adapter_catalog()
        key = os.environ.get("VLLM_API_KEY")
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self._gates = AdapterGates()
        self._rules: list[tuple[Any, RouteRule]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.catalog is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # not started by `tuneloom serve`, or lifespan
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        started = time.monotonic()
        recorder = _StatusRecorder(send)
        try:
            await self._http(scope, receive, recorder)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                '%s:%s "%s %s" %d %.3fs',
                client[0],
                client[1],
                scope.get("method"),
                scope.get("path"),
                recorder.status,
                time.monotonic() - started,
            )

    async def _http(self, scope: Scope, receive: Receive, recorder: _StatusRecorder) -> None:
        rule = self._rule(scope)
        try:
            if rule.policy is not Policy.OPEN and scope.get("method") != "OPTIONS":
                self._require_key(scope)
            if rule.policy is Policy.REFUSED:
                raise ClientError(HTTPStatus.FORBIDDEN, f"{scope.get('method')} {rule.path} is disabled: {rule.reason}")
            if rule.policy not in (Policy.PINNED, Policy.LOAD, Policy.UNLOAD) or scope.get("method") != "POST":
                await self.app(scope, receive, recorder.send)
                return
            body = await _read_body(receive, self.catalog.settings.max_request_bytes)
            request = _json_object(body)
        except ClientError as error:
            await _send_error(recorder.send, error)
            return
        handle = {Policy.PINNED: self._pinned, Policy.LOAD: self._load, Policy.UNLOAD: self._unload}[rule.policy]
        await handle(scope, request, body, receive, recorder)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self._require_key(scope)
        except ClientError:
            await send({"type": "websocket.close", "code": 1008, "reason": "a valid API key is required"})
            return
        await self.app(scope, receive, send)

    def _rule(self, scope: Scope) -> RouteRule:
        """The rule of the route vLLM's router will pick for this request (its own matching)."""
        from starlette.routing import Match

        if self._rules is None:
            self._rules = route_rules(scope["app"]) if "app" in scope else []
            _log_policy(self._rules)
        partial = None
        for route, rule in self._rules:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return rule
            if match is Match.PARTIAL and partial is None:
                partial = rule
        return partial or _UNMATCHED

    def _require_key(self, scope: Scope) -> None:
        if self._key_digest is None:
            return
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # Both sides hashed to one length first, so the comparison takes the same time for any key.
        digest = hashlib.sha256(token.encode("latin-1")).digest()
        if not (hmac.compare_digest(digest, self._key_digest) and scheme.lower() == "bearer"):
            raise ClientError(
                HTTPStatus.UNAUTHORIZED,
                "a valid API key is required: send the header 'Authorization: Bearer KEY' (OpenAI SDK: api_key=KEY)",
            )

    async def _pinned(
        self, scope: Scope, request: dict, body: bytes, receive: Receive, recorder: _StatusRecorder
    ) -> None:
        model = request.get("model")
        started = time.monotonic()
        adapter: str | None = None  # the pinned name vLLM sees; None for the base model
        if model is None or (isinstance(model, str) and self.catalog.is_base_model(model)):
            label = self.catalog.settings.served_model_name
        else:
            try:
                resolved = await self._resolve(model)
            except AdapterError as exc:
                metrics.requests.labels(exc.metrics_label, str(int(exc.status))).inc()
                await _send_error(recorder.send, ClientError.of(exc))
                return
            label, adapter = resolved.adapter.key, resolved.adapter.served_name
            request["model"] = adapter
            body = json.dumps(request).encode()
            scope = _with_content_length(scope, len(body))
        counted = _ResponseRecorder(recorder.send)
        try:
            async with self._gates.shared(adapter):
                await self.app(scope, _replay(body, receive), counted.send)
        finally:
            if adapter is not None:
                _count_loaded(scope)  # a first use loads it
            metrics.requests.labels(label, str(counted.status)).inc()
            metrics.request_duration.labels(label).observe(time.monotonic() - started)
            if counted.completion_tokens:
                metrics.generated_tokens.labels(label).inc(counted.completion_tokens)

    async def _load(
        self, scope: Scope, request: dict, body: bytes, receive: Receive, recorder: _StatusRecorder
    ) -> None:
        """A runtime load names a committed registry version; vLLM gets its verified local copy."""
        lora_path = request.get("lora_path")
        try:
            if request.get("load_inplace"):
                raise ClientError(
                    HTTPStatus.BAD_REQUEST,
                    "load_inplace is refused: a committed version never changes; publish a new version instead",
                    param="load_inplace",
                )
            if not isinstance(lora_path, str) or not lora_path.startswith(REGISTRY_SCHEME):
                raise ClientError(
                    HTTPStatus.BAD_REQUEST,
                    f"lora_path must name a registry version as {REGISTRY_SCHEME}NAMESPACE/NAME@VERSION; "
                    "adapters come only from the registry, raw paths are refused",
                    param="lora_path",
                )
            try:
                resolved = await self._resolve(lora_path[len(REGISTRY_SCHEME) :], require_version=True)
            except AdapterError as exc:
                raise ClientError.of(exc, param="lora_path") from None
            if request.get("lora_name") != resolved.adapter.served_name:
                raise ClientError(
                    HTTPStatus.BAD_REQUEST,
                    f"lora_name must be {resolved.adapter.served_name!r} for {lora_path!r}",
                    param="lora_name",
                )
        except ClientError as error:
            await _send_error(recorder.send, error)
            return
        request["lora_path"] = str(resolved.path)
        body = json.dumps(request).encode()
        await self.app(_with_content_length(scope, len(body)), _replay(body, receive), recorder.send)
        _count_loaded(scope)

    async def _unload(
        self, scope: Scope, request: dict, body: bytes, receive: Receive, recorder: _StatusRecorder
    ) -> None:
        name = request.get("lora_name")
        if not isinstance(name, str):
            await _send_error(recorder.send, ClientError(HTTPStatus.BAD_REQUEST, "lora_name must be a string"))
            return
        async with self._gates.exclusive(name):
            await self.app(scope, _replay(body, receive), recorder.send)
        _count_loaded(scope)

    async def _resolve(self, model: Any, *, require_version: bool = False) -> ResolvedAdapter:
        return await asyncio.to_thread(self.catalog.resolve, model, require_version=require_version)


def _count_loaded(scope: Scope) -> None:
    """Sets the loaded-adapters gauge from vLLM's own table of registered adapters, after the
    requests that change it (a runtime load, an unload, a first use). The engine keeps up to
    --max-cpu-loras of them in memory; one evicted from there stays registered and is reloaded
    from its local copy on its next request, so it still counts."""
    models = getattr(getattr(scope.get("app"), "state", None), "openai_serving_models", None)
    if models is not None:
        metrics.loaded_adapters.set(len(models.lora_requests))


def _log_policy(rules: list[tuple[Any, RouteRule]]) -> None:
    by_policy: dict[Policy, list[str]] = {}
    for _, rule in rules:
        by_policy.setdefault(rule.policy, []).append(rule.path)
    for policy in (Policy.PINNED, Policy.REFUSED):
        log.info("routes %s: %s", policy.value, " ".join(sorted(by_policy.get(policy, []))))


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


class _StatusRecorder:
    """Passes the response through while noting its status (500 until one is sent)."""

    def __init__(self, send: Send):
        self._send = send
        self.status = 500

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class _ResponseRecorder(_StatusRecorder):
    """Also counts the completion tokens that a generation response reports."""

    def __init__(self, send: Send):
        super().__init__(send)
        self.completion_tokens = 0
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


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refused past `limit` bytes before more of it is held."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise ClientError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is over {limit} bytes, the limit of this server (TUNELOOM_MAX_REQUEST_BYTES)",
            )
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
        raise ClientError(HTTPStatus.BAD_REQUEST, "the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise ClientError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
    return request


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


async def _send_error(send: Send, error: ClientError) -> None:
    status = int(error.status)
    payload = {"error": {"message": str(error), "type": error.error_type, "param": error.param, "code": status}}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
