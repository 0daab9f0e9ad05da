"""Held-out evaluation. Each check measures the model as it is when called and returns an
`EvaluationResult`; a run calls the same checks before training (the base model) and after it (the
adapter), merging each side's results into one. A new check (general ability, preference accuracy)
is one more callable in the list `FineTuneRun.setup_evaluation` builds. `FewShotAnswers`, the
few-shot baseline, runs once, with the base model."""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneloom.api import GenerationMetric
from tuneloom.trainer.batching import Batch
from tuneloom.trainer.datafile import Example
from tuneloom.trainer.tokenize import few_shot_prompt, prompt_text, reference_answer

log = logging.getLogger("tuneloom.trainer")

# The checkpoint keys of a result's per-prompt part; the other keys are its metrics.
_ANSWERS, _SCORES = "answers", "perExample"


@dataclass
class LossResult:
    loss: float
    token_accuracy: float
    tokens: int


@dataclass(frozen=True)
class ScoredAnswer:
    """A greedy answer to one held-out prompt, and whether it passed each metric."""

    text: str
    scores: dict[str, bool]


@dataclass(frozen=True)
class EvaluationResult:
    """One model's results: the overall figures (the manifest's `metrics.base` or
    `metrics.adapter`, in the order the checks ran) and, when a check generated them, its answers
    to the held-out prompts in their order."""

    metrics: dict[str, float] = field(default_factory=dict)
    answers: tuple[ScoredAnswer, ...] = ()

    def merge(self, other: EvaluationResult) -> EvaluationResult:
        """Both results' figures; the answers of the one that generated (one check does)."""
        return EvaluationResult({**self.metrics, **other.metrics}, self.answers or other.answers)

    def to_record(self) -> dict[str, Any]:
        """The form checkpoints hold (`LoopState.base_evaluation`), kept as it was when results were
        plain dicts, so a run resumes from a checkpoint an earlier trainer wrote."""
        record: dict[str, Any] = dict(self.metrics)
        if self.answers:
            record[_ANSWERS] = [answer.text for answer in self.answers]
            record[_SCORES] = [answer.scores for answer in self.answers]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EvaluationResult:
        metrics = {key: value for key, value in record.items() if key not in (_ANSWERS, _SCORES)}
        pairs = zip(record.get(_ANSWERS, []), record.get(_SCORES, []), strict=True)
        return cls(metrics, tuple(ScoredAnswer(text, scores) for text, scores in pairs))


Check = Callable[[], EvaluationResult]


def run_checks(checks: Sequence[Check]) -> EvaluationResult:
    return functools.reduce(EvaluationResult.merge, (check() for check in checks), EvaluationResult())


@dataclass(frozen=True)
class HeldOutLoss:
    """Loss and next-token accuracy on the held-out batches; every rank computes them."""

    measure: Callable[[], LossResult]

    def __call__(self) -> EvaluationResult:
        loss = self.measure()
        return EvaluationResult({"validationLoss": round(loss.loss, 4), "tokenAccuracy": round(loss.token_accuracy, 4)})


@dataclass(frozen=True)
class HeldOutAnswers:
    """Greedy answers to the held-out prompts, scored against their reference answers."""

    model: Any
    tokenizer: Any
    examples: Sequence[Example]
    metrics: Sequence[GenerationMetric]
    max_new_tokens: int
    max_prompt_tokens: int
    device: torch.device

    def __call__(self) -> EvaluationResult:
        return self.answer([prompt_text(self.tokenizer, example) for example in self.examples])

    def answer(self, prompts: Sequence[str]) -> EvaluationResult:
        """The model's answers to these prompts, one per held-out example, scored."""
        answers = generate_answers(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            device=self.device,
            max_prompt_tokens=self.max_prompt_tokens,
        )
        return score(answers, references(self.examples), self.metrics)


def draw_shots(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """The few-shot examples: k training examples drawn with the job's seed, never held-out ones."""
    return random.Random(seed).sample(list(train), min(k, len(train)))


@dataclass(frozen=True)
class FewShotAnswers:
    """The few-shot baseline: the base model's answers to the same held-out prompts, each preceded
    by the same training examples. Shots are dropped, last first, until the prompt leaves room for
    the answer within maxSeqLength; only a prompt still too long without any is cut."""

    held_out: HeldOutAnswers
    shots: Sequence[Example]

    def __call__(self) -> EvaluationResult:
        started = time.monotonic()
        prompts, dropped = zip(*(self._fitted(example) for example in self.held_out.examples), strict=True)
        tokens = [self._length(prompt) for prompt in prompts]
        log.info(
            "few-shot baseline: %d prompts with %d shots (%d dropped to fit maxSeqLength), %.0f prompt tokens on "
            "average",
            len(prompts),
            len(self.shots),
            sum(dropped),
            sum(tokens) / len(tokens),
        )
        result = self.held_out.answer(prompts)
        log.info("few-shot baseline answered %d prompts in %.1f s", len(prompts), time.monotonic() - started)
        return result

    def _fitted(self, example: Example) -> tuple[str, int]:
        """The prompt with as many shots as fit, and how many were dropped."""
        room = self.held_out.max_prompt_tokens - self.held_out.max_new_tokens
        for kept in range(len(self.shots), 0, -1):
            prompt = few_shot_prompt(self.held_out.tokenizer, example, self.shots[:kept])
            if self._length(prompt) <= room:
                return prompt, len(self.shots) - kept
        return prompt_text(self.held_out.tokenizer, example), len(self.shots)

    def _length(self, prompt: str) -> int:
        return len(self.held_out.tokenizer(prompt, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def evaluate_loss(loss_fn: torch.nn.Module, batches: Sequence[Batch], device: torch.device) -> LossResult:
    was_training = loss_fn.training
    loss_fn.eval()
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        loss_sum, hits, tokens = loss_fn(batch.to(device))
        total += float(loss_sum)
        correct += int(hits)
        count += int(tokens)
    loss_fn.train(was_training)
    return LossResult(loss=total / max(count, 1), token_accuracy=correct / max(count, 1), tokens=count)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


SCORERS: dict[GenerationMetric, Callable[[str, str], bool]] = {
    GenerationMetric.exact_match: lambda answer, reference: answer.strip() == reference.strip(),
    GenerationMetric.json_valid: lambda answer, _reference: _is_json(answer.strip()),
}


def score(answers: Sequence[str], references: Sequence[str], metrics: Sequence[GenerationMetric]) -> EvaluationResult:
    scored = tuple(
        ScoredAnswer(answer, {metric.value: SCORERS[metric](answer, reference) for metric in metrics})
        for answer, reference in zip(answers, references, strict=True)
    )
    means = {
        metric.value: sum(answer.scores[metric.value] for answer in scored) / max(len(scored), 1) for metric in metrics
    }
    return EvaluationResult(means, scored)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy answers to the prompts, batched with left padding.

    With `max_prompt_tokens`, longer prompts keep only their last tokens (where the question and
    the generation prompt are): a prompt of a million tokens would not fit in attention memory.
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    # Shortest prompts together: less padding per batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        inputs = tokenizer(
            [prompts[i] for i in indices],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=max_prompt_tokens is not None,
            max_length=max_prompt_tokens,
        ).to(device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for index, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            by_index[index] = text.strip()
    model.train(was_training)
    return [by_index[i] for i in range(len(prompts))]


def references(examples: Sequence[Example]) -> list[str]:
    return [reference_answer(example) for example in examples]
