"""Grouping encoded examples into rows and micro-batches.

Every row carries position ids that restart at 0 for each example and no attention mask.
transformers reads restarting position ids as packed sequences and builds a block-diagonal causal
mask, so packed examples never attend to each other. Rows are right-padded; padding gets its own
position run and no labels, so it neither sees nor is seen by real tokens' losses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneloom.trainer.tokenize import IGNORE_INDEX, EncodedExample


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # [rows, length], IGNORE_INDEX where no loss

    @property
    def num_trained_tokens(self) -> int:
        # labels are unshifted: the first token of each example is never a target
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        """Real tokens, padding excluded: what tokens/s counts."""
        return int((self.input_ids != PAD_MARK).sum())

    @property
    def num_padding(self) -> int:
        return self.input_ids.numel() - self.num_tokens

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device).clamp_min(0),
            self.position_ids.to(device),
            self.labels.to(device),
        )


# Padding is marked with -1 while a batch is on the host so it can be counted; `to()` maps it to a
# real token id (0), whose outputs are never used.
PAD_MARK = -1


def pack_rows(examples: Sequence[EncodedExample], max_length: int) -> list[list[int]]:
    """Indices of the examples in each row, by first-fit decreasing: rows end up nearly full."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        size = len(examples[index].input_ids)
        for row, room in enumerate(free):
            if size <= room:
                rows[row].append(index)
                free[row] -= size
                break
        else:
            rows.append([index])
            free.append(max_length - size)
    return rows


def single_rows(examples: Sequence[EncodedExample]) -> list[list[int]]:
    return [[index] for index in range(len(examples))]


def collate(examples: Sequence[EncodedExample], rows: Sequence[Sequence[int]]) -> Batch:
    """Right-padded tensors for the given rows (each row a list of example indices)."""
    length = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_MARK, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        cursor = 0
        for index in row:
            example = examples[index]
            size = len(example.input_ids)
            input_ids[r, cursor : cursor + size] = torch.tensor(example.input_ids)
            labels[r, cursor : cursor + size] = torch.tensor(example.labels)
            # The first token of each example must not be predicted from the previous example.
            labels[r, cursor] = IGNORE_INDEX
            position_ids[r, cursor : cursor + size] = torch.arange(size)
            cursor += size
        position_ids[r, cursor:] = torch.arange(length - cursor)
    return Batch(input_ids, position_ids, labels)


def within_token_budget(
    examples: Sequence[EncodedExample], rows: Sequence[Sequence[int]], max_tokens: int
) -> list[Sequence[Sequence[int]]]:
    """The rows of one micro-batch cut into consecutive passes of at most `max_tokens` slots each
    (rows times the longest row, padding included: what activations take), one row at least.

    Activations grow with the tokens in one forward pass, so this bounds peak memory; the loop sums
    the passes' gradients with the same per-token weight, so the update does not change. 0: one pass.
    """
    if not max_tokens:
        return [rows]
    passes: list[Sequence[Sequence[int]]] = []
    current: list[Sequence[int]] = []
    longest = 0
    for row in rows:
        length = sum(len(examples[i].input_ids) for i in row)
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            passes.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    passes.append(current)
    return passes


def epoch_batches(
    rows: Sequence[Sequence[int]], row_lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int
) -> list[list[Sequence[int]]]:
    """The rows of one epoch, shuffled reproducibly, cut into micro-batches.

    Within windows of 32 micro-batches rows are sorted by length, so unpacked batches hold rows of
    similar length and pad little, while the order across windows stays random. Seeding by epoch
    lets a resumed run rebuild exactly the batches it would have seen.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = batch_size * 32
    batches: list[list[Sequence[int]]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda r: row_lengths[r])
        batches.extend([rows[r] for r in chunk[i : i + batch_size]] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
