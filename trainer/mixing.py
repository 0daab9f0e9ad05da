"""Blending other data into training (`spec.dataset.mix`), such as general chat examples that keep
what the base model could do (standard library only).

With N training examples of the job's own and mix fractions f1, f2, ... (summing to F < 1), the
training set grows to T = N / (1 - F) examples, of which round(fi × T) come from mix file i: each
file makes up its fraction of what is trained on. A file's examples are drawn in a seeded random
order without replacement; a file with fewer than needed is drawn again, in a new order, until
there are enough.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tuneloom.trainer.datafile import Example


def mixed_counts(own: int, fractions: Sequence[float]) -> list[int]:
    """How many examples each mix file adds to `own` training examples."""
    total = own / (1.0 - sum(fractions))
    return [round(fraction * total) for fraction in fractions]


def draw(examples: Sequence[Example], count: int, rng: random.Random) -> list[Example]:
    """`count` examples in a random order, each once per pass over the file."""
    drawn: list[Example] = []
    while examples and len(drawn) < count:
        order = list(examples)
        rng.shuffle(order)
        drawn += order[: count - len(drawn)]
    return drawn
