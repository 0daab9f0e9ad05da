"""Reading and checking JSONL datasets, with every problem named as `FILE:LINE: field: problem`.

Two formats, one JSON object per line:

- chat (OpenAI's fine-tuning format): `{"messages": [{"role": "system|user|assistant", "content": "..."}]}`;
  an assistant message may carry `"weight": 0` to be shown to the model but not learned from.
- completion: `{"prompt": "...", "completion": "..."}`.

Other top-level keys (ids, metadata) are ignored, as OpenAI does. This module imports neither torch nor
transformers at load time: `tuneloom validate-data` must run on a laptop without them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tuneloom.trainer.estimate import Workload, available_cores, count_parameters, device_for_name, estimate

# preference: OpenAI's pairs ({"input": {"messages"}, "preferred_output", "non_preferred_output"}),
# checked by validate-data; training on them arrives with `method: dpo`.
# prompts: chat prompts without answers (the general-ability check's prompt sets), each optionally
# with the answer expected, `{"messages": [..., {"role": "user", ...}], "reference": "..."}`.
PROMPTS_FORMAT = "prompts"
FORMATS = ("chat", "completion", "preference", PROMPTS_FORMAT)
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
PROMPT_KEYS = ("messages", "reference")
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight")
# An error message listing 10,000 problems helps nobody; the CLI still prints them all.
MAX_LISTED_PROBLEMS = 50
# How many line numbers a summary keeps for duplicates and too-long examples.
MAX_LISTED_LINES = 20
# The most bytes one line (one example) may have, without its line ending. Real examples are far
# smaller; the cap is what keeps one hostile line from taking the machine's memory, since nothing
# of a longer line is ever held (--max-line-bytes, dataset.maxLineBytes).
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
# How much of an over-long line is read at a time while skipping to its end.
_SKIP_CHUNK = 1024 * 1024
_BLANK_LINE = "blank line; only the end of the file may have blank lines"
# validate-data counts tokens exactly up to this multiple of max_seq_length; a longer example's
# count is a lower bound, which is all "longer than max_seq_length" needs.
TOKEN_COUNT_FACTOR = 4
# The most common mistake is the wrong format for the file; say so instead of just "missing".
_FORMAT_HINT = "; this line looks like {found}: use --format {fmt} (dataset.format: {fmt} in a FineTuneJob)"


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    weight: int = 1  # assistant messages only; 0 = shown to the model but not learned from


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line in the source file
    messages: tuple[Message, ...] = ()  # chat format
    prompt: str = ""  # completion format
    completion: str = ""  # completion format
    preferred: str = ""  # preference format: `messages` is the input, these the two answers
    non_preferred: str = ""


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


class DataValidationError(ValueError):
    """A dataset with problems; `problems` holds all of them, str() lists the first few."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        listed = [str(problem) for problem in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            listed.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid dataset, {len(problems)} {noun}:\n  " + "\n  ".join(listed))


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type: users wrote JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass(frozen=True)
class Span:
    """The lines of a file that are checked together: those starting in bytes [start, end) (None:
    to the end of the file), the first of them line `first_line`. A large file is checked as spans
    side by side (`tuneloom.trainer.dataspans`); each after the first starts at a non-blank line."""

    start: int = 0
    end: int | None = None
    first_line: int = 1


WHOLE_FILE = Span()


def _read_lines(path: Path, max_line_bytes: int, span: Span = WHOLE_FILE) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based line number, raw bytes without the line ending, their count) for every line of `span`.

    Streams, and never holds more than `max_line_bytes` of a line: a longer one comes as
    (number, None, its real length), the rest of it read in chunks and dropped.
    """
    with path.open("rb") as handle:
        if span.start:
            handle.seek(span.start)
        elif handle.peek(3)[:3] == b"\xef\xbb\xbf":
            handle.read(3)  # a UTF-8 byte order mark, as Windows tools write; harmless
        # Two bytes more than the cap, so a line of exactly the cap fits with its "\r\n".
        read_limit = max_line_bytes + 2
        number, position = span.first_line - 1, handle.tell()
        while (span.end is None or position < span.end) and (raw := handle.readline(read_limit)):
            number += 1
            line = raw.rstrip(b"\r\n")
            whole = raw.endswith(b"\n") or len(raw) < read_limit  # else readline stopped at the limit
            if whole and len(line) <= max_line_bytes:
                yield number, line, len(line)
                position += len(raw)
            else:
                yield number, None, _long_line_length(handle, raw)
                position = handle.tell()


def _long_line_length(handle: IO[bytes], head: bytes) -> int:
    """The length, without its line ending, of the line whose first bytes `head` were just read;
    reads the rest of it in chunks and keeps none."""
    length, previous, chunk = len(head), b"", head
    while not chunk.endswith(b"\n"):
        previous, chunk = chunk, handle.readline(_SKIP_CHUNK)
        if not chunk:
            return length  # the last line, without a line ending
        length += len(chunk)
    return length - (2 if (previous[-1:] + chunk)[-2:] == b"\r\n" else 1)


def _decode(source: str, number: int, raw: bytes) -> tuple[Any, Problem | None]:
    """One line's JSON value, or the problem that stops it being read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = raw[error.start]
        return None, Problem(
            source,
            number,
            "line",
            f"not valid UTF-8 (byte 0x{byte:02x} at byte {error.start + 1}); save the file as UTF-8",
        )
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, Problem(source, number, "line", f"invalid JSON at column {error.colno}: {error.msg}")
    except RecursionError:
        # [[[[... a few thousand deep exhausts the decoder's stack; no example nests like that.
        return None, Problem(source, number, "line", "JSON nested too deeply; an example is an object of messages")


def _text_problem(value: Any, *, present: bool) -> str | None:
    """Why a content/prompt/completion value is unusable, or None."""
    if not present:
        return "missing"
    if isinstance(value, list):
        return "must be a string; lists of content parts are not supported"
    if not isinstance(value, str):
        return f"must be a string, got {_json_type(value)}"
    if not value.strip():
        return "empty"
    return None


def _check_weight(message: dict[str, Any], role: Any) -> tuple[int, str | None]:
    # An unknown role is already reported; whether it may take a weight is moot.
    if "weight" not in message or role not in ROLES:
        return 1, None
    weight = message["weight"]
    if role != "assistant":
        return 1, f"only assistant messages take a weight (this one is {role!r})"
    # `type(...) is int` because JSON true would pass isinstance(…, int) as 1.
    if type(weight) is not int or weight not in (0, 1):
        shown = json.dumps(weight) if not isinstance(weight, (dict, list)) else _json_type(weight)
        return 1, f"must be 0 or 1, got {shown}"
    return weight, None


def _check_message(index: int, message: Any, array: str = "messages") -> tuple[Message | None, list[tuple[str, str]]]:
    """One chat message as a Message, with (field, problem) pairs for whatever is wrong."""
    where = f"{array}[{index}]"
    if not isinstance(message, dict):
        return None, [(where, f"must be an object with role and content, got {_json_type(message)}")]
    problems = [
        (f"{where}.{key}", f"unknown key; a message has only {', '.join(MESSAGE_KEYS)}")
        for key in message
        if key not in MESSAGE_KEYS
    ]
    role = message.get("role")
    if "role" not in message:
        problems.append((f"{where}.role", f"missing; must be one of {', '.join(ROLES)}"))
    elif role not in ROLES:
        shown = repr(role) if isinstance(role, str) else _json_type(role)
        problems.append((f"{where}.role", f"unknown role {shown}; must be one of {', '.join(ROLES)}"))
    content = message.get("content")
    why = _text_problem(content, present="content" in message)
    if why:
        problems.append((f"{where}.content", why))
    weight, why = _check_weight(message, role)
    if why:
        problems.append((f"{where}.weight", why))
    if problems:
        return None, problems
    return Message(role=role, content=content, weight=weight), []


def _check_messages(record: dict[str, Any]) -> tuple[list[Message], list[tuple[str, str]]]:
    """The conversation's messages, each checked on its own."""
    if "messages" not in record:
        hint = ""
        if "prompt" in record or "completion" in record:
            hint = _FORMAT_HINT.format(found="completion format (prompt, completion)", fmt="completion")
        return [], [("messages", "missing" + hint)]
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list):
        return [], [("messages", f"must be an array of messages, got {_json_type(raw_messages)}")]
    if not raw_messages:
        return [], [("messages", "empty; a conversation needs at least a user and an assistant message")]
    messages: list[Message] = []
    problems: list[tuple[str, str]] = []
    for index, raw in enumerate(raw_messages):
        message, found = _check_message(index, raw)
        problems.extend(found)
        if message:
            messages.append(message)
    return messages, problems


def _check_chat(record: dict[str, Any], line: int) -> tuple[Example | None, list[tuple[str, str]]]:
    messages, problems = _check_messages(record)
    if problems or not messages:
        # Conversation-level checks on a half-read conversation would only add noise.
        return None, problems
    last = len(messages) - 1
    if messages[last].role != "assistant":
        problems.append(
            (
                f"messages[{last}].role",
                f"last message is from {messages[last].role!r}; the final turn must be the assistant's",
            )
        )
    if not any(message.role == "assistant" and message.weight == 1 for message in messages):
        problems.append(("messages", "no assistant message with weight 1; nothing to learn from"))
    if problems:
        return None, problems
    return Example(line=line, messages=tuple(messages)), []


def _check_prompt(record: dict[str, Any], line: int) -> tuple[Example | None, list[tuple[str, str]]]:
    """A prompt to answer: the conversation so far, ending with the user's turn, then its reference
    answer (empty when the prompt has none) as the final assistant message, as a held-out example has."""
    problems = [
        (key, f"unknown key; a prompt has only {', '.join(PROMPT_KEYS)}") for key in record if key not in PROMPT_KEYS
    ]
    messages, found = _check_messages(record)
    problems += found
    reference = record.get("reference", "")
    if not isinstance(reference, str):
        problems.append(("reference", f"must be a string, got {_json_type(reference)}"))
    if messages and not found and messages[-1].role != "user":
        problems.append(
            (
                f"messages[{len(messages) - 1}].role",
                f"last message is from {messages[-1].role!r}; a prompt ends with the user's turn",
            )
        )
    if problems:
        return None, problems
    return Example(line=line, messages=(*messages, Message("assistant", reference))), []


def _check_completion(record: dict[str, Any], line: int) -> tuple[Example | None, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    for key in ("prompt", "completion"):
        why = _text_problem(record.get(key), present=key in record)
        if why == "missing" and "messages" in record:
            why += _FORMAT_HINT.format(found="chat format (messages)", fmt="chat")
        if why:
            problems.append((key, why))
    if problems:
        return None, problems
    return Example(line=line, prompt=record["prompt"], completion=record["completion"]), []


def _check_answer(record: dict[str, Any], key: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A preference pair's answer: an array holding one assistant message."""
    if key not in record:
        return None, [(key, 'missing; expected [{"role": "assistant", "content": "..."}]')]
    value = record[key]
    if not isinstance(value, list) or len(value) != 1:
        shown = f"{len(value)} messages" if isinstance(value, list) else _json_type(value)
        return None, [(key, f"must be an array of exactly one assistant message, got {shown}")]
    message, problems = _check_message(0, value[0], key)
    if message is not None and message.role != "assistant":
        problems.append((f"{key}[0].role", f"must be 'assistant', got {message.role!r}"))
    return (message.content if message and not problems else None), problems


def as_sequences(pair: Example) -> tuple[Example, Example]:
    """A preference pair as the two conversations a model scores: the input with each answer."""

    def with_answer(answer: str) -> Example:
        return Example(line=pair.line, messages=(*pair.messages, Message("assistant", answer)))

    return with_answer(pair.preferred), with_answer(pair.non_preferred)


def _check_preference(record: dict[str, Any], line: int) -> tuple[Example | None, list[tuple[str, str]]]:
    problems = [
        (key, f"unknown key; a preference pair has only {', '.join(PREFERENCE_KEYS)}")
        for key in record
        if key not in PREFERENCE_KEYS
    ]
    raw_input = record.get("input")
    messages: list[Message] = []
    if not isinstance(raw_input, dict) or not isinstance(raw_input.get("messages"), list):
        shown = "missing" if "input" not in record else f"got {_json_type(raw_input)}"
        problems.append(("input", f'{shown}; expected {{"messages": [...]}} ending with the user\'s turn'))
    elif not raw_input["messages"]:
        problems.append(("input.messages", "empty; the answers need a prompt"))
    else:
        for index, raw in enumerate(raw_input["messages"]):
            message, found = _check_message(index, raw, "input.messages")
            problems.extend(found)
            if message:
                messages.append(message)
        if len(messages) == len(raw_input["messages"]) and messages[-1].role == "assistant":
            problems.append(
                (
                    f"input.messages[{len(messages) - 1}].role",
                    "the input ends with the assistant's turn; the answers follow it, so it must end with the user's",
                )
            )
    preferred, found = _check_answer(record, "preferred_output")
    problems.extend(found)
    non_preferred, found = _check_answer(record, "non_preferred_output")
    problems.extend(found)
    if preferred is not None and preferred.strip() == (non_preferred or "").strip():
        problems.append(("non_preferred_output[0].content", "identical to preferred_output; a pair needs two answers"))
    if problems:
        return None, problems
    example = Example(line=line, messages=tuple(messages), preferred=preferred, non_preferred=non_preferred)
    return example, []


# The keys only OpenAI's preference format has; a record with any of them is a pair.
_PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})


def sniff_format(path: Path | str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> str:
    """ "preference" when the file's first record is a chat pair in OpenAI's preference format, else
    "chat": what a file uploaded without a stated format is then checked as (a file that is neither
    gets chat's problems, which name what a chat line needs)."""
    with Path(path).open("rb") as handle:
        for raw in iter(lambda: handle.readline(max_line_bytes), b""):
            if raw.strip():
                try:
                    record = json.loads(raw)
                except ValueError:
                    return "chat"
                return "preference" if isinstance(record, dict) and _PREFERENCE_KEYS & record.keys() else "chat"
    return "chat"


def check_file(
    path: Path | str,
    fmt: str = "chat",
    *,
    source: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> tuple[list[Example], list[Problem]]:
    """Every valid example and every problem in a JSONL file; raises OSError if it can't be read.

    `source` is the name used in problems, such as the s3:// URI a local copy came from. A line
    longer than `max_line_bytes` is a problem, and is never held in memory.
    """
    examples: list[Example] = []
    problems: list[Problem] = []
    for item in iter_checked(path, fmt, source=source, max_line_bytes=max_line_bytes):
        (problems if isinstance(item, Problem) else examples).append(item)
    return examples, problems


def iter_checked(
    path: Path | str,
    fmt: str = "chat",
    *,
    source: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    span: Span = WHOLE_FILE,
    quick: Callable[[bytes], bool] | None = None,
) -> Iterator[Example | Problem | int]:
    """check_file's examples and problems one at a time, in line order: a caller that only counts
    them (an upload's check) holds none of a large file in memory. With a `span`, those of its
    lines: blank lines at its end are followed by the next span's first line, so they are problems.
    A line that `quick` accepts is valid without the checks below and comes as its number alone
    (`quickcheck`: for a caller that only counts examples)."""
    fmt = str(getattr(fmt, "value", fmt))  # accepts api.DatasetFormat as well as a plain string
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; must be one of {', '.join(FORMATS)}")
    path = Path(path)
    source = source or str(path)
    check = {
        "chat": _check_chat,
        "completion": _check_completion,
        "preference": _check_preference,
        PROMPTS_FORMAT: _check_prompt,
    }[fmt]
    # Blank lines are only wrong when something follows them, so hold them until it does.
    pending_blanks: list[int] = []
    seen_content = False
    for number, raw, size in _read_lines(path, max_line_bytes, span):
        if raw is not None and not raw.strip():
            pending_blanks.append(number)
            continue
        for blank in pending_blanks:
            yield Problem(source, blank, "line", _BLANK_LINE)
        pending_blanks.clear()
        seen_content = True
        if raw is None:
            yield Problem(source, number, "line", _too_long(size, max_line_bytes))
            continue
        if quick is not None and quick(raw):
            yield number
            continue
        record, problem = _decode(source, number, raw)
        if problem:
            yield problem
            continue
        if not isinstance(record, dict):
            yield Problem(source, number, "line", f"must be a JSON object, got {_json_type(record)}")
            continue
        example, found = check(record, number)
        for where, what in found:
            yield Problem(source, number, where, what)
        if example:
            yield example
    if span.end is not None:
        for blank in pending_blanks:
            yield Problem(source, blank, "line", _BLANK_LINE)
    elif not seen_content and span.start == 0:
        yield Problem(source, 1, "file", "empty; expected one JSON object per line")


def _too_long(size: int, limit: int) -> str:
    return f"too long ({size} bytes); the limit is {limit} bytes (--max-line-bytes / dataset.maxLineBytes)"


def load_examples(
    path: Path | str,
    fmt: str = "chat",
    *,
    source: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[Example]:
    """All examples of a JSONL file; raises DataValidationError naming every problem."""
    examples, problems = check_file(path, fmt, source=source, max_line_bytes=max_line_bytes)
    if problems:
        raise DataValidationError(problems)
    return examples


@dataclass
class DataSummary:
    examples: int
    duplicates: int  # examples identical to an earlier one
    duplicate_lines: list[tuple[int, int]]  # (line, line of its first copy), the first few
    max_seq_length: int
    batch_size: int
    epochs: int
    grad_accum: int
    steps_per_epoch_unpacked: int  # one example per sequence
    # Token statistics: only with a tokenizer.
    tokens_min: int | None = None
    tokens_mean: float | None = None
    tokens_max: int | None = None
    tokens_per_epoch: int | None = None
    trained_tokens_per_epoch: int | None = None  # tokens that carry loss (labels != -100)
    too_long: int = 0  # examples longer than max_seq_length
    too_long_lines: list[int] = field(default_factory=list)  # the first few
    # Examples with more than count_limit tokens, counted only that far: the figures are lower bounds.
    count_limit: int | None = None
    counted_in_part: int = 0
    steps_per_epoch_packed: int | None = None  # sequences packed to max_seq_length
    trained_on_per_epoch: int | None = None  # tokens of each example up to max_seq_length: what training computes

    @property
    def counted_tokens(self) -> bool:
        return self.tokens_per_epoch is not None

    @property
    def total_steps_unpacked(self) -> int:
        return self.steps_per_epoch_unpacked * self.epochs

    @property
    def total_steps_packed(self) -> int | None:
        if self.steps_per_epoch_packed is None:
            return None
        return self.steps_per_epoch_packed * self.epochs


def content_key(example: Example) -> tuple[Any, ...]:
    """What makes two examples the same example, whatever line they are on."""
    return (example.messages, example.prompt, example.completion, example.preferred, example.non_preferred)


def find_duplicates(examples: Sequence[Example]) -> list[tuple[int, int]]:
    """(line, line of the first copy) for every example that repeats an earlier one exactly."""
    first_line: dict[tuple[Any, ...], int] = {}
    duplicates: list[tuple[int, int]] = []
    for example in examples:
        key = content_key(example)
        if key in first_line:
            duplicates.append((example.line, first_line[key]))
        else:
            first_line[key] = example.line
    return duplicates


def summarize(
    examples: Sequence[Example],
    *,
    tokenizer: Any = None,
    max_seq_length: int = 1024,
    batch_size: int = 8,
    epochs: int = 3,
    grad_accum: int = 1,
) -> DataSummary:
    """Counts, duplicates and, with a tokenizer, token statistics and estimated optimizer steps."""
    per_step = batch_size * grad_accum
    duplicates = find_duplicates(examples)
    summary = DataSummary(
        examples=len(examples),
        duplicates=len(duplicates),
        duplicate_lines=duplicates[:MAX_LISTED_LINES],
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        epochs=epochs,
        grad_accum=grad_accum,
        steps_per_epoch_unpacked=math.ceil(len(examples) / per_step),
    )
    if tokenizer is None or not examples:
        return summary
    # Lazy: tokenize pulls in transformers, which validate-data without --model must not need.
    from tuneloom.trainer.tokenize import IGNORE_INDEX, encode_example

    lengths: list[int] = []
    trained = 0
    too_long: list[int] = []
    # Exact counts up to a generous limit; past it only "too long" matters, and tokenizing a whole
    # multi-MB example would cost hundreds of MB.
    summary.count_limit = max_seq_length * TOKEN_COUNT_FACTOR
    for example in examples:
        encoded = encode_example(tokenizer, example, summary.count_limit)
        summary.counted_in_part += encoded.truncated
        lengths.append(len(encoded.input_ids))
        trained += sum(1 for label in encoded.labels if label != IGNORE_INDEX)
        if lengths[-1] > max_seq_length:
            too_long.append(example.line)
    summary.tokens_min = min(lengths)
    summary.tokens_mean = sum(lengths) / len(lengths)
    summary.tokens_max = max(lengths)
    summary.tokens_per_epoch = sum(lengths)
    summary.trained_tokens_per_epoch = trained
    summary.too_long = len(too_long)
    summary.too_long_lines = too_long[:MAX_LISTED_LINES]
    # Training cuts examples at max_seq_length, so only that much of each one fills packed rows.
    packed_tokens = sum(min(length, max_seq_length) for length in lengths)
    summary.steps_per_epoch_packed = math.ceil(packed_tokens / (max_seq_length * per_step))
    summary.trained_on_per_epoch = packed_tokens
    return summary


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _lines_text(lines: Sequence[int], total: int) -> str:
    text = ", ".join(str(line) for line in lines)
    return text + (f", ... ({total - len(lines)} more)" if total > len(lines) else "")


def _duplicate_lines(summary: DataSummary) -> list[str]:
    if not summary.duplicates:
        return ["duplicates: none"]
    out = [
        f"warning: {_plural(summary.duplicates, 'exact duplicate example')}; "
        "every copy is trained on, so repeated examples weigh more"
    ]
    out.extend(f"  line {line} repeats line {first}" for line, first in summary.duplicate_lines)
    if summary.duplicates > len(summary.duplicate_lines):
        out.append(f"  ... and {summary.duplicates - len(summary.duplicate_lines)} more")
    return out


def _token_lines(summary: DataSummary, model: str | None) -> list[str]:
    if not summary.counted_tokens:
        return ["tokens: not counted; pass --model DIR to count them with the model's tokenizer"]
    limit = summary.max_seq_length
    out = [
        f"tokens per example (tokenizer of {model}): "
        f"min {summary.tokens_min}, mean {summary.tokens_mean:.1f}, max {summary.tokens_max}",
        f"tokens per epoch: {summary.tokens_per_epoch:,} ({summary.trained_tokens_per_epoch:,} of them learned from)",
    ]
    if summary.counted_in_part:
        out.append(
            f"  {_plural(summary.counted_in_part, 'example')} with more than {summary.count_limit} tokens "
            "counted only that far: these figures are lower bounds"
        )
    if summary.too_long:
        out.append(
            f"warning: {_plural(summary.too_long, 'example')} longer than max_seq_length {limit}, on lines "
            f"{_lines_text(summary.too_long_lines, summary.too_long)}; tokens past the limit are not "
            "trained on: raise max_seq_length or shorten them"
        )
    else:
        out.append(f"longer than max_seq_length {limit}: none")
    return out


def _step_lines(summary: DataSummary) -> list[str]:
    out = [
        f"estimated optimizer steps for batch size {summary.batch_size}, gradient accumulation "
        f"{summary.grad_accum}, {summary.epochs} epochs (estimates; the trainer's count may differ):",
        f"  one example per row: {summary.steps_per_epoch_unpacked} per epoch, {summary.total_steps_unpacked} in total",
    ]
    if summary.steps_per_epoch_packed is not None:
        out.append(
            f"  packed into {summary.max_seq_length}-token rows: {summary.steps_per_epoch_packed} per epoch, "
            f"{summary.total_steps_packed} in total"
        )
    return out


def format_data_summary(
    summary: DataSummary, *, source: str, fmt: str, model: str | None = None, pairs: int | None = None
) -> str:
    """The human-readable report `tuneloom validate-data` prints on success. With `pairs`, the
    summary counts each preference pair's two sequences (input + each answer)."""
    counted = _plural(summary.examples, "example")
    if pairs is not None:
        counted = f"{_plural(pairs, 'pair')}: {summary.examples} sequences, input + each answer"
    head = f"{source}: OK, {counted} ({fmt} format)"
    return "\n".join([head, *_duplicate_lines(summary), *_token_lines(summary, model), *_step_lines(summary)])


@dataclass(frozen=True)
class TargetDevice:
    """Where `validate-data` estimates the training: a device name from `estimate.DEVICES`, the GPUs,
    the method, and the price of one GPU-hour."""

    device: str = "cpu"
    gpus: int = 1
    method: str = "lora"
    price_per_gpu_hour: float | None = None


def _estimate_lines(summary: DataSummary, model: str, target: TargetDevice) -> list[str]:
    """Training tokens, steps, time and cost on the target device (packed rows, as the trainer trains)."""
    if summary.trained_on_per_epoch is None or summary.total_steps_packed is None:
        return []
    device = device_for_name(target.device)
    try:
        parameters = count_parameters(model)
    except ValueError as error:  # weights in another format: the rest of the summary still holds
        return [f"no time estimate: {error}"]
    workload = Workload(
        parameters=parameters,
        method=target.method,
        tokens_per_epoch=summary.trained_on_per_epoch,
        epochs=summary.epochs,
        steps=summary.total_steps_packed,
    )
    devices = target.gpus if device.is_gpu else available_cores()
    return estimate(workload, device, devices=devices, price_per_gpu_hour=target.price_per_gpu_hour).lines()


def _load_tokenizer(model: str) -> Any:
    """The model directory's tokenizer; raises ValueError with a sentence a user can act on."""
    if not Path(model).is_dir():
        raise ValueError(f"--model {model}: not a directory; pass a local model directory")
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ValueError("--model needs transformers: pip install 'tuneloom[train]'") from error
    return AutoTokenizer.from_pretrained(model)


def validate_data_command(
    file: str,
    *,
    fmt: str,
    model: str | None,
    max_seq_length: int,
    batch_size: int,
    epochs: int,
    validation_split: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    validation: str | None = None,
    strict: bool = False,
    target: TargetDevice = TargetDevice(),
) -> int:
    """`tuneloom validate-data`: 1 and every problem on stderr, or 0 and a summary on stdout, with
    the data-quality warnings (errors under `strict`) and, with `model`, the estimated time and
    cost of training on `target`."""
    from tuneloom.trainer.dataquality import find_problems

    held_out: list[Example] = []
    try:
        examples, problems = check_file(Path(file), fmt, max_line_bytes=max_line_bytes)
        if validation:
            held_out, more = check_file(Path(validation), fmt, max_line_bytes=max_line_bytes)
            problems += more
    except OSError as error:
        print(f"error: {error.filename or file}: {error.strerror or error}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        lines = len({problem.line for problem in problems})
        print(
            f"{_plural(len(problems), 'problem')} on {_plural(lines, 'line')}; {file} cannot be used for training",
            file=sys.stderr,
        )
        return 1
    try:
        tokenizer = _load_tokenizer(model) if model else None
        # A pair is trained as two sequences; tokens, lengths and steps are theirs.
        sequences = [seq for pair in examples for seq in as_sequences(pair)] if fmt == "preference" else examples
        summary = summarize(
            sequences, tokenizer=tokenizer, max_seq_length=max_seq_length, batch_size=batch_size, epochs=epochs
        )
        estimate_lines = _estimate_lines(summary, model, target) if model else []
    except (ValueError, OSError) as error:
        # A directory that is not a model, or a chat template that cannot mask assistant turns.
        print(f"error: {error}", file=sys.stderr)
        return 1
    findings = find_problems(
        examples, held_out, held_out_size=None if validation else math.ceil(len(examples) * validation_split)
    )
    warnings = [finding for finding in findings if not finding.note]
    if strict and warnings:
        for finding in warnings:
            print(f"error: {finding.message}", file=sys.stderr)
        print(f"{_plural(len(warnings), 'data-quality problem')} (--strict); {file} is refused", file=sys.stderr)
        return 1
    pairs = len(examples) if fmt == "preference" else None
    print(format_data_summary(summary, source=file, fmt=fmt, model=model, pairs=pairs))
    for line in estimate_lines:
        print(line)
    for finding in findings:
        print(f"{'note' if finding.note else 'warning'}: {finding.message}")
    return 0
