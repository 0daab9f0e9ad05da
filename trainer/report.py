"""The report a person reads after a run: base model vs adapter on held-out prompts."""

from __future__ import annotations

from typing import Any

from tuneloom.registry import AdapterVersion

ANSWER_WIDTH = 72


def _cell(text: str, width: int = ANSWER_WIDTH) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 1] + "…"


def _marks(scores: dict[str, bool]) -> str:
    return "  ".join(f"{name} {'yes' if ok else 'no '}" for name, ok in scores.items())


def _value(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.3f}"


def format_samples(samples: list[dict[str, Any]]) -> str:
    """One block per held-out prompt: the expected answer, then each model's answer and scores."""
    lines = ["Held-out prompts: base model vs adapter", ""]
    for sample in samples:
        lines.append(f"line {sample['line']:<5} expected  {_cell(sample['reference'])}")
        lines.append(f"{'':11}base      {_cell(sample['base']):<{ANSWER_WIDTH}}  {_marks(sample['baseScores'])}")
        lines.append(f"{'':11}adapter   {_cell(sample['adapter']):<{ANSWER_WIDTH}}  {_marks(sample['adapterScores'])}")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    base, tuned = summary["base"], summary["adapter"]
    lines = [f"{'held-out metric':<18}{'base':>10}{'adapter':>10}"]
    lines += [f"{key:<18}{_value(base, key):>10}{_value(tuned, key):>10}" for key in tuned]
    return "\n".join(lines)


def print_report(summary: dict[str, Any], samples: list[dict[str, Any]], adapter: AdapterVersion) -> None:
    if samples:
        print("\n" + format_samples(samples))
    print("\n" + format_summary(summary))
    print(
        f"\nadapter {adapter.name}@{adapter.version}: {adapter.uri}\n"
        f"{summary['steps']} steps, {summary['tokensSeen']} tokens in {summary['trainSeconds']} s"
    )
