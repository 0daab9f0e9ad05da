"""Held-out evaluation. Each check measures the model as it is when called and returns an
`EvaluationResult`; a run calls the same checks before training (the base model) and after it (the
adapter), merging each side's results into one. A new check (general ability, preference accuracy)
is one more callable in the list `FineTuneRun.setup_evaluation` builds. `FewShotAnswers`, the
few-shot baseline, runs once, with the base model."""

from __future__ import annotations

import contextlib
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
from tuneloom.promotion import AGREEMENT, NLL_SHIFT
from tuneloom.trainer import general
from tuneloom.trainer.batching import Batch
from tuneloom.trainer.datafile import Example
from tuneloom.trainer.tokenize import IGNORE_INDEX, few_shot_prompt, prompt_text, reference_answer

log = logging.getLogger("tuneloom.trainer")


# The checkpoint keys of a result's per-prompt parts; the other keys are its metrics.
_ANSWERS, _SCORES, _GENERAL = "answers", "perExample", "generalAnswers"


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
    general: tuple[ScoredAnswer, ...] = ()  # answers to the general-ability prompts

    def merge(self, other: EvaluationResult) -> EvaluationResult:
        """Both results' figures; the answers of the check that generated them (one check per kind)."""
        return EvaluationResult(
            {**self.metrics, **other.metrics}, self.answers or other.answers, self.general or other.general
        )

    def to_record(self) -> dict[str, Any]:
        """The form checkpoints hold (`LoopState.base_evaluation`), kept as it was when results were
        plain dicts, so a run resumes from a checkpoint an earlier trainer wrote."""
        record: dict[str, Any] = dict(self.metrics)
        if self.answers:
            record[_ANSWERS] = [answer.text for answer in self.answers]
            record[_SCORES] = [answer.scores for answer in self.answers]
        if self.general:
            record[_GENERAL] = [{"text": answer.text, "scores": answer.scores} for answer in self.general]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EvaluationResult:
        metrics = {key: value for key, value in record.items() if key not in (_ANSWERS, _SCORES, _GENERAL)}
        pairs = zip(record.get(_ANSWERS, []), record.get(_SCORES, []), strict=True)
        general_answers = tuple(ScoredAnswer(item["text"], item["scores"]) for item in record.get(_GENERAL, []))
        return cls(metrics, tuple(ScoredAnswer(text, scores) for text, scores in pairs), general_answers)


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
class HeldOutPreferences:
    """method: dpo: the held-out pairs scored by the model and the reference policy (see
    `trainer.dpo.PreferenceResult`); every rank computes them."""

    measure: Callable[[], Any]

    def __call__(self) -> EvaluationResult:
        return EvaluationResult(self.measure().metrics())


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
    training_answers: frozenset[str] = frozenset()  # the training examples' answers, stripped

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
        expected = references(self.examples)
        result = score(answers, expected, self.metrics)
        memorized = memorized_fraction(answers, expected, self.training_answers)
        return EvaluationResult({**result.metrics, MEMORIZED_FRACTION: memorized}, result.answers)


MEMORIZED_FRACTION = "memorizedFraction"


def memorized_fraction(answers: Sequence[str], expected: Sequence[str], training_answers: frozenset[str]) -> float:
    """The share of held-out prompts whose answer is, verbatim (but for surrounding whitespace), a
    training example's answer while the answer expected differs: an adapter that recites what it
    was taught instead of answering."""
    recited = sum(
        answer.strip() in training_answers and answer.strip() != reference.strip()
        for answer, reference in zip(answers, expected, strict=True)
    )
    return round(recited / max(len(answers), 1), 4)


@dataclass
class GeneralAbility:
    """How far the model moved from the base on general prompts (see `trainer/general.py`).

    `general.nllShift` is the mean per-token negative log-likelihood the model gives the base
    model's greedy answers, minus the base's own; `general.agreement` the share of prompts it
    answers as the base did. On the base model they are 0 and 1 by definition: while `trained()`
    is false the check reports the baseline instead of measuring the same model twice.
    """

    model: Any
    tokenizer: Any
    prompts: Sequence[Example]
    max_new_tokens: int
    max_prompt_tokens: int
    device: torch.device
    cache: general.BaselineCache
    cache_key: str
    trained: Callable[[], bool]
    _baseline: general.Baseline | None = field(default=None, init=False, repr=False)

    def __call__(self) -> EvaluationResult:
        baseline = self.baseline()
        if baseline is None:
            return EvaluationResult()
        refs = references(self.prompts)
        if not self.trained():
            scored = tuple(
                ScoredAnswer(answer, general.reference_scores(answer, ref))
                for answer, ref in zip(baseline.answers, refs, strict=True)
            )
            return self._result(scored, nll_shift=0.0)
        answers = self._answers()
        sums, counts = answer_nll(self.model, self.tokenizer, self.prompts, baseline.answers, **self._limits())
        nll = sum(sums) / max(sum(counts), 1)
        scored = tuple(
            ScoredAnswer(answer, {"agrees": general.agrees(answer, base), **general.reference_scores(answer, ref)})
            for answer, base, ref in zip(answers, baseline.answers, refs, strict=True)
        )
        return self._result(scored, nll_shift=nll - baseline.mean_nll)

    def baseline(self) -> general.Baseline | None:
        """The base model's side: from this run, the store's cache, or computed now with the base's
        own weights (a LoRA model with its adapter switched off). None when nothing holds the base
        weights any more: a fully fine-tuned model, resumed, whose baseline was not cached."""
        if self._baseline is None:
            self._baseline = self.cache.get(self.cache_key)
            if self._baseline is not None:
                log.info("general check: the base model's answers come from the store's cache (%s)", self.cache_key)
        if self._baseline is None and self.trained() and not hasattr(self.model, "disable_adapter"):
            log.warning("general check skipped: the base model's answers were not cached and its weights are trained")
            return None
        if self._baseline is None:
            log.info("general check: answering %d general prompts with the base model", len(self.prompts))
            with base_weights(self.model):
                answers = self._answers()
                sums, counts = answer_nll(self.model, self.tokenizer, self.prompts, answers, **self._limits())
            self._baseline = general.Baseline(tuple(answers), tuple(sums), tuple(counts))
            self.cache.put(self.cache_key, self._baseline)
        return self._baseline

    def _limits(self) -> dict[str, Any]:
        return {"device": self.device, "max_prompt_tokens": self.max_prompt_tokens}

    def _answers(self) -> list[str]:
        prompts = [prompt_text(self.tokenizer, example) for example in self.prompts]
        return generate_answers(
            self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens, **self._limits()
        )

    def _result(self, scored: tuple[ScoredAnswer, ...], *, nll_shift: float) -> EvaluationResult:
        count = max(len(scored), 1)
        metrics = {NLL_SHIFT: round(nll_shift, 4)}
        metrics[AGREEMENT] = round(sum(a.scores.get("agrees", True) for a in scored) / count, 4)
        with_reference = [answer for answer in scored if "exact_match" in answer.scores]
        for name, metric in (("exact_match", general.EXACT_MATCH), ("contains", general.CONTAINS)):
            if with_reference:
                metrics[metric] = round(sum(a.scores[name] for a in with_reference) / len(with_reference), 4)
        return EvaluationResult(metrics, general=scored)


def base_weights(model: Any) -> contextlib.AbstractContextManager[Any]:
    """The base model's weights for the duration: a peft model's adapters switched off; a fully
    fine-tuned model has no other weights, and is the base only before training."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


@torch.no_grad()
def answer_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Example],
    answers: Sequence[str],
    *,
    device: torch.device,
    max_prompt_tokens: int,
    batch_size: int = 8,
) -> tuple[list[float], list[int]]:
    """The negative log-likelihood the model gives each answer after its prompt: (sum over the
    answer's tokens, their count) per prompt, teacher-forced, in the prompts' order."""
    was_training = model.training
    model.eval()
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids[-max_prompt_tokens:], answer_ids))
    sums: list[float] = []
    counts: list[int] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt_ids, answer_ids) in enumerate(batch):
            ids = prompt_ids + answer_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, len(prompt_ids) : len(ids)] = torch.tensor(answer_ids, dtype=torch.long)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        sums += token_nll.sum(dim=1).tolist()
        counts += (targets != IGNORE_INDEX).sum(dim=1).tolist()
    model.train(was_training)
    return sums, counts


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
