"""Held-out evaluation: loss and token accuracy, and generation metrics on held-out prompts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneloom.api import GenerationMetric
from tuneloom.trainer.batching import Batch
from tuneloom.trainer.datafile import Example
from tuneloom.trainer.tokenize import prompt_text, reference_answer


@dataclass
class LossResult:
    loss: float
    token_accuracy: float
    tokens: int


@dataclass
class GenerationResult:
    answers: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    per_example: list[dict[str, bool]] = field(default_factory=list)


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


def score(answers: Sequence[str], references: Sequence[str], metrics: Sequence[GenerationMetric]) -> GenerationResult:
    per_example = [
        {metric.value: SCORERS[metric](answer, reference) for metric in metrics}
        for answer, reference in zip(answers, references, strict=True)
    ]
    means = {
        metric.value: sum(row[metric.value] for row in per_example) / max(len(per_example), 1) for metric in metrics
    }
    return GenerationResult(answers=list(answers), metrics=means, per_example=per_example)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy answers to the held-out prompts, batched with left padding.

    With `max_prompt_tokens`, longer prompts keep only their last tokens (where the question and
    the generation prompt are): a prompt of a million tokens would not fit in attention memory.
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    answers: list[str] = []
    prompts = [prompt_text(tokenizer, example) for example in examples]
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
    answers = [by_index[i] for i in range(len(prompts))]
    model.train(was_training)
    return answers


def references(examples: Sequence[Example]) -> list[str]:
    return [reference_answer(example) for example in examples]
