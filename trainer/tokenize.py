"""Turning examples into token ids and labels, with loss only on what the model should learn.

The conversation is rendered once with the tokenizer's own chat template and tokenized once with
character offsets. Assistant spans are found by rendering growing prefixes of the conversation,
so the mask follows whatever template the base model ships instead of hard-coding its markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuneloom.trainer.datafile import Example

IGNORE_INDEX = -100  # the label value cross-entropy skips


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to mask assistant tokens."""


# With a max_length, only this many characters per wanted token are tokenized at first: no real
# vocabulary averages more over a long text (English is about 4), and tokenizing a whole 4 MiB
# line would take hundreds of MB. When a cut holds too few tokens, it doubles.
CHARS_PER_TOKEN = 8
# A cut can split its last words differently from the whole text; tokens ending this close to it
# are not trusted to be the whole text's tokens.
CUT_MARGIN_CHARS = 256


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is computed
    line: int = 0  # source line, for messages
    truncated: bool = False  # the example has more tokens than input_ids kept

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, example: Example, upto: int | None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies to learn.

    With `upto`, spans starting at or past that character are left out: each span renders a prefix
    of the conversation, so a line of thousands of replies would cost quadratic time otherwise.
    """
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(example.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        if upto is not None and len(before) >= upto:
            break  # prefixes only grow: every later reply starts past the cut too
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefixes, so assistant "
                f"tokens cannot be located (example at line {example.line}); use dataset.format: completion"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _text_and_spans(tokenizer: Any, example: Example, upto: int | None) -> tuple[str, list[tuple[int, int]], bool]:
    """The text to tokenize, the spans that carry loss, and whether an EOS token ends it."""
    if example.messages:
        text, spans = _assistant_spans(tokenizer, example, upto)
        return text, spans, False
    text = example.prompt + example.completion
    return text, [(len(example.prompt), len(text))], True


def _label_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Token ids, their labels, and the character each token ends at."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    ends = []
    span_index = 0
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        ends.append(end)
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            labels[position] = input_ids[position]
    return input_ids, labels, ends


def encode_example(tokenizer: Any, example: Example, max_length: int | None = None) -> EncodedExample:
    """Token ids and labels of one example; at most max_length tokens when given.

    With max_length, time and memory follow max_length rather than the example's size: only a
    prefix of the text is tokenized, long enough to hold more than max_length trusted tokens, so
    `truncated` is still exact.
    """
    budget = None if max_length is None else max_length * CHARS_PER_TOKEN
    while True:
        text, spans, eos = _text_and_spans(tokenizer, example, budget)
        if budget is None or len(text) <= budget:
            input_ids, labels, _ = _label_spans(tokenizer, text, spans)
            if eos:
                input_ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
            return _kept(input_ids, labels, example.line, max_length)
        input_ids, labels, ends = _label_spans(tokenizer, text[:budget], spans)
        trusted = sum(1 for end in ends if end <= budget - CUT_MARGIN_CHARS)
        if max_length is not None and trusted > max_length:
            return _kept(input_ids, labels, example.line, max_length)
        budget *= 2


def _kept(input_ids: list[int], labels: list[int], line: int, max_length: int | None) -> EncodedExample:
    if max_length is None or len(input_ids) <= max_length:
        return EncodedExample(input_ids=input_ids, labels=labels, line=line)
    return EncodedExample(input_ids=input_ids[:max_length], labels=labels[:max_length], line=line, truncated=True)


def prompt_text(tokenizer: Any, example: Example) -> str:
    """What the model is given at generation time: everything before the final assistant reply."""
    if not example.messages:
        return example.prompt
    # A preference pair's messages are the input alone; the answers follow them.
    asked = example.messages if example.preferred else example.messages[:-1]
    messages = [{"role": m.role, "content": m.content} for m in asked]
    return _render(tokenizer, messages, generation_prompt=True)


def few_shot_prompt(tokenizer: Any, example: Example, shots: Sequence[Example]) -> str:
    """`prompt_text` with solved examples before the question: in chat format their user and
    assistant turns come after the example's own system message, as if asked earlier in the
    conversation; in completion format each prompt and completion comes first, a blank line after it."""
    if not example.messages:
        return "".join(f"{shot.prompt}{shot.completion}\n\n" for shot in shots) + example.prompt
    system = example.messages[:1] if example.messages[0].role == "system" else ()
    turns = [message for shot in shots for message in shot.messages if message.role != "system"]
    conversation = (*system, *turns, *example.messages[len(system) : -1])
    return _render(tokenizer, [{"role": m.role, "content": m.content} for m in conversation], generation_prompt=True)


def reference_answer(example: Example) -> str:
    """The answer the held-out example expects: the preferred answer, the final assistant reply, or
    the completion."""
    if example.preferred:
        return example.preferred
    return example.messages[-1].content if example.messages else example.completion


def question_text(example: Example) -> str:
    """The prompt as a person reads it, without the chat template: the last user turn, or the completion prompt."""
    users = [message.content for message in example.messages if message.role == "user"]
    return users[-1] if users else example.prompt
