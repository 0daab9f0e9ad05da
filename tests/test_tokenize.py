"""Loss masks at token level against SmolLM2's real chat template, and packing boundaries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneloom.trainer.batching import PAD_MARK, collate, epoch_batches, pack_rows, within_token_budget
from tuneloom.trainer.datafile import Example, Message
from tuneloom.trainer.modeling import MaskedTokenLoss
from tuneloom.trainer.tokenize import IGNORE_INDEX, EncodedExample, encode_example, few_shot_prompt, prompt_text


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _labelled_runs(tokenizer, encoded: EncodedExample) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_assistant_replies_with_weight_carry_loss(tokenizer) -> None:
    example = Example(
        line=7,
        messages=(
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "Again"),
            Message("assistant", "Not this one", weight=0),
            Message("user", "Last"),
            Message("assistant", "Bye."),
        ),
    )
    encoded = encode_example(tokenizer, example)
    assert _labelled_runs(tokenizer, encoded) == ["Hello!<|im_end|>\n", "Bye.<|im_end|>\n"]
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    # The ids are exactly the template's rendering: nothing added, nothing lost.
    assert tokenizer.decode(encoded.input_ids) == rendered
    assert encoded.line == 7


def test_prompt_ends_with_generation_prompt(tokenizer) -> None:
    example = Example(line=1, messages=(Message("user", "Hi"), Message("assistant", "Hello!")))
    assert prompt_text(tokenizer, example).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_completion_format_learns_completion_and_eos(tokenizer) -> None:
    example = Example(line=1, prompt="Translate: cat ->", completion=" chat")
    encoded = encode_example(tokenizer, example)
    assert _labelled_runs(tokenizer, encoded) == [" chat" + tokenizer.eos_token]


def test_truncation(tokenizer) -> None:
    example = Example(line=1, messages=(Message("user", "word " * 50), Message("assistant", "ok")))
    assert len(encode_example(tokenizer, example, max_length=16).input_ids) == 16


LONG_EXAMPLES = {
    # Far more text than max_length * CHARS_PER_TOKEN: only a prefix is tokenized.
    "words": Example(line=1, messages=(Message("user", "Summarise."), Message("assistant", "word " * 20_000))),
    # "-" * 64 is one token: 32 characters a token, so the first cut holds too few and doubles.
    "dashes": Example(line=2, messages=(Message("user", "Draw."), Message("assistant", ("-" * 64 + " ") * 2_000))),
    "completion": Example(line=3, prompt="Count: ", completion="one two three " * 5_000),
    "short": Example(line=4, messages=(Message("user", "Hi"), Message("assistant", "Hello there."))),
}


@pytest.mark.parametrize("name", LONG_EXAMPLES)
def test_bounded_encoding_keeps_exactly_the_whole_encodings_first_tokens(tokenizer, name: str) -> None:
    example = LONG_EXAMPLES[name]
    whole = encode_example(tokenizer, example)
    assert not whole.truncated
    for max_length in (8, 100, 1000, len(whole.input_ids) - 1, len(whole.input_ids), len(whole.input_ids) + 1):
        if max_length <= 0:
            continue
        cut = encode_example(tokenizer, example, max_length)
        assert cut.input_ids == whole.input_ids[:max_length], (name, max_length)
        assert cut.labels == whole.labels[:max_length], (name, max_length)
        assert cut.truncated == (len(whole.input_ids) > max_length), (name, max_length)


@pytest.mark.timeout(60)
def test_thousands_of_replies_cost_what_max_length_needs(tokenizer) -> None:
    """Each reply's span renders a prefix of the conversation: over 5,000 replies that would be
    quadratic. Replies past the cut are never rendered on their own."""
    turns = [Message(role, f"{role} turn {i}") for i in range(5_000) for role in ("user", "assistant")]
    encoded = encode_example(tokenizer, Example(line=1, messages=tuple(turns)), 64)
    assert len(encoded.input_ids) == 64 and encoded.truncated
    assert _labelled_runs(tokenizer, encoded)[0] == "assistant turn 0<|im_end|>\n"


def _encoded(lengths: list[int]) -> list[EncodedExample]:
    return [EncodedExample(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n))) for n in lengths]


def test_first_fit_decreasing_fills_rows() -> None:
    examples = _encoded([60, 50, 40, 30, 20, 10])
    rows = pack_rows(examples, 64)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(len(examples[i].input_ids) for i in row) <= 64 for row in rows)
    assert len(rows) == 4  # 60 | 50+10 | 40+20 | 30


def test_collate_restarts_positions_and_masks_boundaries() -> None:
    examples = _encoded([3, 2])
    batch = collate(examples, [[0, 1], [1]])
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # the first token of the second example is never predicted from the first example
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 4, 5, IGNORE_INDEX, 4]
    assert batch.input_ids[1].tolist()[2:] == [PAD_MARK] * 3
    assert batch.labels[1].tolist()[2:] == [IGNORE_INDEX] * 3
    assert batch.num_tokens == 7 and batch.num_padding == 3


def test_epoch_order_is_reproducible_and_complete() -> None:
    rows = [[i] for i in range(100)]
    lengths = list(range(100))
    first = epoch_batches(rows, lengths, 8, seed=1, epoch=0)
    assert first == epoch_batches(rows, lengths, 8, seed=1, epoch=0)
    assert first != epoch_batches(rows, lengths, 8, seed=1, epoch=1)
    assert sorted(r[0] for batch in first for r in batch) == list(range(100))


def test_token_budget_cuts_a_micro_batch_into_passes_of_whole_rows() -> None:
    examples = _encoded([60, 50, 40, 30, 20, 10])
    rows = [[0], [1, 5], [2, 4], [3]]  # 60, 60, 60, 30 tokens
    assert within_token_budget(examples, rows, 0) == [rows]
    assert within_token_budget(examples, rows, 130) == [[[0], [1, 5]], [[2, 4], [3]]]
    # a row longer than the budget still runs, alone
    assert within_token_budget(examples, rows, 10) == [[row] for row in rows]


def test_passes_within_a_token_budget_give_the_gradient_of_one_pass(tokenizer, tiny_model_dir: Path) -> None:
    """The lever changes peak memory only: summed over the passes, loss and gradients are those of the
    whole micro-batch in one forward and backward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    loss_fn = MaskedTokenLoss(model)
    replies = ["Once upon a time.", "4", "The capital of France is Paris.", "Blue.", "Yes, gladly."]
    examples = [
        encode_example(tokenizer, Example(n, (Message("user", f"Question {n}?"), Message("assistant", reply))))
        for n, reply in enumerate(replies)
    ]
    rows = [[0, 1], [2], [3, 4]]

    def gradients(passes: list) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for rows_of_pass in passes:
            loss_sum, _, _ = loss_fn(collate(examples, rows_of_pass).to("cpu"))
            loss_sum.backward()
            total += loss_sum.item()
        return total, [p.grad.clone() for p in model.parameters()]

    budget = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    passes = within_token_budget(examples, rows, budget)
    assert len(passes) == 3
    one_loss, one_grads = gradients([rows])
    split_loss, split_grads = gradients(passes)
    assert split_loss == pytest.approx(one_loss, rel=1e-5)
    # Summation order differs between the two, so compare each tensor as a whole: float32 rounding,
    # not a changed update.
    for whole, split in zip(one_grads, split_grads, strict=True):
        assert torch.linalg.vector_norm(split - whole) <= 1e-5 * torch.linalg.vector_norm(whole) + 1e-8


def test_packed_examples_do_not_attend_to_each_other(tokenizer, tiny_model_dir: Path) -> None:
    """Loss and logits of an example are the same alone and packed behind another one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()  # eval() keeps use_cache on: the loss module must turn it off itself
    first = encode_example(
        tokenizer,
        Example(1, (Message("user", "Tell me a story."), Message("assistant", "Once upon a time."))),
    )
    second = encode_example(tokenizer, Example(2, (Message("user", "2+2?"), Message("assistant", "4"))))
    loss_fn = MaskedTokenLoss(model)
    with torch.no_grad():
        alone, _, alone_count = loss_fn(collate([second], [[0]]).to("cpu"))
        packed, _, packed_count = loss_fn(collate([first, second], [[0, 1]]).to("cpu"))
        first_alone, _, _ = loss_fn(collate([first], [[0]]).to("cpu"))
        packed_batch = collate([first, second], [[0, 1]]).to("cpu")
        logits_packed = model(
            input_ids=packed_batch.input_ids, position_ids=packed_batch.position_ids, use_cache=False
        ).logits
        single = collate([second], [[0]]).to("cpu")
        logits_alone = model(input_ids=single.input_ids, position_ids=single.position_ids, use_cache=False).logits
    offset = len(first.input_ids)
    torch.testing.assert_close(logits_packed[0, offset:], logits_alone[0], rtol=1e-4, atol=1e-4)
    assert packed_count == alone_count + (len([x for x in first.labels[1:] if x != IGNORE_INDEX]))
    torch.testing.assert_close(packed, alone + first_alone, rtol=1e-4, atol=1e-4)


def _ticket(line: int, question: str, answer: str) -> Example:
    return Example(
        line=line,
        messages=(Message("system", "Label it."), Message("user", question), Message("assistant", answer)),
    )


def test_few_shot_turns_come_between_the_system_message_and_the_question(tokenizer) -> None:
    shots = [_ticket(1, "Q1", "A1"), _ticket(2, "Q2", "A2")]
    prompt = few_shot_prompt(tokenizer, _ticket(9, "Q9", "A9"), shots)
    conversation = [
        {"role": "system", "content": "Label it."},
        *(
            {"role": role, "content": text}
            for q, a in (("Q1", "A1"), ("Q2", "A2"))
            for role, text in (("user", q), ("assistant", a))
        ),
        {"role": "user", "content": "Q9"},
    ]
    assert prompt == tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt.count("Label it.") == 1 and "A9" not in prompt
    assert few_shot_prompt(tokenizer, _ticket(9, "Q9", "A9"), []) == prompt_text(tokenizer, _ticket(9, "Q9", "A9"))


def test_few_shot_completions_are_prepended_to_the_prompt(tokenizer) -> None:
    shots = [Example(line=1, prompt="2+2=", completion="4"), Example(line=2, prompt="3+3=", completion="6")]
    assert few_shot_prompt(tokenizer, Example(line=5, prompt="1+1=", completion="2"), shots) == "2+2=4\n\n3+3=6\n\n1+1="


def test_shots_are_dropped_until_the_prompt_and_its_answer_fit(tokenizer) -> None:
    from tuneloom.api import GenerationMetric
    from tuneloom.trainer.evaluate import FewShotAnswers, HeldOutAnswers, draw_shots

    train = [_ticket(line, "word " * 20, "short") for line in range(1, 11)]
    question = _ticket(99, "Where is my parcel?", "shipping")
    shots = draw_shots(train, 3, seed=42)
    assert shots == draw_shots(train, 3, seed=42) and len(set(shots)) == 3 and set(shots) <= set(train)
    one_shot = len(tokenizer(few_shot_prompt(tokenizer, question, shots[:1]))["input_ids"])
    two_shots = len(tokenizer(few_shot_prompt(tokenizer, question, shots[:2]))["input_ids"])

    def fitted(max_seq_length: int) -> tuple[str, int]:
        held_out = HeldOutAnswers(
            None, tokenizer, [question], [GenerationMetric.exact_match], 8, max_seq_length, torch.device("cpu")
        )
        return FewShotAnswers(held_out, shots)._fitted(question)

    assert fitted(two_shots + 8) == (few_shot_prompt(tokenizer, question, shots[:2]), 1)
    assert fitted(one_shot + 8) == (few_shot_prompt(tokenizer, question, shots[:1]), 2)
    assert fitted(one_shot + 7) == (prompt_text(tokenizer, question), 3)
