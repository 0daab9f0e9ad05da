"""DPO's pieces against what they should be: masks against SmolLM2's chat template, log-probabilities
against a plain forward pass, and the losses against their formulas written out here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tuneloom.api import DpoLoss
from tuneloom.trainer.datafile import Example, Message
from tuneloom.trainer.modeling import causal_lm
from tuneloom.trainer.preference import (
    SequenceLogProbs,
    collate_pairs,
    encode_pair,
    pair_losses,
    preference_accuracy,
    sequence_log_probs,
)
from tuneloom.trainer.tokenize import IGNORE_INDEX


def _pair(line: int, *turns: tuple[str, str], preferred: str, non_preferred: str) -> Example:
    messages = tuple(Message(role, content) for role, content in turns)
    return Example(line=line, messages=messages, preferred=preferred, non_preferred=non_preferred)


PAIRS = [
    _pair(
        3,
        ("system", "Be brief."),
        ("user", "Capital of France?"),
        preferred="Paris.",
        non_preferred="I think it might be Lyon, or maybe Paris.",
    ),
    # An assistant turn in the input is context, never an answer.
    _pair(
        4,
        ("user", "Hi"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Say yes."),
        preferred="Yes.",
        non_preferred="No.",
    ),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _render(tokenizer, messages: list[Message], *, generation_prompt: bool = False) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)


def _labelled(encoded) -> list[int]:
    return [label for label in encoded.labels if label != IGNORE_INDEX]


def test_only_each_final_answer_carries_labels(tokenizer) -> None:
    pair = PAIRS[1]
    encoded = encode_pair(tokenizer, pair)
    for answer, sequence in ((pair.preferred, encoded.preferred), (pair.non_preferred, encoded.non_preferred)):
        rendered = _render(tokenizer, [*pair.messages, Message("assistant", answer)])
        assert tokenizer.decode(sequence.input_ids) == rendered  # the template's rendering, token for token
        # The input's own assistant turn is context: only the answer and its end of turn are labelled.
        assert tokenizer.decode(_labelled(sequence)) == f"{answer}<|im_end|>\n"
        prompt = _render(tokenizer, list(pair.messages), generation_prompt=True)
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert all(label == IGNORE_INDEX for label in sequence.labels[:start])
        assert sequence.labels[start:] == sequence.input_ids[start:]
    assert encoded.line == 4


def test_pairs_share_rows_without_seeing_each_other(tokenizer) -> None:
    encoded = [encode_pair(tokenizer, pair) for pair in PAIRS]
    batch = collate_pairs(encoded, [[1, 0]])
    lengths = [len(s.input_ids) for p in (encoded[1], encoded[0]) for s in (p.preferred, p.non_preferred)]
    assert batch.pairs == 2 and batch.batch.input_ids.shape == (1, sum(lengths))
    expected_owner = [owner for owner, size in enumerate(lengths) for _ in range(size)]
    assert batch.sequence[0].tolist() == expected_owner
    # Position ids restart at every sequence: each is its own block of the causal mask.
    restarts = [i for i, position in enumerate(batch.batch.position_ids[0].tolist()) if position == 0]
    assert restarts == [sum(lengths[:k]) for k in range(4)]


def _answer_log_prob(model, tokenizer, pair: Example, answer: str) -> float:
    """Written out: log p(answer tokens | prompt), from a plain forward pass of the sequence alone."""
    prompt = _render(tokenizer, list(pair.messages), generation_prompt=True)
    full = _render(tokenizer, [*pair.messages, Message("assistant", answer)])
    ids = tokenizer(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, start - 1 : -1].double()
    return float(torch.log_softmax(logits, dim=-1).gather(1, ids[0, start:, None]).sum())


def test_sequence_log_probs_and_losses_match_the_formulas(tiny_model_dir: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    encoded = [encode_pair(tokenizer, pair) for pair in PAIRS]
    batch = collate_pairs(encoded, [[0, 1]])  # both pairs packed in one row
    lm = causal_lm(model)
    with torch.no_grad():
        policy = sequence_log_probs(lm.get_decoder(), lm.get_output_embeddings(), batch)
    expected = [_answer_log_prob(model, tokenizer, p, a) for p in PAIRS for a in (p.preferred, p.non_preferred)]
    assert policy.sums.tolist() == pytest.approx(expected, abs=1e-3)
    counts = [len(_labelled(s)) for p in encoded for s in (p.preferred, p.non_preferred)]
    assert policy.counts.tolist() == counts

    reference = SequenceLogProbs(torch.tensor([-30.0, -40.0, -5.0, -4.0]), policy.counts)
    beta = 0.1
    sigmoid = pair_losses(policy, reference, beta=beta, loss=DpoLoss.sigmoid)
    ipo = pair_losses(policy, reference, beta=beta, loss=DpoLoss.ipo)
    for k in range(2):
        chosen, rejected = (
            expected[2 * k] - reference.sums[2 * k].item(),
            expected[2 * k + 1] - reference.sums[2 * k + 1].item(),
        )
        h = chosen - rejected
        assert sigmoid.losses[k].item() == pytest.approx(math.log(1 + math.exp(-beta * h)), rel=1e-4)
        assert sigmoid.margins[k].item() == pytest.approx(beta * h, rel=1e-4)
        mean_h = chosen / counts[2 * k] - rejected / counts[2 * k + 1]
        assert ipo.losses[k].item() == pytest.approx((mean_h - 1 / (2 * beta)) ** 2, rel=1e-4)


def test_losses_on_hand_made_numbers() -> None:
    counts = torch.tensor([2, 4])
    policy = SequenceLogProbs(torch.tensor([-2.0, -8.0]), counts)
    reference = SequenceLogProbs(torch.tensor([-3.0, -6.0]), counts)
    # h = (-2 - -3) - (-8 - -6) = 3 summed; (-1 - -1.5) - (-2 - -1.5) = 1 per token.
    dpo = pair_losses(policy, reference, beta=0.25, loss=DpoLoss.sigmoid)
    assert dpo.losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))))
    assert (dpo.preferred_rewards.item(), dpo.non_preferred_rewards.item()) == pytest.approx((0.25, -0.5))
    ipo = pair_losses(policy, reference, beta=0.25, loss=DpoLoss.ipo)
    assert ipo.losses.item() == pytest.approx((1 - 1 / (2 * 0.25)) ** 2)
    # Preference accuracy is length-normalised: -1 per token beats -2 per token.
    assert preference_accuracy(policy).tolist() == [1.0]
    assert preference_accuracy(SequenceLogProbs(torch.tensor([-6.0, -8.0]), counts)).tolist() == [0.0]
