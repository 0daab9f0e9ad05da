"""spec.dataset.mix's arithmetic and its checks (pure logic, no model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuneloom.jobfile import SpecError, parse_job
from tuneloom.trainer.datafile import DataValidationError, Example
from tuneloom.trainer.main import load_datasets
from tuneloom.trainer.mixing import draw, mixed_counts

from .test_spec import _minimal


def test_each_mix_file_makes_up_its_fraction_of_the_training_examples() -> None:
    assert mixed_counts(80, [0.2]) == [20]  # 20 of 100
    assert mixed_counts(60, [0.2, 0.2]) == [20, 20]  # 20 + 20 of 100
    assert mixed_counts(32, [0.5]) == [32]


def test_a_small_file_is_drawn_once_per_pass_in_a_seeded_order() -> None:
    examples = [Example(line=n) for n in range(1, 6)]
    drawn = draw(examples, 12, random.Random(7))
    lines = [example.line for example in drawn]
    assert sorted(lines[:5]) == sorted(lines[5:10]) == [1, 2, 3, 4, 5] and len(set(lines[10:])) == 2
    assert lines == [example.line for example in draw(examples, 12, random.Random(7))]
    assert len(set(example.line for example in draw(examples, 3, random.Random(7)))) == 3
    assert draw([], 4, random.Random(7)) == []


def _chat(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w") as stream:
        for question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            stream.write(json.dumps({"messages": messages}) + "\n")
    return path


def _spec(train: Path, mix: list[dict]) -> dict:
    job = _minimal()
    job["spec"]["dataset"] = {"train": str(train), "validationSplit": 0.2, "mix": mix}
    job["spec"]["evaluation"] = {"general": {"enabled": False}}
    return job


def test_fractions_must_leave_room_for_the_jobs_own_data(tmp_path: Path) -> None:
    mix = [{"train": "a.jsonl", "fraction": 0.6}, {"train": "b.jsonl", "fraction": 0.4}]
    with pytest.raises(SpecError, match=r"spec\.dataset\.mix: .*fractions sum to 1; they must sum to under 1"):
        parse_job(_spec(tmp_path / "train.jsonl", mix))


def test_mixed_examples_join_training_only_and_are_counted_in_the_manifest(tmp_path: Path) -> None:
    train = _chat(tmp_path / "train.jsonl", [(f"task {n}?", f"answer {n}") for n in range(8)])
    validation = _chat(tmp_path / "validation.jsonl", [("held out?", "kept out")])
    # The mix repeats the held-out example: it must stay out of training.
    general = _chat(
        tmp_path / "general.jsonl", [*((f"general {n}?", f"reply {n}") for n in range(3)), ("held out?", "kept out")]
    )
    spec = _spec(train, [{"train": str(general), "fraction": 0.5}])
    spec["spec"]["dataset"]["validation"] = str(validation)
    data = load_datasets(parse_job(spec))
    assert len(data.train) == 8 and len(data.mixed) == 8  # half of 16
    assert {example.messages[0].content for example in data.mixed} == {"general 0?", "general 1?", "general 2?"}
    [record] = data.info["mix"]
    assert record["uri"] == str(general) and record["fraction"] == 0.5 and record["examples"] == 4
    assert record["mixedIn"] == 8 and record["removedCopiesOfHeldOut"] == 1 and len(record["sha256"]) == 64


def test_a_bad_line_in_a_mix_file_is_reported_with_file_and_line(tmp_path: Path) -> None:
    train = _chat(tmp_path / "train.jsonl", [(f"task {n}?", f"answer {n}") for n in range(10)])
    general = _chat(tmp_path / "general.jsonl", [("hi?", "hello")])
    with general.open("a") as stream:
        stream.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataValidationError, match=rf"{general}:2: "):
        load_datasets(parse_job(_spec(train, [{"train": str(general), "fraction": 0.2}])))
