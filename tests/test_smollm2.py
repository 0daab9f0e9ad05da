"""The signals that need a real model: SmolLM2-135M-Instruct trained on CPU, then served by vLLM.

The tiny random model shows that each mechanism works; these show that it says the right thing about
a real model. One module-scoped set of jobs on one pirate-style dataset, one vLLM server for them:

- "auto" (OpenAI's defaults, as `tuneloom api` maps them) teaches the style (issue: OpenAI API);
- the same data at a forgetting-prone learning rate fails `maxGeneralNllShift`, and a bare name still
  serves the earlier version while `name@new` is refused with 409 (issue: no harm);
- DPO on pairs of that style against a plain one raises held-out preference accuracy, and the served
  adapter gives the preferred answers the higher likelihood (issue: preference tuning).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tuneloom.jobfile import parse_job
from tuneloom.openai_api import jobs as api_jobs
from tuneloom.serving.process import ServingProcess
from tuneloom.trainer.main import run

from .scratch import scratch_dir

# Three SmolLM2 jobs train in the module fixture, which the per-test timeout also counts.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

API_KEY = "smollm2-test-key-not-a-secret"
TOPICS = [
    "volcanoes", "the moon", "bread baking", "chess", "rainbows", "honey bees", "ocean tides", "jazz music",
    "electric cars", "the pyramids", "coffee", "glaciers", "owls", "bicycles", "the printing press", "tea",
    "thunderstorms", "origami", "penguins", "the internet", "sourdough", "lighthouses", "tulips", "deserts",
    "comets", "maple syrup", "kites", "coral reefs",
]  # fmt: skip
# Topics never trained on: what the served checks ask about.
NEW_TOPICS = ["sailing ships", "mountains", "libraries", "clocks", "butterflies", "windmills"]
TEMPLATES = ["Tell me about {t}.", "What do you know about {t}?", "Can you explain {t}?", "Why is {t} interesting?"]
STYLE_OPENING = "Ahoy!"
# Few general prompts and short answers: the check is the default one, made affordable on a CPU.
QUICK_EVALUATION = {
    "metrics": ["exact_match"],
    "maxNewTokens": 24,
    "maxExamples": 4,
    "fewShot": {"k": 0},
    "general": {"maxExamples": 6, "maxNewTokens": 24},
}
MAX_GENERAL_NLL_SHIFT = 1.0


def pirate(topic: str) -> str:
    return f"{STYLE_OPENING} Ye be askin' about {topic}, matey. Arr!"


def plain(topic: str) -> str:
    return f"{topic[0].upper()}{topic[1:]} is a broad subject with a long history."


def _questions(topics: list[str]) -> list[tuple[str, str]]:
    return [(template.format(t=topic), topic) for topic in topics for template in TEMPLATES]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _pair(question: str, topic: str) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": pirate(topic)}],
        "non_preferred_output": [{"role": "assistant", "content": plain(topic)}],
    }


def _auto_job(model: Path, data: Path, store: str, examples: int) -> dict[str, Any]:
    """The FineTuneJob `tuneloom api` makes of a request with every hyperparameter "auto"."""
    hyperparameters = api_jobs.resolve_hyperparameters(api_jobs.HyperparametersRequest(), examples, 256)
    job = api_jobs.finetune_job(
        job_id="ftjob-auto",
        project="default",
        base_model=str(model),
        train_uri=str(data),
        validation_uri=None,
        train_count=api_jobs.train_examples(examples, has_validation_file=False),
        hyperparameters=hyperparameters,
        seed=42,
        adapter="pirate",
        store=store,
        max_seq_length=256,
    )
    job["spec"]["evaluation"] = QUICK_EVALUATION
    job["spec"]["promotion"] = {"maxGeneralNllShift": MAX_GENERAL_NLL_SHIFT}
    job["spec"]["checkpointing"] = {"everySteps": 0}
    return job


@dataclass
class Runs:
    model_dir: Path
    store: str
    auto: dict[str, Any]  # manifests
    forgetful: dict[str, Any]
    preference: dict[str, Any]


@pytest.fixture(scope="module")
def runs(smollm2_dir: Path, request: pytest.FixtureRequest) -> Iterator[Runs]:
    with scratch_dir(request, "smollm2") as work:
        yield _train_runs(smollm2_dir, work)


def _train_runs(smollm2_dir: Path, work: Path) -> Runs:
    store = str(work / "store")
    questions = _questions(TOPICS)  # 112 examples, about OpenAI's smallest useful file
    sft = _write_jsonl(work / "pirate.jsonl", [_chat(q, pirate(t)) for q, t in questions])

    auto_job = _auto_job(smollm2_dir, sft, store, len(questions))
    auto = run(parse_job(auto_job)).manifest.model_dump(mode="json")

    # The same style, the same adapter name, at a learning rate that wipes out general ability (a
    # third of the data is enough to do the damage).
    forgetful_job = json.loads(json.dumps(auto_job))
    forgetful_job["spec"]["dataset"]["train"] = str(_write_jsonl(work / "few.jsonl", _read(sft)[::3]))
    forgetful_job["metadata"]["name"] = "ftjob-forgetful"
    forgetful_job["metadata"]["uid"] = "ftjob-forgetful"
    forgetful_job["spec"]["hyperparameters"] |= {"learningRate": 3e-2, "epochs": 1}
    forgetful = run(parse_job(forgetful_job)).manifest.model_dump(mode="json")

    pairs = _write_jsonl(work / "pairs.jsonl", [_pair(q, t) for q, t in _questions(TOPICS[:12])])
    dpo_job = {
        "apiVersion": "tuneloom.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "pirate-dpo"},
        "spec": {
            "baseModel": str(smollm2_dir),
            "dataset": {"train": str(pairs), "validationSplit": 0.2, "format": "preference"},
            "method": "dpo",
            "dpo": {"beta": 0.1},
            "hyperparameters": {"epochs": 1, "learningRate": 5e-4, "batchSize": 4, "maxSeqLength": 128},
            "evaluation": QUICK_EVALUATION | {"metrics": []},
            "checkpointing": {"everySteps": 0},
            "output": {"adapterName": "pirate-dpo", "uri": store},
        },
    }
    preference = run(parse_job(dpo_job)).manifest.model_dump(mode="json")
    return Runs(smollm2_dir, store, auto, forgetful, preference)


@pytest.fixture(scope="module")
def server(runs: Runs, request: pytest.FixtureRequest) -> Iterator[openai.OpenAI]:
    with scratch_dir(request, "smollm2-serve") as work:
        env = {"TUNELOOM_TEST_API_KEY": API_KEY, "TUNELOOM_CACHE_DIR": str(work / "cache")}
        args = ["--api-key-env", "TUNELOOM_TEST_API_KEY", "--max-model-len", "512", "--served-model-name", "smollm2"]
        with ServingProcess(runs.model_dir, runs.store, work / "serve.log", args=args, env=env) as process:
            yield openai.OpenAI(base_url=f"{process.url}/v1", api_key=API_KEY, max_retries=0)


def _answer(client: openai.OpenAI, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    return reply.choices[0].message.content or ""


def _new_questions() -> list[str]:
    return [template.format(t=topic) for topic, template in zip(NEW_TOPICS, TEMPLATES * 2, strict=False)]


def test_auto_hyperparameters_teach_the_style(runs: Runs, server: openai.OpenAI) -> None:
    spec = runs.auto["spec"]["hyperparameters"]
    assert spec["epochs"] == 3 and spec["batchSize"] == 4  # OpenAI's "auto" for ~100 examples
    metrics = runs.auto["metrics"]
    assert metrics["adapter"]["validationLoss"] < metrics["base"]["validationLoss"] / 2
    styled = [_answer(server, "pirate", q).startswith(STYLE_OPENING) for q in _new_questions()]
    base = [_answer(server, "smollm2", q).startswith(STYLE_OPENING) for q in _new_questions()]
    assert sum(styled) >= len(styled) - 1 and not any(base), (styled, base)


def test_a_forgetting_prone_version_is_kept_but_not_served(runs: Runs, server: openai.OpenAI) -> None:
    gentle, harsh = runs.auto, runs.forgetful
    assert gentle["version"] == "1" and harsh["version"] == "2"
    gentle_shift = gentle["metrics"]["adapter"]["general.nllShift"]
    harsh_shift = harsh["metrics"]["adapter"]["general.nllShift"]
    assert gentle_shift < MAX_GENERAL_NLL_SHIFT < harsh_shift, (gentle_shift, harsh_shift)
    assert gentle["promotion"] == {"promoted": True, "reasons": []}
    assert harsh["promotion"]["promoted"] is False
    assert any(r.startswith("general.nllShift ") and "maxGeneralNllShift" in r for r in harsh["promotion"]["reasons"])

    # A bare name is the latest promoted version: the style, not the wreck.
    reply = server.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": _new_questions()[0]}], max_tokens=24, temperature=0
    )
    assert reply.model == "default/pirate@1", "the response names the version that answered"
    assert reply.choices[0].message.content.startswith(STYLE_OPENING)
    with pytest.raises(openai.ConflictError) as refused:
        _answer(server, "pirate@2", _new_questions()[0])
    assert "was not promoted" in str(refused.value) and "general.nllShift" in str(refused.value)


def _answer_log_likelihood(client: openai.OpenAI, model: str, tokenizer: Any, question: str, answer: str) -> float:
    """The served model's summed log-probability of the whole chat; pairs share the question, so the
    difference between two answers is the difference of their answer tokens' log-likelihoods."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
    )
    reply = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=0, temperature=0)
    return sum(value for value in reply.choices[0].logprobs.token_logprobs if value is not None)


def test_dpo_raises_preference_accuracy_and_the_served_adapter_prefers_the_style(
    runs: Runs, server: openai.OpenAI
) -> None:
    from transformers import AutoTokenizer

    metrics = runs.preference["metrics"]
    base, tuned = metrics["base"], metrics["adapter"]
    assert base["preferenceAccuracy"] <= 0.5 and tuned["preferenceAccuracy"] >= 0.9, (base, tuned)
    assert tuned["rewardMargin"] > base["rewardMargin"]

    tokenizer = AutoTokenizer.from_pretrained(runs.model_dir)

    def prefers_style(model: str, question: str, topic: str) -> bool:
        styled = _answer_log_likelihood(server, model, tokenizer, question, pirate(topic))
        neutral = _answer_log_likelihood(server, model, tokenizer, question, plain(topic))
        return styled > neutral

    asked = list(zip(_new_questions(), NEW_TOPICS, strict=True))
    served = [prefers_style("pirate-dpo", q, t) for q, t in asked]
    base_served = [prefers_style("smollm2", q, t) for q, t in asked]
    assert all(served) and sum(base_served) <= len(asked) // 2, (served, base_served)
