"""Turning examples into token ids and labels, with loss only on what the model should learn.

The conversation is rendered once with the tokenizer's own chat template and tokenized once with
character offsets. Assistant spans are found by rendering growing prefixes of the conversation,
so the mask follows whatever template the base model ships instead of hard-coding its markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneloom.trainer.datafile import Example

IGNORE_INDEX = -100  # the label value cross-entropy skips


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to mask assistant tokens."""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is computed
    line: int = 0  # source line, for messages

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies to learn."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(example.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefixes, so assistant "
                f"tokens cannot be located (example at line {example.line}); use dataset.format: completion"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _label_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], *, append_eos: bool = False
) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, _end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            labels[position] = input_ids[position]
    if append_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return input_ids, labels


def encode_example(tokenizer: Any, example: Example, max_length: int | None = None) -> EncodedExample:
    """Token ids and labels of one example; truncated to max_length tokens when given."""
    if example.messages:
        text, spans = _assistant_spans(tokenizer, example)
        input_ids, labels = _label_spans(tokenizer, text, spans)
    else:
        text = example.prompt + example.completion
        input_ids, labels = _label_spans(tokenizer, text, [(len(example.prompt), len(text))], append_eos=True)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return EncodedExample(input_ids=input_ids, labels=labels, line=example.line)


def prompt_text(tokenizer: Any, example: Example) -> str:
    """What the model is given at generation time: everything before the final assistant reply."""
    if not example.messages:
        return example.prompt
    messages = [{"role": m.role, "content": m.content} for m in example.messages[:-1]]
    return _render(tokenizer, messages, generation_prompt=True)


def reference_answer(example: Example) -> str:
    """The answer the held-out example expects: the final assistant reply, or the completion."""
    return example.messages[-1].content if example.messages else example.completion
