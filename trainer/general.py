"""The general-ability check's inputs and rules: its prompt set, how two answers are compared, and the
base model's side of it, cached in the object store.

The check asks how far an adapter moved from its base model on prompts unrelated to its task. Its
figures need no labels: the base model's own greedy answers are the yardstick. Those answers, and
the likelihood the base gives them, depend only on the base model, the prompts and the generation
settings, so they are computed once and kept in the store for every later job on that base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tuneloom.api import BUILTIN_GENERAL_PROMPTS, GeneralEvaluationSpec
from tuneloom.inputs import fetch_file
from tuneloom.registry import commit_files, fetch_committed
from tuneloom.storage import CorruptObjectError, ObjectExistsError, ObjectNotFoundError, ObjectStore, StorageError
from tuneloom.trainer.datafile import PROMPTS_FORMAT, Example, load_examples

log = logging.getLogger("tuneloom.trainer")

BUILTIN_PROMPTS_FILE = "general_prompts.jsonl"
BASELINE_PREFIX = "cache/general-baseline"
BASELINE_FILE = "baseline.json"
# Bumped when the baseline's meaning changes (how answers are generated or scored), so older
# cached baselines are no longer found.
BASELINE_SCHEMA = 1

# The reference metrics' names, as the manifest spells them (the gate's two, general.nllShift and
# general.agreement, are in tuneloom.promotion, which imports no torch).
EXACT_MATCH = "general.exact_match"
CONTAINS = "general.contains"

# The end of a first sentence: . ! or ? followed by a space or the end (so "3.14" is one sentence).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def load_prompts(spec: GeneralEvaluationSpec) -> list[Example]:
    """The first `maxExamples` prompts of the set; each Example ends with its reference answer
    (empty when the prompt has none) as the final assistant message."""
    if spec.prompts == BUILTIN_GENERAL_PROMPTS:
        with resources.as_file(resources.files("tuneloom.trainer") / "data" / BUILTIN_PROMPTS_FILE) as path:
            prompts = load_examples(path, PROMPTS_FORMAT, source=f"builtin:{BUILTIN_PROMPTS_FILE}")
    else:
        prompts = load_examples(fetch_file(spec.prompts), PROMPTS_FORMAT, source=spec.prompts)
    return prompts[: spec.maxExamples]


def normalised(text: str) -> str:
    """Lower case, runs of whitespace as one space, no space at either end."""
    return " ".join(text.lower().split())


def first_sentence(text: str) -> str:
    """The normalised text up to and including its first . ! or ? that ends a sentence (all of it
    when none does)."""
    text = normalised(text)
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def agrees(answer: str, base_answer: str) -> bool:
    """The agreement rule: the same first sentence, after normalising case and whitespace."""
    return first_sentence(answer) == first_sentence(base_answer)


def reference_scores(answer: str, reference: str) -> dict[str, bool]:
    """exact_match (equal after normalising) and contains (the reference appears in the answer);
    nothing for a prompt without a reference."""
    if not reference:
        return {}
    answer, reference = normalised(answer), normalised(reference)
    return {"exact_match": answer == reference, "contains": reference in answer}


@dataclass(frozen=True)
class Baseline:
    """The base model's greedy answers to the prompts, and the negative log-likelihood it gives
    them (summed over each answer's tokens, with the token counts)."""

    answers: tuple[str, ...]
    nll_sums: tuple[float, ...]
    token_counts: tuple[int, ...]

    @property
    def mean_nll(self) -> float:
        return sum(self.nll_sums) / max(sum(self.token_counts), 1)

    def to_json(self) -> bytes:
        return json.dumps({"schema": BASELINE_SCHEMA, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Baseline:
        record = json.loads(data)
        return cls(tuple(record["answers"]), tuple(record["nll_sums"]), tuple(record["token_counts"]))


def baseline_key(
    *, base_model: dict[str, Any], prompts: Sequence[Example], max_new_tokens: int, max_prompt_tokens: int
) -> str:
    """What the base's answers depend on: the base model (its name, config hash, how its weights are
    loaded), the prompts themselves (not their file name) and the generation settings."""
    prompt_set = [[(m.role, m.content) for m in prompt.messages] for prompt in prompts]
    identity = {
        "schema": BASELINE_SCHEMA,
        "baseModel": base_model,
        "prompts": hashlib.sha256(json.dumps(prompt_set).encode()).hexdigest(),
        "maxNewTokens": max_new_tokens,
        "maxPromptTokens": max_prompt_tokens,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class BaselineCache:
    """Baselines in the object store, one committed set per key (`cache/general-baseline/<key>/`):
    the file first and its manifest last, so a reader never sees a half-written baseline, and
    every read verifies the file's checksum."""

    store: ObjectStore

    def _prefix(self, key: str) -> str:
        return f"{BASELINE_PREFIX}/{key}"

    def get(self, key: str) -> Baseline | None:
        with tempfile.TemporaryDirectory(prefix="tuneloom-baseline-") as tmp:
            try:
                fetch_committed(self.store, self._prefix(key), Path(tmp) / "baseline")
                return Baseline.from_json((Path(tmp) / "baseline" / BASELINE_FILE).read_bytes())
            except ObjectNotFoundError:
                return None
            except (CorruptObjectError, ValueError, KeyError) as exc:
                log.warning(
                    "general check: the cached base answers under %s are unusable (%s); computing them", key, exc
                )
                return None

    def put(self, key: str, baseline: Baseline) -> None:
        with tempfile.TemporaryDirectory(prefix="tuneloom-baseline-") as tmp:
            path = Path(tmp) / BASELINE_FILE
            path.write_bytes(baseline.to_json())
            try:
                commit_files(self.store, self._prefix(key), {BASELINE_FILE: path}, {"kind": "general-baseline"})
            except ObjectExistsError:
                pass  # another job on the same base committed it first: the same answers
            except StorageError as exc:
                # The cache only saves time: a store that refuses it must not fail the run.
                log.warning(
                    "general check: could not cache the base answers (%s); the next job computes them again", exc
                )
