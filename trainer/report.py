"""The table a person reads after a run: base model vs adapter on held-out prompts."""

from __future__ import annotations

from typing import Any

from tuneloom.registry import AdapterVersion


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _marks(scores: dict[str, bool]) -> str:
    short = {"json_valid": "json", "exact_match": "exact"}
    return " ".join(f"{short.get(name, name)}{'✓' if ok else '✗'}" for name, ok in scores.items())


def _value(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.3f}"


def print_report(
    summary: dict[str, Any], samples: list[dict[str, Any]], adapter: AdapterVersion, width: int = 38
) -> None:
    if samples:
        header = f"{'line':>5}  {'expected':<{width}}  {'base model':<{width + 14}}  {'adapter':<{width + 14}}"
        print("\nHeld-out prompts: base model vs adapter\n" + header + "\n" + "-" * len(header))
        for sample in samples:
            base = f"{_cell(sample['base'], width):<{width}} {_marks(sample['baseScores'])}"
            tuned = f"{_cell(sample['adapter'], width):<{width}} {_marks(sample['adapterScores'])}"
            print(f"{sample['line']:>5}  {_cell(sample['reference'], width):<{width}}  {base:<{width + 14}}  {tuned}")
    base, tuned = summary["base"], summary["adapter"]
    keys = [k for k in tuned if k not in ("perExample",)]
    print(f"\n{'metric':<18}{'base':>10}{'adapter':>10}")
    for key in keys:
        print(f"{key:<18}{_value(base, key):>10}{_value(tuned, key):>10}")
    print(
        f"\nadapter {adapter.name}@{adapter.version}: {adapter.uri}\n"
        f"{summary['steps']} steps, {summary['tokensSeen']} tokens in {summary['trainSeconds']} s"
    )
