"""The route policy, checked against the route table of the vLLM that is installed: a vLLM upgrade
that adds a route taking `model` fails here unless the middleware pins or refuses it."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tuneloom.serving.policy import BODY_METHODS, ModelField, Policy, model_field, route_rules, rule_for


def _vllm_apps(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """vLLM's own apps, built as its server builds them: a generation model's, and the pooling routes."""
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setenv("VLLM_PLUGINS", "")  # ours would patch vLLM's CPU kernels in this test process
    monkeypatch.setattr(sys, "argv", ["vllm"])
    from fastapi import FastAPI
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.pooling.classify.api_router import router as classify
    from vllm.entrypoints.pooling.embed.api_router import router as embed
    from vllm.entrypoints.pooling.pooling.api_router import router as pooling
    from vllm.entrypoints.pooling.scoring.api_router import router as scoring
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "unused", "--enable-lora"])
    generation = build_app(args, supported_tasks=("generate", "transcription", "realtime"))
    # vLLM adds the pooling routers only with a loaded model's config; they are plain routers.
    pooling_app = FastAPI()
    for router in (pooling, classify, embed, scoring):
        pooling_app.include_router(router)
    return [generation, pooling_app]


def _takes_model(route: Any) -> bool:
    """Independently of the policy: could a request to this route name a model?"""
    from fastapi.routing import APIRoute
    from pydantic import TypeAdapter

    if not isinstance(route, APIRoute) or not route.methods & BODY_METHODS:
        return False
    if route.body_field is None:
        return True  # the handler reads the body itself: anything may be in it
    return "model" in json.dumps(TypeAdapter(route.body_field.field_info.annotation).json_schema())


def test_every_route_that_takes_a_model_is_pinned_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = {}
    for app in _vllm_apps(monkeypatch):
        for route, rule in route_rules(app):
            rules[rule.path] = rule
            if _takes_model(route) and rule.path != "/ping":
                assert rule.policy in (Policy.PINNED, Policy.REFUSED, Policy.LOAD), rule
    expected_pinned = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/chat/completions/batch",
        "/tokenize",
        "/invocations",
        "/v1/embeddings",
        "/pooling",
        "/classify",
        "/score",
    ]
    assert [path for path in expected_pinned if rules[path].policy is not Policy.PINNED] == []
    for path in ("/adapters", "/adapters/{adapter_name}", "/v1/audio/transcriptions"):
        assert rules[path].policy is Policy.REFUSED and rules[path].reason
    assert {path for path, rule in rules.items() if rule.policy is Policy.OPEN} == {"/health", "/ping", "/metrics"}


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        (None, ModelField.UNDECLARED),
        ({"properties": {"prompt": {}}}, ModelField.NONE),
        ({"properties": {"model": {}, "prompt": {}}}, ModelField.TOP_LEVEL),
        ({"properties": {"requests": {"items": {"$ref": "#/$defs/R"}}}, "$defs": {"R": {"properties": {"model": {}}}}},
         ModelField.NESTED),
        ({"anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}],
          "$defs": {"A": {"properties": {"model": {}}}, "B": {"properties": {"model": {}}}}}, ModelField.TOP_LEVEL),
        ({"anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}],
          "$defs": {"A": {"properties": {"model": {}}}, "B": {"properties": {"x": {"const": "model"}}}}},
         ModelField.NESTED),
    ],
)  # fmt: skip
def test_where_a_body_names_its_model(schema: dict | None, where: ModelField) -> None:
    assert model_field(schema) is where


def test_an_unknown_route_is_refused_until_reviewed() -> None:
    assert rule_for("/v2/new-thing", {"POST"}, None).policy is Policy.REFUSED
    nested = {"properties": {"items": {"items": {"properties": {"model": {}}}}}}
    assert rule_for("/v2/batch", {"POST"}, nested).policy is Policy.REFUSED
    assert rule_for("/v2/chat", {"POST"}, {"properties": {"model": {}}}).policy is Policy.PINNED
    assert rule_for("/v2/status", {"GET"}, None).policy is Policy.PLAIN
    assert rule_for("/v2/upload", {"POST"}, {"properties": {"model": {}}}, form_body=True).policy is Policy.REFUSED
