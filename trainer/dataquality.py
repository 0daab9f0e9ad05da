"""What is wrong with a dataset that no schema check can see, found before any model is loaded.

- leakage: held-out examples that repeat a training example, exactly or nearly;
- near-duplicates inside the training data, grouped;
- conflicts: one prompt with different answers;
- too little data: under MIN_EXAMPLES training examples, or a held-out split under MIN_HELD_OUT;
- answers that barely vary (one answer for DOMINANT_ANSWER_SHARE of the examples or more), and
  for short, label-like answers the label distribution.

Texts (user and assistant turns; system messages are left out) are compared after normalising:
Unicode NFKC, lower case, punctuation dropped, whitespace collapsed. Two examples are
near-duplicates when the Jaccard similarity of their word 3-gram shingles is at least
NEAR_DUPLICATE_JACCARD. Candidates come from an inverted index of shingles; shingles found in more
than a few percent of examples (stock phrases) do not propose candidates, so a pair is found when
it shares at least one less common shingle, which any real near-copy does.
Standard library only: `tuneloom validate-data` runs without torch.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tuneloom.trainer.datafile import Example

NEAR_DUPLICATE_JACCARD = 0.8
SHINGLE_WORDS = 3
MIN_EXAMPLES = 100
MIN_HELD_OUT = 10
DOMINANT_ANSWER_SHARE = 0.9
# Answers this short (in words) with few distinct values are labels: their distribution is shown.
LABEL_MAX_WORDS = 3
LABEL_MAX_DISTINCT = 20
MAX_LISTED = 10  # findings of one kind listed before "... and N more"

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class Finding:
    """One finding: `kind` is stable for scripts, `message` is for people and names the lines. A
    note informs (the label distribution); everything else is a warning, an error under --strict."""

    kind: str  # leakage | near_duplicates | conflicting_answers | too_few_examples | small_held_out | uniform_answers
    message: str  # | label_distribution (a note)
    note: bool = False


@dataclass(frozen=True)
class _Text:
    line: int
    prompt: str
    answer: str

    @property
    def whole(self) -> str:
        return f"{self.prompt}\n{self.answer}"


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def _texts(examples: Sequence[Example]) -> list[_Text]:
    """Each example as (prompt, answer): the answer is its assistant turns, the prompt its user turns.
    System messages are left out: one shared by every example would make them all look alike."""
    out = []
    for example in examples:
        if example.messages:
            prompt = " ".join(m.content for m in example.messages if m.role == "user")
            answer = example.preferred or " ".join(m.content for m in example.messages if m.role == "assistant")
        else:
            prompt, answer = example.prompt, example.completion
        out.append(_Text(example.line, normalise(prompt), normalise(answer)))
    return out


def _shingles(text: str) -> frozenset[str]:
    words = text.split()
    if len(words) <= SHINGLE_WORDS:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def similar_pairs(
    queries: Sequence[frozenset[str]], corpus: Sequence[frozenset[str]], *, same: bool
) -> list[tuple[int, int, float]]:
    """(query index, corpus index, Jaccard) of every pair at or above NEAR_DUPLICATE_JACCARD.

    With `same`, queries and corpus are one list and each pair is reported once (i < j)."""
    index: dict[str, list[int]] = {}
    for number, shingles in enumerate(corpus):
        for shingle in shingles:
            index.setdefault(shingle, []).append(number)
    common = max(50, len(corpus) // 20)
    found = []
    for i, shingles in enumerate(queries):
        candidates = {j for s in shingles if len(index.get(s, ())) <= common for j in index.get(s, ())}
        for j in sorted(candidates):
            if same and j <= i:
                continue
            score = jaccard(shingles, corpus[j])
            if score >= NEAR_DUPLICATE_JACCARD:
                found.append((i, j, score))
    return found


def _listed(items: Sequence[str]) -> list[str]:
    shown = [f"  {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        shown.append(f"  ... and {len(items) - MAX_LISTED} more")
    return shown


def _leakage(train: list[_Text], held_out: list[_Text]) -> Finding | None:
    pairs = similar_pairs([_shingles(t.whole) for t in held_out], [_shingles(t.whole) for t in train], same=False)
    if not pairs:
        return None
    rows = []
    for i, j, score in pairs:
        how = "exact" if held_out[i].whole == train[j].whole else f"near, Jaccard {score:.2f}"
        rows.append(f"validation line {held_out[i].line} ~ train line {train[j].line} ({how})")
    leaked = len({i for i, _, _ in pairs})
    head = (
        f"leakage: {leaked} held-out example(s) repeat training examples, so held-out metrics overstate "
        "what the adapter learned; remove them from one of the files"
    )
    return Finding("leakage", "\n".join([head, *_listed(rows)]))


def _groups(pairs: list[tuple[int, int, float]], size: int) -> list[list[int]]:
    """Connected groups of the pairs (union-find), each sorted, largest first."""
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i, _, _ in pairs:
        members.setdefault(root(i), [])
    for i in range(size):
        if root(i) in members:
            members[root(i)].append(i)
    return sorted((sorted(group) for group in members.values()), key=lambda g: (-len(g), g[0]))


def _near_duplicates(train: list[_Text]) -> Finding | None:
    shingles = [_shingles(t.whole) for t in train]
    # Exact copies are reported by the summary's duplicate check already.
    pairs = [(i, j, s) for i, j, s in similar_pairs(shingles, shingles, same=True) if train[i].whole != train[j].whole]
    if not pairs:
        return None
    groups = _groups(pairs, len(train))
    rows = [f"lines {', '.join(str(train[i].line) for i in group)}" for group in groups]
    head = (
        f"near-duplicates: {len(groups)} group(s) of training examples that are nearly the same "
        f"(Jaccard >= {NEAR_DUPLICATE_JACCARD}); they weigh more than the rest: keep one of each"
    )
    return Finding("near_duplicates", "\n".join([head, *_listed(rows)]))


def _conflicts(train: list[_Text]) -> Finding | None:
    answers: dict[str, dict[str, list[int]]] = {}
    for text in train:
        answers.setdefault(text.prompt, {}).setdefault(text.answer, []).append(text.line)
    rows = []
    for by_answer in answers.values():
        if len(by_answer) > 1:
            lines = sorted(line for group in by_answer.values() for line in group)
            rows.append(f"lines {', '.join(map(str, lines))}: one prompt, {len(by_answer)} different answers")
    if not rows:
        return None
    head = (
        f"conflicting answers: {len(rows)} prompt(s) appear with different answers, which teaches the "
        "model to pick one at random; make them agree or drop the ones you do not want"
    )
    return Finding("conflicting_answers", "\n".join([head, *_listed(rows)]))


def _answer_spread(train: list[_Text]) -> list[Finding]:
    counts = Counter(text.answer for text in train)
    if not counts:
        return []
    findings = []
    answer, most = counts.most_common(1)[0]
    if len(train) > 1 and most / len(train) >= DOMINANT_ANSWER_SHARE:
        findings.append(
            Finding(
                "uniform_answers",
                f"uniform answers: {most} of {len(train)} examples ({most / len(train):.0%}) have the answer "
                f"{answer[:60]!r}; the model will learn to give it whatever is asked",
            )
        )
    if all(len(a.split()) <= LABEL_MAX_WORDS for a in counts) and len(counts) <= LABEL_MAX_DISTINCT:
        shares = ", ".join(f"{label!r} {count / len(train):.0%}" for label, count in counts.most_common())
        findings.append(Finding("label_distribution", f"labels: the answers are labels: {shares}", note=True))
    return findings


def find_problems(
    train: Sequence[Example], held_out: Sequence[Example] = (), *, held_out_size: int | None = None
) -> list[Finding]:
    """Every finding, in the order a user should fix them. `held_out_size` is the size of a split
    the trainer will hold out when no held-out file is given."""
    train_texts, held_texts = _texts(train), _texts(held_out)
    findings = [f for f in (_leakage(train_texts, held_texts) if held_texts else None,) if f]
    findings += [f for f in (_near_duplicates(train_texts), _conflicts(train_texts)) if f]
    if len(train) < MIN_EXAMPLES:
        findings.append(
            Finding(
                "too_few_examples",
                f"too few examples: {len(train)} training examples; under {MIN_EXAMPLES} a style is learned "
                "unreliably: add examples, or expect to need more epochs",
            )
        )
    held = len(held_out) if held_out else held_out_size
    if held is not None and held < MIN_HELD_OUT:
        findings.append(
            Finding(
                "small_held_out",
                f"small held-out set: {held} example(s); under {MIN_HELD_OUT} the held-out metrics are noise: "
                "give a validation file or raise the validation split",
            )
        )
    return findings + _answer_spread(train_texts)
