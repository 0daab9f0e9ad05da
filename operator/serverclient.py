"""Talking to `tuneloom serve` pods (vLLM's OpenAI server) and deciding what each should load.

The pure parts (the preload plan, adapter ids, label selectors) are separate from the HTTP client
so they are unit-testable without a server.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tuneloom.api import LabelSelector
from tuneloom.names import AdapterId


class ServerError(Exception):
    """A server pod refused or failed a request; the message says what it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PreloadPlan:
    load: list[str]
    unload: list[str]


def plan_preload(desired: Iterable[str], loaded: Iterable[str], preloaded: Iterable[str]) -> PreloadPlan:
    """What to send one pod: load every desired adapter it lacks; unload only what the operator
    preloaded earlier and no longer wants. Adapters a client caused to load on first use are left
    alone: unloading them would only make the next request load them again."""
    wanted, present, ours = set(desired), set(loaded), set(preloaded)
    return PreloadPlan(load=sorted(wanted - present), unload=sorted((ours - wanted) & present))


def format_label_selector(selector: LabelSelector) -> str:
    """A LabelSelector in the string form the API's labelSelector parameter takes."""
    terms = [f"{key}={value}" for key, value in sorted(selector.matchLabels.items())]
    for requirement in selector.matchExpressions:
        values = ",".join(requirement.values)
        terms.append(
            {
                "In": f"{requirement.key} in ({values})",
                "NotIn": f"{requirement.key} notin ({values})",
                "Exists": requirement.key,
                "DoesNotExist": f"!{requirement.key}",
            }[requirement.operator]
        )
    return ",".join(terms)


class ServerClient:
    """One server pod's adapter API. With an API key, every request carries it as a bearer token."""

    def __init__(
        self, host: str, port: int, api_key: str | None, timeout_s: float = 10.0, load_timeout_s: float = 300.0
    ):
        self.base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.api_key = api_key
        self.timeout_s = timeout_s
        # Loading downloads and verifies the adapter from object storage first.
        self.load_timeout_s = load_timeout_s

    def loaded(self) -> set[str]:
        """The adapters the pod has loaded (the base model is listed too, and left out)."""
        payload = json.loads(self._request("GET", "/v1/models", None, self.timeout_s))
        listed = (str(entry.get("id")) for entry in payload.get("data") or [])
        return {model for model in listed if AdapterId.parse_served(model) is not None}

    def load(self, model: str) -> None:
        body = {"lora_name": model, "lora_path": f"tuneloom://{model}"}
        try:
            self._request("POST", "/v1/load_lora_adapter", body, self.load_timeout_s)
        except ServerError as exc:
            if not (exc.status == 400 and "already" in str(exc).lower()):  # loaded meanwhile, say on first use
                raise

    def unload(self, model: str) -> None:
        try:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": model}, self.timeout_s)
        except ServerError as exc:
            if exc.status != 404:  # 404: gone already
                raise

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{method} {path}: HTTP {exc.code}: {_error_message(exc.read())}", exc.code) from None
        except (OSError, ValueError) as exc:
            raise ServerError(f"{method} {self.base}{path}: {exc}") from None


def _error_message(raw: bytes) -> str:
    """The message of vLLM's error body ({"error": {"message": ...}}, or FastAPI's {"detail": ...})."""
    text = raw.decode(errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:500]
    if isinstance(payload, dict) and payload.get("detail"):
        return str(payload["detail"])[:500]
    return text[:500]
