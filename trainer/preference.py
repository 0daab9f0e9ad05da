"""Preference pairs for DPO: tokenised with the chat template, scored by the model, and the loss.

A pair is the input conversation with two answers. Each answer is encoded as its own conversation
(input + answer) by `tokenize.encode_example`, so the mask follows the base model's chat template;
only the final answer's tokens carry labels. A pair's two sequences sit side by side in one row,
and several pairs share a row with packing: position ids restart at each sequence, so none attends
to another (see `batching`), and the preferred and the other answer are scored in one forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneloom.api import DpoLoss
from tuneloom.trainer.batching import Batch, collate
from tuneloom.trainer.datafile import Example, as_sequences
from tuneloom.trainer.evaluate import base_weights
from tuneloom.trainer.modeling import REFERENCE_ADAPTER, TRAINED_ADAPTER, causal_lm, labelled_logits
from tuneloom.trainer.tokenize import EncodedExample, encode_example


@dataclass(frozen=True)
class EncodedPair:
    preferred: EncodedExample
    non_preferred: EncodedExample
    line: int = 0

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' ids, as a row holds them: what packing measures a pair by."""
        return self.preferred.input_ids + self.non_preferred.input_ids

    @property
    def truncated(self) -> bool:
        return self.preferred.truncated or self.non_preferred.truncated

    @property
    def num_trained_tokens(self) -> int:
        """The fewer answer tokens of its two sequences: a pair with either answer cut away compares nothing."""
        return min(self.preferred.num_trained_tokens, self.non_preferred.num_trained_tokens)


def encode_pair(tokenizer: Any, pair: Example, max_length: int | None = None) -> EncodedPair:
    """Both sequences of a pair, each at most max_length tokens. Assistant turns of the input are
    context, not answers: only the final answer of each sequence is labelled."""
    context = tuple(dataclasses.replace(m, weight=0) if m.role == "assistant" else m for m in pair.messages)
    preferred, non_preferred = as_sequences(dataclasses.replace(pair, messages=context))
    return EncodedPair(
        encode_example(tokenizer, preferred, max_length),
        encode_example(tokenizer, non_preferred, max_length),
        pair.line,
    )


@dataclass(frozen=True)
class PairBatch:
    """Rows of pairs. `sequence` says which sequence each token belongs to: 2k for the k-th pair's
    preferred answer, 2k + 1 for its other one, -1 for padding."""

    batch: Batch
    sequence: torch.Tensor  # [rows, length]
    pairs: int

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.batch.to(device), self.sequence.to(device), self.pairs)


def collate_pairs(pairs: Sequence[EncodedPair], rows: Sequence[Sequence[int]]) -> PairBatch:
    """The given rows of pair indices as one batch, each pair's two sequences next to each other."""
    sequences: list[EncodedExample] = []
    sequence_rows: list[list[int]] = []
    for row in rows:
        sequence_rows.append([])
        for index in row:
            sequence_rows[-1] += [len(sequences), len(sequences) + 1]
            sequences += [pairs[index].preferred, pairs[index].non_preferred]
    batch = collate(sequences, sequence_rows)
    sequence = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    for r, row in enumerate(sequence_rows):
        cursor = 0
        for index in row:
            size = len(sequences[index].input_ids)
            sequence[r, cursor : cursor + size] = index
            cursor += size
    return PairBatch(batch, sequence, len(sequences) // 2)


@dataclass(frozen=True)
class SequenceLogProbs:
    """Per sequence (in `PairBatch.sequence` order): the log-probability of its answer tokens,
    summed, and how many there are."""

    sums: torch.Tensor
    counts: torch.Tensor

    def means(self) -> torch.Tensor:
        """Length-normalised: the mean log-probability per answer token."""
        return self.sums / self.counts.clamp_min(1)


def sequence_log_probs(decoder: nn.Module, head: nn.Module, pairs: PairBatch) -> SequenceLogProbs:
    """The model's log-probabilities of each sequence's answer tokens (teacher-forced)."""
    logits, wanted, mask = labelled_logits(decoder, head, pairs.batch)
    token_log_probs = -nn.functional.cross_entropy(logits, wanted, reduction="none")
    owner = pairs.sequence[:, 1:][mask]  # labels are unshifted: target t+1 is predicted at t
    count = 2 * pairs.pairs
    sums = torch.zeros(count, dtype=token_log_probs.dtype, device=logits.device).index_add(0, owner, token_log_probs)
    return SequenceLogProbs(sums, torch.bincount(owner, minlength=count))


@dataclass(frozen=True)
class PairLosses:
    """Per pair: the loss, and the implicit rewards beta * log(policy / reference) of each answer."""

    losses: torch.Tensor
    preferred_rewards: torch.Tensor
    non_preferred_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.preferred_rewards - self.non_preferred_rewards


def pair_losses(policy: SequenceLogProbs, reference: SequenceLogProbs, *, beta: float, loss: DpoLoss) -> PairLosses:
    """DPO (sigmoid): -log sigmoid(beta * h); IPO: (h - 1 / (2 beta))^2, where h is the preferred
    answer's log-ratio of policy to reference minus the other's. DPO sums log-probabilities over
    answer tokens; IPO averages them, as its authors' implementation does, so long answers do not
    dominate its squared loss."""
    ipo = loss is DpoLoss.ipo
    policy_scores, reference_scores = (policy.means(), reference.means()) if ipo else (policy.sums, reference.sums)
    ratios = policy_scores - reference_scores
    preferred, non_preferred = ratios[0::2], ratios[1::2]
    difference = preferred - non_preferred
    losses = (difference - 1 / (2 * beta)) ** 2 if ipo else -nn.functional.logsigmoid(beta * difference)
    return PairLosses(losses, beta * preferred.detach(), beta * non_preferred.detach())


def preference_accuracy(log_probs: SequenceLogProbs) -> torch.Tensor:
    """Per pair: 1 where the preferred answer has the higher mean log-probability per answer token."""
    means = log_probs.means()
    return (means[0::2] > means[1::2]).float()


@contextlib.contextmanager
def reference_policy(model: nn.Module) -> Iterator[None]:
    """The reference policy's weights for the duration: the starting adapter (dpo.initAdapter),
    loaded frozen beside the trained one, or else the base model (the adapter off); in eval mode, so
    the reference gets no dropout."""
    was_training = model.training
    model.eval()
    try:
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                model.set_adapter(TRAINED_ADAPTER)
        else:
            with base_weights(model):
                yield
    finally:
        model.train(was_training)


class DpoObjective(nn.Module):
    """The DPO (or IPO) loss of a LoRA model against the reference policy: itself with the adapter
    switched off, so no second copy of the weights is held, or the frozen starting adapter. Called
    on a batch of pairs it gives sums over them: (loss, pairs whose preferred answer got the higher
    reward, pairs, reward margin, pairs whose preferred answer the model finds likelier per token)."""

    def __init__(self, model: nn.Module, *, beta: float, loss: DpoLoss):
        super().__init__()
        self.model = model
        lm = causal_lm(model)
        self.decoder, self.head = lm.get_decoder(), lm.get_output_embeddings()
        self.beta, self.loss = beta, loss

    def forward(self, pairs: PairBatch) -> tuple[torch.Tensor, ...]:
        # The reference first: switching adapters sets which weights require gradients.
        with torch.no_grad(), reference_policy(self.model):
            reference = sequence_log_probs(self.decoder, self.head, pairs)
        policy = sequence_log_probs(self.decoder, self.head, pairs)
        result = pair_losses(policy, reference, beta=self.beta, loss=self.loss)
        margins = result.margins
        return (
            result.losses.sum(),
            (margins > 0).sum(),
            torch.tensor(pairs.pairs),
            margins.sum(),
            preference_accuracy(policy).sum(),
        )
