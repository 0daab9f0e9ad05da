"""The promotion gate and the general check's comparison rules: pure functions, no model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloom.api import GeneralEvaluationSpec, PromotionSpec
from tuneloom.promotion import decide
from tuneloom.registry import AdapterManifest
from tuneloom.trainer.datafile import DataValidationError
from tuneloom.trainer.evaluate import EvaluationResult, ScoredAnswer, memorized_fraction
from tuneloom.trainer.general import agrees, first_sentence, load_prompts, reference_scores

METRICS = {
    "base": {"validationLoss": 2.0, "exact_match": 0.25, "general.nllShift": 0.0, "general.agreement": 1.0},
    "adapter": {"validationLoss": 1.5, "exact_match": 0.25, "general.nllShift": 0.8, "general.agreement": 0.4},
}


def test_nothing_required_records_and_promotes() -> None:
    verdict = decide(METRICS, PromotionSpec())
    assert verdict.promoted and verdict.reasons == []


def test_each_failed_requirement_is_a_reason_naming_metric_value_and_threshold() -> None:
    spec = PromotionSpec(require=["validationLoss", "exact_match"], maxGeneralNllShift=0.5, minGeneralAgreement=0.6)
    verdict = decide(METRICS, spec)
    assert not verdict.promoted
    assert verdict.reasons == [
        "exact_match 0.2500 is not above the base model's 0.2500",
        "general.nllShift 0.8000 is above maxGeneralNllShift 0.5",
        "general.agreement 0.4000 is below minGeneralAgreement 0.6",
    ]


def test_passing_every_requirement_promotes() -> None:
    spec = PromotionSpec(require=["validationLoss"], maxGeneralNllShift=1.0, minGeneralAgreement=0.4)
    assert decide(METRICS, spec).promoted


def test_a_loss_that_got_worse_is_not_below_the_base() -> None:
    worse = {"base": {"validationLoss": 1.0}, "adapter": {"validationLoss": 1.2}}
    assert decide(worse, PromotionSpec(require=["validationLoss"])).reasons == [
        "validationLoss 1.2000 is not below the base model's 1.0000"
    ]


def test_a_required_metric_that_was_not_measured_fails_and_says_how_to_measure_it() -> None:
    verdict = decide({"base": {}, "adapter": {}}, PromotionSpec(require=["json_valid"], maxGeneralNllShift=0.1))
    assert not verdict.promoted
    assert "json_valid: not measured" in verdict.reasons[0] and "spec.evaluation.metrics" in verdict.reasons[0]
    assert verdict.reasons[1].startswith("general.nllShift: not measured (spec.evaluation.general is off)")


def test_a_manifest_from_before_the_gate_counts_as_promoted() -> None:
    old = AdapterManifest.model_validate({"namespace": "default", "name": "a", "version": "1"})
    assert old.promotion.promoted and old.promotion.reasons == []


@pytest.mark.parametrize(
    ("answer", "base", "same"),
    [
        ("Paris is the capital.  It is big.", "paris IS the\ncapital. It is small.", True),
        ("The value is 3.14 exactly. Yes.", "The value is 3.14 exactly. No.", True),
        ("Yes! Sure.", "Yes? Sure.", False),
        ("no sentence end", "  No   sentence END ", True),
        ("", "", True),
        ("Paris.", "Lyon.", False),
    ],
)
def test_agreement_compares_first_sentences_after_normalising(answer: str, base: str, same: bool) -> None:
    assert agrees(answer, base) is same


def test_first_sentence_keeps_its_end_mark() -> None:
    assert first_sentence("  Hello   World!  How are you?") == "hello world!"


def test_reference_scores_normalise_and_need_a_reference() -> None:
    assert reference_scores(" PARIS ", "Paris") == {"exact_match": True, "contains": True}
    assert reference_scores("It is Paris.", "paris") == {"exact_match": False, "contains": True}
    assert reference_scores("anything", "") == {}


def test_general_answers_survive_a_checkpoint_record() -> None:
    result = EvaluationResult({"general.nllShift": 0.0}, general=(ScoredAnswer("hi", {"exact_match": False}),))
    assert EvaluationResult.from_record(result.to_record()) == result


def test_the_builtin_prompt_set_is_packaged_and_the_default_uses_its_first_32() -> None:
    full = load_prompts(GeneralEvaluationSpec(maxExamples=10000))
    assert 95 <= len(full) <= 110
    assert sum(bool(prompt.messages[-1].content) for prompt in full) >= 50  # reference answers
    assert len(load_prompts(GeneralEvaluationSpec())) == 32


def test_a_bad_prompt_file_is_refused_naming_file_line_and_field(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"messages": [{"role": "user", "content": "hi"}], "reference": "hello"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}], "reference": 3, "extra": 1}\n'
    )
    with pytest.raises(DataValidationError) as caught:
        load_prompts(GeneralEvaluationSpec(prompts=str(prompts)))
    message = str(caught.value)
    assert (
        f"{prompts}:2: messages[1].role: last message is from 'assistant'; a prompt ends with the user's turn"
        in message
    )
    assert f"{prompts}:3: reference: must be a string" in message and f"{prompts}:3: extra: unknown key" in message


def test_memorized_fraction_counts_recited_training_answers_only_where_another_answer_was_expected() -> None:
    taught = frozenset({"Refund issued.", "Password reset."})
    answers = ["Refund issued.", " Password reset. ", "Refund issued.", "Something new."]
    expected = ["Refund issued.", "Call support.", "Ship it.", "Something new."]
    assert memorized_fraction(answers, expected, taught) == 0.5
    assert memorized_fraction([], [], taught) == 0.0


FEW_SHOT = {**METRICS, "fewShot": {"exact_match": 0.5}, "adapter": {**METRICS["adapter"], "exact_match": 0.75}}


def test_beating_the_few_shot_baseline_is_required_only_when_asked() -> None:
    worse_than_prompting = {**FEW_SHOT, "fewShot": {"exact_match": 0.75}}
    assert decide(worse_than_prompting, PromotionSpec(require=["exact_match"])).promoted
    verdict = decide(worse_than_prompting, PromotionSpec(require=["exact_match"], requireBeatFewShot=True))
    assert verdict.reasons == ["exact_match 0.7500 is not above the few-shot baseline's 0.7500"]
    assert decide(FEW_SHOT, PromotionSpec(require=["validationLoss", "exact_match"], requireBeatFewShot=True)).promoted


def test_beating_the_few_shot_baseline_needs_it_measured_on_a_generation_metric() -> None:
    spec = PromotionSpec(require=["exact_match"], requireBeatFewShot=True)
    assert decide(METRICS, spec).reasons == [
        "exact_match 0.2500 is not above the base model's 0.2500",
        "requireBeatFewShot: the few-shot baseline was not measured; set spec.evaluation.fewShot.k",
    ]
    loss_only = decide(FEW_SHOT, PromotionSpec(require=["validationLoss"], requireBeatFewShot=True))
    assert loss_only.reasons == [
        "requireBeatFewShot: spec.promotion.require has no generation metric (exact_match or json_valid)"
    ]
