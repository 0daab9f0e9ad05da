"""Data quality before any model loads: leakage, near-duplicates, conflicts, too little data and
answers that barely vary, found on crafted files with the right line numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tuneloom.trainer.datafile import load_examples
from tuneloom.trainer.dataquality import find_problems, jaccard, normalise

QUESTIONS = [
    "How do I reset my password on the billing portal?",
    "My invoice shows the wrong company address, who can fix it?",
    "The mobile app crashes when I open the settings page.",
    "Can I move my subscription from monthly to yearly billing?",
    "Where do I download last year's receipts for tax purposes?",
    "Two people on my team cannot log in since this morning.",
    "How long does a refund take to reach my credit card?",
    "Is there a way to export all tickets as a spreadsheet?",
]
ANSWERS = [
    "Open Settings, choose Security and press Reset password; the link arrives within a minute.",
    "Billing can change it: write to billing with the invoice number and the right address.",
    "Update the app to the latest version; if it still crashes send us the crash report id.",
    "Yes: in Plans choose Yearly, the unused part of this month is credited automatically.",
    "Receipts are under Billing, History; pick the year and press Download all as PDF.",
    "Ask them to clear the browser cache; if that fails, send us their user names please.",
    "Refunds take five to ten working days, depending on the bank that issued the card.",
    "Yes: Tickets, Export, CSV gives every ticket with its status, owner and timestamps.",
]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _kinds(findings) -> dict[str, str]:
    return {f.kind: f.message for f in findings}


def test_normalising_and_similarity() -> None:
    assert normalise("  Hello,   WORLD!\n") == "hello world"
    assert jaccard(frozenset("abc"), frozenset("abc")) == 1.0
    assert jaccard(frozenset("ab"), frozenset("cd")) == 0.0


def test_leakage_exact_and_near_is_named_by_line(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", [_chat(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)])
    near = ANSWERS[5].replace("please", "")  # one word less
    held = _write(
        tmp_path / "val.jsonl",
        [
            _chat("What colour is the sky on a clear day?", "Blue."),
            _chat(QUESTIONS[2], ANSWERS[2]),  # line 2: an exact copy of train line 3
            _chat(QUESTIONS[5], near),  # line 3: nearly train line 6
        ],
    )
    findings = _kinds(find_problems(load_examples(train, "chat"), load_examples(held, "chat")))
    leakage = findings["leakage"]
    assert "validation line 2 ~ train line 3 (exact)" in leakage
    assert "validation line 3 ~ train line 6 (near, Jaccard" in leakage
    assert "validation line 1" not in leakage
    assert "2 held-out example(s)" in leakage


def test_near_duplicates_are_grouped_and_conflicts_listed(tmp_path: Path) -> None:
    records = [_chat(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    records.append(_chat(QUESTIONS[0], ANSWERS[0].replace("within a minute", "within a minute or so")))  # 9 ~ 1
    records.append(_chat(QUESTIONS[0] + " Thanks", ANSWERS[0]))  # 10 ~ 1 and 9
    records.append(_chat(QUESTIONS[3], "No, yearly billing is not available."))  # 11 conflicts with 4
    findings = _kinds(find_problems(load_examples(_write(tmp_path / "t.jsonl", records), "chat")))
    assert "lines 1, 9, 10" in findings["near_duplicates"]
    assert "1 group(s)" in findings["near_duplicates"]
    assert "lines 4, 11: one prompt, 2 different answers" in findings["conflicting_answers"]
    assert "11 training examples" in findings["too_few_examples"]


def test_clean_data_of_enough_examples_has_no_findings(tmp_path: Path) -> None:
    records = [_chat(f"{QUESTIONS[n % 8]} (ticket {n})", f"Case {n}: {ANSWERS[(n * 3) % 8]}") for n in range(120)]
    examples = load_examples(_write(tmp_path / "t.jsonl", records), "chat")
    kinds = _kinds(find_problems(examples, held_out_size=12))
    assert "leakage" not in kinds and "conflicting_answers" not in kinds and "too_few_examples" not in kinds
    assert "small_held_out" not in kinds and "uniform_answers" not in kinds


def test_label_like_answers_show_their_distribution_and_a_dominant_one_warns(tmp_path: Path) -> None:
    records = [_chat(f"{q} (case {n})", "billing") for n, q in enumerate(QUESTIONS * 5)]
    records[0] = _chat(QUESTIONS[0], "security")
    kinds = _kinds(find_problems(load_examples(_write(tmp_path / "t.jsonl", records), "chat"), held_out_size=4))
    assert "39 of 40 examples (98%)" in kinds["uniform_answers"]
    assert "'billing' 98%" in kinds["label_distribution"] and "'security' 2%" in kinds["label_distribution"]
    assert "4 example(s)" in kinds["small_held_out"]


def test_validate_data_warns_and_strict_refuses(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", [_chat(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)])
    held = _write(tmp_path / "val.jsonl", [_chat(QUESTIONS[1], ANSWERS[1])])
    command = [sys.executable, "-I", "-m", "tuneloom.cli", "validate-data", str(train), "--validation", str(held)]
    warned = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert warned.returncode == 0, warned.stderr
    assert "warning: leakage:" in warned.stdout and "validation line 1 ~ train line 2 (exact)" in warned.stdout
    refused = subprocess.run([*command, "--strict"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "error: leakage:" in refused.stderr and "(--strict)" in refused.stderr


def test_the_trainer_drops_training_copies_of_held_out_examples(tmp_path: Path) -> None:
    from tuneloom.jobfile import parse_job
    from tuneloom.trainer.main import load_datasets

    records = [_chat(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    train = _write(tmp_path / "train.jsonl", records + records[:2])  # lines 9-10 repeat lines 1-2
    held = _write(tmp_path / "val.jsonl", records[:2])
    job = parse_job(
        {
            "apiVersion": "tuneloom.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "leaky"},
            "spec": {
                "baseModel": str(tmp_path),
                "dataset": {"train": str(train), "validation": str(held)},
                "output": {"adapterName": "leaky", "uri": str(tmp_path / "store")},
            },
        }
    )
    data = load_datasets(job)
    assert [e.line for e in data.train] == [3, 4, 5, 6, 7, 8]
    assert data.info["train"]["removedCopiesOfHeldOut"] == 4
