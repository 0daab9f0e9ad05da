"""What the middleware does with each of vLLM's routes, decided once from the app's own route table.

One policy for every route, including routes a later vLLM adds:
- open: answered without the API key (health probes and the metrics scrape), and nothing else;
- pinned: the JSON body's top-level `model` is turned into a committed, verified adapter version
  and the request is gated and counted (every route whose body names a model at the top level);
- load / unload: vLLM's runtime adapter routes, allowed only for registry versions;
- refused: routes that load or unload weights outside the registry, and routes whose body may
  name a model anywhere but the top level or that parse their body themselves and have not been
  reviewed: they answer 403 until someone reviews them and lists them here.
- plain: everything else (no model in the body); it still needs the key.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class Policy(enum.Enum):
    OPEN = "open"
    PINNED = "pinned"
    LOAD = "load"
    UNLOAD = "unload"
    REFUSED = "refused"
    PLAIN = "plain"


OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})
LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"

# Routes that change the engine's weights or adapters by a path of their own choosing.
REFUSED_PATHS = {
    "/adapters": "adapters come only from the registry: POST /v1/load_lora_adapter with "
    "lora_path tuneloom://NAMESPACE/NAME@VERSION, or just send model=NAME",
    "/adapters/{adapter_name}": "unload through POST /v1/unload_lora_adapter, which waits for the adapter's requests",
    "/scale_elastic_ep": "tuneloom serve does not run elastic expert parallelism",
}

# Routes whose handler reads the body itself, so FastAPI declares no schema for it. Each was read
# in vLLM 0.32: where it takes `model`, it is the top-level key of a JSON object. A new route of
# this kind is refused until it is read and added here.
REVIEWED_RAW_BODY_PATHS = frozenset(
    {
        "/ping",
        "/invocations",
        "/v1/responses/{response_id}/cancel",
        "/is_scaling_elastic_ep",
        "/v1/chat/completions/render",
        "/v1/messages/render",
        "/v1/completions/render",
        "/v1/responses/render",
        "/v1/chat/completions/derender",
        "/v1/completions/derender",
        "/inference/v1/generate",
        "/inference/v1/abort_requests",
        "/abort_requests",
    }
)

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class ModelField(enum.Enum):
    """Where a route's declared request body names a model."""

    NONE = "none"
    TOP_LEVEL = "top-level"
    NESTED = "nested"  # somewhere below the top level, or only in some members of a union
    UNDECLARED = "undeclared"  # the handler parses the body itself


@dataclass(frozen=True)
class RouteRule:
    path: str
    policy: Policy
    reason: str = ""


def model_field(body_schema: dict[str, Any] | None) -> ModelField:
    """Where `model` appears in a JSON schema of a request body (None: no declared body)."""
    if body_schema is None:
        return ModelField.UNDECLARED
    if '"model"' not in json.dumps(body_schema):
        return ModelField.NONE
    definitions = body_schema.get("$defs", {})
    members = body_schema.get("anyOf") or body_schema.get("oneOf") or [body_schema]
    for member in members:
        if "$ref" in member:
            member = definitions.get(member["$ref"].rsplit("/", 1)[-1], {})
        if "model" not in member.get("properties", {}):
            return ModelField.NESTED
    return ModelField.TOP_LEVEL


def rule_for(
    path: str, methods: Iterable[str], body_schema: dict[str, Any] | None, *, form_body: bool = False
) -> RouteRule:
    """The policy for one route, from its path, methods and declared request body."""
    if path in OPEN_PATHS:
        return RouteRule(path, Policy.OPEN)
    if path == LOAD_PATH:
        return RouteRule(path, Policy.LOAD)
    if path == UNLOAD_PATH:
        return RouteRule(path, Policy.UNLOAD)
    if path in REFUSED_PATHS:
        return RouteRule(path, Policy.REFUSED, REFUSED_PATHS[path])
    if not set(methods) & BODY_METHODS:
        return RouteRule(path, Policy.PLAIN)
    where = model_field(body_schema)
    if form_body and where is not ModelField.NONE:
        return RouteRule(path, Policy.REFUSED, "this route takes a form body; the registry's checks read JSON only")
    if where is ModelField.UNDECLARED:
        if path in REVIEWED_RAW_BODY_PATHS:
            return RouteRule(path, Policy.PINNED)
        return RouteRule(path, Policy.REFUSED, "this route has not been reviewed for tuneloom's adapter registry")
    if where is ModelField.NESTED:
        return RouteRule(path, Policy.REFUSED, "this route can name a model outside the registry's checks")
    return RouteRule(path, Policy.PINNED if where is ModelField.TOP_LEVEL else Policy.PLAIN)


def route_rules(app: Any) -> list[tuple[Any, RouteRule]]:
    """(route, rule) for every route of a FastAPI app, in the router's matching order."""
    from fastapi import params
    from fastapi.routing import APIRoute
    from pydantic import TypeAdapter

    rules = []
    for route in app.routes:
        if not isinstance(route, APIRoute):  # docs pages and mounts (/metrics) take no request body
            rules.append((route, rule_for(route.path, (), None)))
            continue
        schema, form_body = None, False
        if route.body_field is not None:
            schema = TypeAdapter(route.body_field.field_info.annotation).json_schema()
            form_body = isinstance(route.body_field.field_info, params.Form)  # File is a kind of Form
        rules.append((route, rule_for(route.path, route.methods, schema, form_body=form_body)))
    return rules
