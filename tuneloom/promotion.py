"""The promotion gate: whether a new adapter version may become what its bare name serves.

A pure function of the version's metrics and the job's `spec.promotion`; the trainer records its
verdict in the manifest (`promotion`), servers and the operator read it from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuneloom.api import PromotionMetric, PromotionSpec
from tuneloom.registry import Promotion

NLL_SHIFT = "general.nllShift"
AGREEMENT = "general.agreement"

# Held-out metrics where smaller is better; for the rest, larger is.
_LOWER_IS_BETTER = frozenset({PromotionMetric.validationLoss})


def _figure(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# What the few-shot baseline measures: it answers held-out prompts, so it has no loss figures.
_GENERATION_METRICS = frozenset({PromotionMetric.exact_match, PromotionMetric.json_valid})


def _beats(
    metric: PromotionMetric, reference: Mapping[str, Any], adapter: Mapping[str, Any], against: str
) -> str | None:
    """Why the adapter does not beat `against` (the base model, or its few-shot baseline) on `metric`
    (None: it does)."""
    name = metric.value
    ours, theirs = _figure(adapter, name), _figure(reference, name)
    if ours is None or theirs is None:
        hint = "" if metric is PromotionMetric.validationLoss else f"; add {name} to spec.evaluation.metrics"
        return f"{name}: not measured for both the {against} and the adapter{hint}"
    if metric in _LOWER_IS_BETTER:
        return None if ours < theirs else f"{name} {ours:.4f} is not below the {against}'s {theirs:.4f}"
    return None if ours > theirs else f"{name} {ours:.4f} is not above the {against}'s {theirs:.4f}"


def _few_shot_reasons(metrics: Mapping[str, Any], promotion: PromotionSpec) -> list[str | None]:
    """With requireBeatFewShot, the adapter must also beat the few-shot baseline on each required
    generation metric; a few-shot prompt that does as well means prompting would have been enough."""
    if not promotion.requireBeatFewShot:
        return []
    required = [metric for metric in promotion.require if metric in _GENERATION_METRICS]
    if not required:
        return ["requireBeatFewShot: spec.promotion.require has no generation metric (exact_match or json_valid)"]
    few_shot = metrics.get("fewShot")
    if not few_shot:
        return ["requireBeatFewShot: the few-shot baseline was not measured; set spec.evaluation.fewShot.k"]
    adapter = metrics.get("adapter") or {}
    return [_beats(metric, few_shot, adapter, "few-shot baseline") for metric in required]


def _bound(adapter: Mapping[str, Any], key: str, setting: str, limit: float | None, *, upper: bool) -> str | None:
    """Why the adapter's `key` is on the wrong side of `limit` (None: it is not, or no limit is set)."""
    if limit is None:
        return None
    value = _figure(adapter, key)
    if value is None:
        return f"{key}: not measured (spec.evaluation.general is off); {setting} {limit} needs it"
    if upper and value > limit:
        return f"{key} {value:.4f} is above {setting} {limit}"
    if not upper and value < limit:
        return f"{key} {value:.4f} is below {setting} {limit}"
    return None


def decide(metrics: Mapping[str, Any], promotion: PromotionSpec) -> Promotion:
    """The gate's verdict on a version whose manifest `metrics` has `base` and `adapter` figures.
    With nothing required, every version is promoted: the metrics are recorded, not gated."""
    base, adapter = metrics.get("base") or {}, metrics.get("adapter") or {}
    reasons = [_beats(metric, base, adapter, "base model") for metric in promotion.require]
    reasons += _few_shot_reasons(metrics, promotion)
    reasons.append(_bound(adapter, NLL_SHIFT, "maxGeneralNllShift", promotion.maxGeneralNllShift, upper=True))
    reasons.append(_bound(adapter, AGREEMENT, "minGeneralAgreement", promotion.minGeneralAgreement, upper=False))
    failed = [reason for reason in reasons if reason is not None]
    return Promotion(promoted=not failed, reasons=failed)
