"""Dataset checks: problems named FILE:LINE: field, summaries, validate-data, the quick start data."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tuneloom.cli import main
from tuneloom.trainer import dataspans
from tuneloom.trainer.datafile import (
    DEFAULT_MAX_LINE_BYTES,
    DataValidationError,
    Example,
    Message,
    Problem,
    check_file,
    iter_checked,
    load_examples,
    summarize,
)

from .measure import MB, line_length, run_cli, write_huge_line

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO / "examples" / "support-tickets"

USER = {"role": "user", "content": "Where is my order?"}
ASSISTANT = {"role": "assistant", "content": "It ships tomorrow."}
GOOD = {"messages": [USER, ASSISTANT]}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Each item is a line: dicts and lists as JSON, strings as written."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def problem_lines(path: Path, fmt: str = "chat") -> list[str]:
    return [str(problem) for problem in check_file(path, fmt)[1]]


def chat(*messages: Any) -> dict[str, Any]:
    return {"messages": list(messages)}


# Each case puts the bad line between two good ones, at line 2, and expects exactly one problem.
CHAT_CASES = [
    ("invalid-json", '{"messages": [}', "line: invalid JSON at column 15: "),
    ("not-an-object", [1, 2], "line: must be a JSON object, got array"),
    ("missing-messages", {"text": "hi"}, "messages: missing"),
    ("messages-not-a-list", {"messages": "hi"}, "messages: must be an array of messages, got string"),
    ("empty-messages", {"messages": []}, "messages: empty; "),
    ("message-not-an-object", chat("hi", ASSISTANT), "messages[0]: must be an object with role and content"),
    (
        "unknown-role",
        chat({"role": "bot", "content": "x"}, ASSISTANT),
        "messages[0].role: unknown role 'bot'; must be one of system, user, assistant",
    ),
    ("missing-role", chat({"content": "x"}, ASSISTANT), "messages[0].role: missing; must be one of "),
    ("missing-content", chat(USER, {"role": "assistant"}), "messages[1].content: missing"),
    (
        "content-not-a-string",
        chat(USER, {"role": "assistant", "content": 5}),
        "messages[1].content: must be a string, got number",
    ),
    (
        "content-parts",
        chat({"role": "user", "content": [{"type": "text", "text": "hi"}]}, ASSISTANT),
        "messages[0].content: must be a string; lists of content parts are not supported",
    ),
    ("empty-content", chat(USER, {"role": "assistant", "content": "  "}), "messages[1].content: empty"),
    (
        "nothing-to-learn",
        chat(USER, {**ASSISTANT, "weight": 0}),
        "messages: no assistant message with weight 1; nothing to learn from",
    ),
    (
        "weight-not-0-or-1",
        chat(USER, {**ASSISTANT, "weight": 2}),
        "messages[1].weight: must be 0 or 1, got 2",
    ),
    (
        "weight-boolean",
        chat(USER, {**ASSISTANT, "weight": True}),
        "messages[1].weight: must be 0 or 1, got true",
    ),
    (
        "weight-on-user",
        chat({**USER, "weight": 1}, ASSISTANT),
        "messages[0].weight: only assistant messages take a weight (this one is 'user')",
    ),
    (
        "unknown-key",
        chat(USER, {**ASSISTANT, "name": "bot"}),
        "messages[1].name: unknown key; a message has only role, content, weight",
    ),
    (
        "ends-with-user",
        chat(USER, ASSISTANT, USER),
        "messages[2].role: last message is from 'user'; the final turn must be the assistant's",
    ),
    (
        "completion-line-in-chat-file",
        {"prompt": "a", "completion": "b"},
        "messages: missing; this line looks like completion format (prompt, completion): use --format completion",
    ),
]


@pytest.mark.parametrize(("bad", "expected"), [case[1:] for case in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_each_chat_problem_is_named_with_file_line_and_field(tmp_path: Path, bad: Any, expected: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad, GOOD])
    examples, problems = check_file(path)
    assert len(problems) == 1, problems
    assert str(problems[0]).startswith(f"{path}:2: {expected}")
    assert problems[0].line == 2
    # The good lines around it are still read.
    assert [example.line for example in examples] == [1, 3]


COMPLETION_CASES = [
    ("missing-prompt", {"completion": "b"}, "prompt: missing"),
    ("prompt-not-a-string", {"prompt": ["a"], "completion": "b"}, "prompt: must be a string"),
    ("empty-prompt", {"prompt": "", "completion": "b"}, "prompt: empty"),
    ("missing-completion", {"prompt": "a"}, "completion: missing"),
    (
        "completion-not-a-string",
        {"prompt": "a", "completion": None},
        "completion: must be a string, got null",
    ),
    ("empty-completion", {"prompt": "a", "completion": "\n"}, "completion: empty"),
    ("not-an-object", '"just text"', "line: must be a JSON object, got string"),
]


@pytest.mark.parametrize(
    ("bad", "expected"), [case[1:] for case in COMPLETION_CASES], ids=[c[0] for c in COMPLETION_CASES]
)
def test_each_completion_problem_is_named(tmp_path: Path, bad: Any, expected: str) -> None:
    good = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad, good])
    examples, problems = check_file(path, "completion")
    assert len(problems) == 1, problems
    assert str(problems[0]).startswith(f"{path}:2: {expected}")
    assert examples == [
        Example(line=1, prompt="Q: 2+2?\nA:", completion=" 4"),
        Example(line=3, prompt="Q: 2+2?\nA:", completion=" 4"),
    ]


def test_chat_line_in_completion_file_suggests_the_chat_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    assert problem_lines(path, "completion") == [
        f"{path}:1: prompt: missing; this line looks like chat format (messages): use --format chat "
        "(dataset.format: chat in a FineTuneJob)",
        f"{path}:1: completion: missing; this line looks like chat format (messages): use --format chat "
        "(dataset.format: chat in a FineTuneJob)",
    ]


def test_invalid_json_names_the_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ['{"messages": [], "x": tru}'])
    assert problem_lines(path) == [f"{path}:1: line: invalid JSON at column 23: Expecting value"]


def test_blank_line_in_the_middle_is_a_problem_but_trailing_ones_are_not(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", "   ", GOOD, "", ""])
    assert problem_lines(path) == [
        f"{path}:2: line: blank line; only the end of the file may have blank lines",
        f"{path}:3: line: blank line; only the end of the file may have blank lines",
    ]


def test_invalid_utf8_is_named_with_its_byte(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b"\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")
    assert problem_lines(path) == [f"{path}:2: line: not valid UTF-8 (byte 0xe9 at byte 18); save the file as UTF-8"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["no-bytes", "only-blank-lines"])
def test_empty_file_is_a_problem(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    assert problem_lines(path) == [f"{path}:1: file: empty; expected one JSON object per line"]


def test_every_problem_of_every_line_is_reported_in_order(tmp_path: Path) -> None:
    bad_message = {"role": "tool", "content": "", "extra": 1}
    path = write_jsonl(tmp_path / "data.jsonl", ["{", GOOD, chat(USER, bad_message), "", [], GOOD])
    assert [(problem.line, problem.field) for problem in check_file(path)[1]] == [
        (1, "line"),
        (3, "messages[1].extra"),
        (3, "messages[1].role"),
        (3, "messages[1].content"),
        (4, "line"),
        (5, "line"),
    ]


def test_source_names_the_file_in_problems(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "copy.jsonl", [GOOD, {"messages": []}])
    _, problems = check_file(path, source="s3://bucket/data/train.jsonl")
    assert [str(problem) for problem in problems] == [
        "s3://bucket/data/train.jsonl:2: messages: empty; a conversation needs at least a user and an assistant message"
    ]


def test_valid_chat_file_loads_every_example(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"id": 7, "messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT]}),
        json.dumps(chat(USER, {**ASSISTANT, "weight": 0}, {"role": "user", "content": "And?"}, ASSISTANT)),
    ]
    # A byte order mark, Windows line endings and a blank line at the end are all accepted.
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    assert load_examples(path) == [
        Example(
            line=1,
            messages=(
                Message("system", "Be brief."),
                Message("user", "Where is my order?"),
                Message("assistant", "It ships tomorrow."),
            ),
        ),
        Example(
            line=2,
            messages=(
                Message("user", "Where is my order?"),
                Message("assistant", "It ships tomorrow.", weight=0),
                Message("user", "And?"),
                Message("assistant", "It ships tomorrow."),
            ),
        ),
    ]


def test_load_examples_raises_with_every_problem_and_caps_the_listing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] + [[1]] * 60)
    with pytest.raises(DataValidationError) as caught:
        load_examples(path)
    assert len(caught.value.problems) == 60
    assert caught.value.problems[0] == Problem(str(path), 2, "line", "must be a JSON object, got array")
    text = str(caught.value)
    assert text.startswith("invalid dataset, 60 problems:\n")
    assert f"{path}:51: line:" in text and f"{path}:52: line:" not in text
    assert text.endswith("... and 10 more")


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    with pytest.raises(ValueError, match="unknown dataset format 'alpaca'"):
        check_file(path, "alpaca")


def test_summary_counts_duplicates_and_unpacked_steps(tmp_path: Path) -> None:
    other = chat(USER, {"role": "assistant", "content": "Tomorrow."})
    # Same text with a different weight is a different example, not a duplicate.
    reweighted = chat(USER, {**ASSISTANT, "weight": 0}, ASSISTANT)
    lines = [GOOD, other, GOOD, reweighted, other, GOOD] + [
        chat(USER, {**ASSISTANT, "content": f"{i}"}) for i in range(14)
    ]
    examples = load_examples(write_jsonl(tmp_path / "data.jsonl", lines))
    summary = summarize(examples, batch_size=4, grad_accum=2, epochs=3)
    assert summary.examples == 20
    assert summary.duplicates == 3
    assert summary.duplicate_lines == [(3, 1), (5, 2), (6, 1)]
    assert summary.steps_per_epoch_unpacked == 3  # ceil(20 / (4 * 2))
    assert summary.total_steps_unpacked == 9
    assert summary.tokens_per_epoch is None and summary.steps_per_epoch_packed is None


def test_validate_data_reports_problems_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"messages": [USER]}, "{oops"])
    assert main(["validate-data", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:2: messages[0].role: last message is from 'user'; the final turn must be the assistant's",
        f"{path}:2: messages: no assistant message with weight 1; nothing to learn from",
        f"{path}:3: line: invalid JSON at column 2: Expecting property name enclosed in double quotes",
        f"3 problems on 2 lines; {path} cannot be used for training",
    ]


def test_validate_data_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, chat(USER, {"role": "assistant", "content": "Soon."})])
    assert main(["validate-data", str(path), "--batch-size", "2", "--epochs", "5"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[:6] == [
        f"{path}: OK, 3 examples (chat format)",
        "warning: 1 exact duplicate example; every copy is trained on, so repeated examples weigh more",
        "  line 2 repeats line 1",
        "tokens: not counted; pass --model DIR to count them with the model's tokenizer",
        "estimated optimizer steps for batch size 2, gradient accumulation 1, 5 epochs "
        "(estimates; the trainer's count may differ):",
        "  one example per row: 2 per epoch, 10 in total",
    ]
    # Then the data-quality warnings (tests/test_dataquality.py): one prompt, two answers; 3 examples.
    warnings = [line.split(":")[1].strip() for line in lines[6:] if line.startswith("warning: ")]
    assert warnings == ["conflicting answers", "too few examples", "small held-out set"]


def test_validate_data_completion_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}])
    assert main(["validate-data", str(path), "--format", "completion"]) == 0
    assert f"{path}: OK, 1 example (completion format)" in capsys.readouterr().out
    assert main(["validate-data", str(path)]) == 1
    assert f"{path}:1: messages: missing; this line looks like completion format" in capsys.readouterr().err


def test_validate_data_missing_file_or_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert main(["validate-data", str(missing)]) == 1
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n"
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    assert main(["validate-data", str(path), "--model", str(tmp_path / "no-model")]) == 1
    assert "not a directory; pass a local model directory" in capsys.readouterr().err


def test_validate_data_needs_neither_torch_nor_transformers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    code = (
        "import sys\n"
        "from tuneloom.cli import main\n"
        f"assert main(['validate-data', {str(path)!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- with a real tokenizer ----------------------------------------------------------------------------


def test_summary_counts_tokens_and_lists_too_long_examples(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tuneloom.trainer.tokenize import encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_answer = {"role": "assistant", "content": "word " * 200}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, chat(USER, long_answer), GOOD, chat(USER, long_answer)])
    examples = load_examples(path)
    lengths = [len(encode_example(tokenizer, example).input_ids) for example in examples]
    trained = [sum(label != -100 for label in encode_example(tokenizer, e).labels) for e in examples]
    short, long = lengths[0], lengths[1]
    assert short < 100 < long

    summary = summarize(examples, tokenizer=tokenizer, max_seq_length=100, batch_size=1, epochs=2)
    assert (summary.tokens_min, summary.tokens_max) == (short, long)
    assert summary.tokens_mean == pytest.approx((short + long) / 2)
    assert summary.tokens_per_epoch == 2 * (short + long)
    assert summary.trained_tokens_per_epoch == sum(trained) > 0
    assert (summary.too_long, summary.too_long_lines) == (2, [2, 4])
    # Packing counts at most max_seq_length tokens of each example: ceil((2*short + 2*100) / 100).
    assert summary.steps_per_epoch_packed == -(-(2 * short + 200) // 100)
    assert summary.total_steps_packed == 2 * summary.steps_per_epoch_packed


def test_validate_data_with_model_prints_token_stats(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_answer = {"role": "assistant", "content": "word " * 200}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, chat(USER, long_answer)])
    argv = ["validate-data", str(path), "--model", str(tiny_model_dir), "--max-seq-length", "100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"tokens per example (tokenizer of {tiny_model_dir}): min " in out
    assert "warning: 1 example longer than max_seq_length 100, on lines 2; " in out
    assert "  packed into 100-token rows: " in out
    assert "\ntraining tokens: " in out and " per epoch, " in out
    assert "\nestimated time on cpu (" in out and "; cost: no GPU time (calibrated on bench/README.md" in out


def test_validate_data_estimates_time_and_cost_on_the_target_gpus(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneloom.trainer.estimate import count_parameters

    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 4)
    argv = ["validate-data", str(path), "--model", str(tiny_model_dir), "--epochs", "2"]
    assert main([*argv, "--device", "a100", "--gpus", "2", "--method", "full", "--gpu-hour-price", "3.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokens = next(line for line in lines if line.startswith("tokens per epoch: ")).split()[3]
    [training] = [line for line in lines if line.startswith("training tokens: ")]
    assert training.startswith(f"training tokens: {tokens} per epoch, ") and training.endswith("; 2 optimizer steps")
    seconds = 6 * count_parameters(tiny_model_dir) * 2 * int(tokens.replace(",", "")) / (312e12 * 0.35 * 2)
    cost = f"{seconds * 2 / 3600 * 3.5:.4g}"
    [timing] = [line for line in lines if line.startswith("estimated time on ")]
    assert timing.startswith(f"estimated time on 2 x a100: 1s; cost: {cost} at the price given (peak dense bf16")
    no_safetensors = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, no_safetensors, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main(["validate-data", str(path), "--model", str(no_safetensors)]) == 0
    refusal = f"no time estimate: {no_safetensors}: no *.safetensors files to count the parameters of"
    assert refusal in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):
        main([*argv, "--gpu-hour-price", "-1"])
    assert "--gpu-hour-price: must be >= 0, got -1" in capsys.readouterr().err


# --- the quick start dataset ----------------------------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("support_tickets_generate", EXAMPLE_DIR / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_dataset_is_valid_and_matches_its_generator() -> None:
    train = EXAMPLE_DIR / "train.jsonl"
    examples = load_examples(train)
    assert len(examples) == 320
    assert summarize(examples).duplicates == 0
    generated = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in _generator().generate())
    assert generated == train.read_text(encoding="utf-8"), "train.jsonl is stale: run generate.py"
    categories = {"billing", "technical", "account", "shipping", "feature_request"}
    for example in examples:
        assert [message.role for message in example.messages] == ["system", "user", "assistant"]
        assistant = example.messages[-1]
        label = json.loads(assistant.content)
        assert label.keys() == {"category", "priority"}
        assert label["category"] in categories
        assert label["priority"] in {"low", "medium", "high", "urgent"}
        assert assistant.content == json.dumps(label, separators=(", ", ": "))


def test_example_dataset_is_short(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    summary = summarize(load_examples(EXAMPLE_DIR / "train.jsonl"), tokenizer=tokenizer)
    assert summary.tokens_max is not None and summary.tokens_max <= 120


# --- over-long lines ------------------------------------------------------------------------------------


def _too_long(path: Path, line: int, size: int, limit: int) -> str:
    return (
        f"{path}:{line}: line: too long ({size} bytes); the limit is {limit} bytes "
        "(--max-line-bytes / dataset.maxLineBytes)"
    )


def test_line_cap_counts_the_bytes_of_the_line_without_its_ending(tmp_path: Path) -> None:
    text = json.dumps(GOOD)
    limit = len(text.encode())
    path = tmp_path / "data.jsonl"
    longer = json.dumps({**GOOD, "id": "x"})
    path.write_bytes(f"{text}\r\n{longer}\r\n{text}\n{longer}".encode())  # the last line has no ending
    examples, problems = check_file(path, max_line_bytes=limit)
    assert [example.line for example in examples] == [1, 3]
    size = len(longer.encode())
    assert [str(p) for p in problems] == [_too_long(path, 2, size, limit), _too_long(path, 4, size, limit)]


def test_over_long_first_line_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n")
    size = len(json.dumps(GOOD).encode())
    assert problem_lines(path) == []
    assert [str(p) for p in check_file(path, max_line_bytes=size - 1)[1]] == [
        _too_long(path, 1, size, size - 1),
        _too_long(path, 2, size, size - 1),
    ]


def test_deeply_nested_json_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "[" * 100_000 + "]" * 100_000])
    assert problem_lines(path) == [f"{path}:2: line: JSON nested too deeply; an example is an object of messages"]


def test_max_line_bytes_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    size = line_length(path)
    assert main(["validate-data", str(path), "--max-line-bytes", str(size)]) == 0
    assert main(["validate-data", str(path), "--max-line-bytes", str(size - 1)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == _too_long(path, 1, size, size - 1)
    with pytest.raises(SystemExit) as caught:
        main(["validate-data", str(path), "--max-line-bytes", "0"])
    assert caught.value.code == 2
    assert "--max-line-bytes: must be > 0, got 0" in capsys.readouterr().err


@pytest.fixture
def huge_line(tmp_path: Path) -> Iterator[Path]:
    """One valid 200 MB chat example on one line; deleted afterwards, the disk is shared."""
    path = write_huge_line(tmp_path / "huge.jsonl", 200 * MB)
    yield path
    path.unlink()


@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model"])
def test_a_200_mb_line_is_refused_in_bounded_memory(
    huge_line: Path, tiny_model_dir: Path, tmp_path: Path, with_model: bool
) -> None:
    args = ["validate-data", str(huge_line)] + (["--model", str(tiny_model_dir)] if with_model else [])
    measured = run_cli(args, tmp_path, timeout=120)
    assert measured.returncode == 1
    assert measured.stderr.splitlines() == [
        _too_long(huge_line, 1, line_length(huge_line), DEFAULT_MAX_LINE_BYTES),
        f"1 problem on 1 line; {huge_line} cannot be used for training",
    ]
    # Before: the whole 24 GB of the machine (and "OK" without --model).
    assert measured.peak_rss_bytes < 1024 * MB


def test_a_line_near_the_cap_is_tokenized_only_as_far_as_needed(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = write_huge_line(tmp_path / "near.jsonl", DEFAULT_MAX_LINE_BYTES - 200)
    assert line_length(path) <= DEFAULT_MAX_LINE_BYTES
    args = ["validate-data", str(path), "--model", str(tiny_model_dir), "--max-seq-length", "512"]
    measured = run_cli(args, tmp_path, timeout=120)
    assert measured.returncode == 0, measured.stderr
    out = measured.stdout.splitlines()
    assert out[0] == f"{path}: OK, 1 example (chat format)"
    assert "  1 example with more than 2048 tokens counted only that far: these figures are lower bounds" in out
    assert any(line.startswith("warning: 1 example longer than max_seq_length 512, on lines 1;") for line in out)
    # Tokenizing all 800,000 tokens took 2.9 s and about 540 MB more; the process is mostly its imports.
    assert measured.peak_rss_bytes < 1024 * MB


def test_line_cap_default_is_the_job_specs_default() -> None:
    from tuneloom.api import DatasetSpec

    assert DatasetSpec(train="t.jsonl").maxLineBytes == DEFAULT_MAX_LINE_BYTES == 4 * 1024 * 1024


def test_preference_pairs_are_checked_line_by_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def pair(messages: object, preferred: object, non_preferred: object) -> dict:
        return {"input": {"messages": messages}, "preferred_output": preferred, "non_preferred_output": non_preferred}

    user = [{"role": "user", "content": "Say hi"}]

    def answer(text: str, role: str = "assistant") -> list[dict]:
        return [{"role": role, "content": text}]

    good = pair(user, answer("Hello there!"), answer("no."))
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            good,
            pair([*user, {"role": "assistant", "content": "x"}], answer("Same"), answer(" Same ")),
            pair([], [], answer("x", role="user")),
            {"input": "hi"},
        ],
    )
    assert main(["validate-data", str(path), "--format", "preference"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"{path}:2: input.messages[1].role: the input ends with the assistant's turn" in err[0]
    identical = "non_preferred_output[0].content: identical to preferred_output; a pair needs two answers"
    assert err[1] == f"{path}:2: {identical}"
    assert f"{path}:3: input.messages: empty; the answers need a prompt" in err
    assert f"{path}:3: preferred_output: must be an array of exactly one assistant message, got 0 messages" in err
    assert f"{path}:3: non_preferred_output[0].role: must be 'assistant', got 'user'" in err
    assert err[-1].endswith(f"problems on 3 lines; {path} cannot be used for training")
    ok = write_jsonl(tmp_path / "ok.jsonl", [good])
    assert main(["validate-data", str(ok), "--format", "preference"]) == 0
    assert f"{ok}: OK, 1 pair: 2 sequences, input + each answer (preference format)" in capsys.readouterr().out


@pytest.mark.parametrize("chunk", [1, 5, 64, 10_000])
def test_spans_cut_as_the_file_arrives_find_what_one_check_of_the_file_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Blank lines (some only spaces) just before and after span boundaries, bad lines, a long line,
    a byte order mark and trailing blank lines, fed in chunks of every size (a newline at a chunk's
    end, a cut in the next chunk's first byte): the same problems on the same lines."""
    monkeypatch.setattr(dataspans, "MIN_SPAN_BYTES", 64)
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    lines = []
    for i in range(60):
        lines.append(good if i % 7 else '{"messages": [{"role": "robot", "content": "hi"}]}')
        lines += [""] * (i % 3) + ["   "] * (i % 5 == 0) + [" " + good] * (i % 11 == 0)
    lines += ["x" * 300, good, "", "  ", ""]
    path = tmp_path / "d.jsonl"
    content = b"\xef\xbb\xbf" + "\n".join(lines).encode()
    path.write_bytes(content)

    cutter = dataspans.SpanCutter()
    parts = [span for start in range(0, len(content), chunk) for span in cutter.feed(content[start : start + chunk])]
    parts.append(cutter.finish())
    whole = list(iter_checked(path, max_line_bytes=200))
    side_by_side = [item for span in parts for item in iter_checked(path, max_line_bytes=200, span=span)]
    assert len(parts) > 10
    assert [span.start for span in parts[1:]] == [span.end for span in parts[:-1]]
    for span in parts[1:]:
        assert content[span.start : span.start + 1] not in b" \n"
        assert span.first_line == content[: span.start].count(b"\n") + 1
        assert span.start - (parts[parts.index(span) - 1].start) >= 64
    assert [str(item) if isinstance(item, Problem) else item.line for item in side_by_side] == [
        str(item) if isinstance(item, Problem) else item.line for item in whole
    ]
    assert any(isinstance(item, Problem) and "blank line" in item.message for item in whole)
