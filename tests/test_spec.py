"""The FineTuneJob API: defaults, and errors that name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloom.api import FineTuneJob, Method
from tuneloom.jobfile import MAX_JOB_FILE_BYTES, SpecError, load_job, parse_job

from .measure import MB, assert_no_traceback, run_cli

VALID = """\
apiVersion: tuneloom.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: tickets
spec:
  baseModel: HuggingFaceTB/SmolLM2-135M-Instruct
  dataset:
    train: s3://data/tickets.jsonl
  output:
    adapterName: tickets
    uri: s3://adapters
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_job(_write(tmp_path, text))
    return caught.value.problems


def test_valid_spec_gets_explicit_defaults(tmp_path: Path) -> None:
    job = load_job(_write(tmp_path, VALID))
    assert isinstance(job, FineTuneJob)
    assert job.metadata.namespace == "default"
    assert job.spec.method is Method.lora
    assert job.spec.lora.targetModules == ["all-linear"]
    assert job.spec.dataset.validationSplit == 0.1
    assert job.spec.hyperparameters.packing is True
    assert job.identity == "default/tickets"


def test_negative_rank_names_field_and_line(tmp_path: Path) -> None:
    text = VALID.replace("  output:", "  lora:\n    r: -4\n  output:")
    assert _problems(tmp_path, text) == [f"{tmp_path / 'job.yaml'}:10: spec.lora.r: must be > 0, got -4"]


def test_unknown_field_is_an_error(tmp_path: Path) -> None:
    text = VALID.replace("  output:", "  hyperparameters:\n    epochz: 3\n  output:")
    [problem] = _problems(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'job.yaml'}:10: spec.hyperparameters.epochz: unknown field")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("  output:", "  method: lorax\n  output:").replace(
        "adapterName: tickets", "adapterName: Bad_Name"
    )
    problems = _problems(tmp_path, text)
    assert len(problems) == 2
    assert "spec.method: must be one of 'lora', 'qlora', 'full' or 'dpo', got 'lorax'" in problems[0]
    assert "spec.output.adapterName: must be a DNS-1123 label" in problems[1]


def test_dpo_takes_preference_pairs_and_its_settings(tmp_path: Path) -> None:
    dpo = VALID.replace(
        "    train: s3://data/tickets.jsonl\n", "    train: s3://data/pairs.jsonl\n    format: preference\n"
    )
    job = load_job(_write(tmp_path, dpo.replace("  output:", "  method: dpo\n  output:")))
    assert job.spec.method is Method.dpo
    assert (job.spec.dpo.beta, job.spec.dpo.loss.value, job.spec.dpo.initAdapter) == (0.1, "sigmoid", None)
    tuned = dpo.replace(
        "  output:", "  method: dpo\n  dpo:\n    beta: 0.5\n    loss: ipo\n    initAdapter: sft@3\n  output:"
    )
    assert load_job(_write(tmp_path, tuned)).spec.dpo.initAdapter == "sft@3"

    [unpinned] = _problems(tmp_path, tuned.replace("sft@3", "sft"))
    assert "spec.dpo.initAdapter: must be name@version" in unpinned
    [wrong_format] = _problems(tmp_path, VALID.replace("  output:", "  method: dpo\n  output:"))
    assert "spec: method: dpo trains on preference pairs: it needs dataset.format: preference" in wrong_format
    [wrong_method] = _problems(tmp_path, dpo)
    assert "got method 'lora', format 'preference'" in wrong_method
    [stray] = _problems(tmp_path, VALID.replace("  output:", "  dpo:\n    beta: 0.2\n  output:"))
    assert "dpo settings are given but method is 'lora'" in stray
    # What the API server stores: every block at the CRD's defaults, set by nobody.
    defaulted = VALID.replace("  output:", "  dpo:\n    beta: 0.1\n    loss: sigmoid\n  output:")
    assert load_job(_write(tmp_path, defaulted)).spec.method is Method.lora


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    text = VALID.replace("    uri: s3://adapters\n", "")
    assert _problems(tmp_path, text) == [f"{tmp_path / 'job.yaml'}:9: spec.output.uri: required field is missing"]


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("train: gs://data/x.jsonl", "spec.dataset.train: unsupported scheme 'gs://'"),
        ("train: s3:///x.jsonl", "spec.dataset.train: train 's3:///x.jsonl' names no bucket"),
    ],
)
def test_store_uris_are_checked(tmp_path: Path, fragment: str, expected: str) -> None:
    [problem] = _problems(tmp_path, VALID.replace("train: s3://data/tickets.jsonl", fragment))
    assert expected in problem


def test_validation_split_bounds() -> None:
    data = FineTuneJob.model_validate(_minimal()).model_dump(mode="json")
    data["spec"]["dataset"]["validationSplit"] = 0.7
    with pytest.raises(SpecError) as caught:
        parse_job(data)
    assert caught.value.problems == ["<spec>: spec.dataset.validationSplit: must be < 0.5, got 0.7"]


def test_lora_settings_with_full_method_are_refused() -> None:
    data = _minimal()
    data["spec"].update(method="full", lora={"r": 8})
    with pytest.raises(SpecError) as caught:
        parse_job(data)
    assert "method is 'full'" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"checkpointing": {"adapterName": "Not_A_Label"}}, "spec.checkpointing.adapterName: must be a DNS-1123"),
        ({"checkpointing": {"adapterName": "x"}}, "must differ from output.adapterName"),
        ({"method": "full", "checkpointing": {"adapterName": "tickets-ckpt"}}, "publishes LoRA adapters"),
        ({"distributed": {"strategy": "fsdp"}, "checkpointing": {"adapterName": "x-ckpt"}}, "which fsdp shards"),
    ],
)
def test_checkpoint_adapters_are_checked(changes: dict, expected: str) -> None:
    data = _minimal()
    data["spec"].update(changes)
    with pytest.raises(SpecError) as caught:
        parse_job(data)
    assert expected in caught.value.problems[0]


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path, VALID + "  oops: [unclosed\n")
    assert problem.startswith(f"{tmp_path / 'job.yaml'}:13: invalid YAML")


def _minimal() -> dict:
    return {
        "apiVersion": "tuneloom.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x"},
        "spec": {
            "baseModel": "/m",
            "dataset": {"train": "d.jsonl"},
            "output": {"adapterName": "x", "uri": "/o"},
        },
    }


# --- hostile job files ------------------------------------------------------------------------------


def _alias_bomb() -> str:
    """Ten nested levels of aliases under spec.lora.targetModules: 10**9 strings once expanded."""
    levels = ['    - &lol0 "lol"'] + [f"    - &lol{n} [{', '.join([f'*lol{n - 1}'] * 10)}]" for n in range(1, 10)]
    return VALID + "  lora:\n    targetModules:\n" + "\n".join(levels) + "\n"


def test_alias_bomb_is_refused_by_the_cli_at_once(tmp_path: Path) -> None:
    job = _write(tmp_path, _alias_bomb())
    measured = run_cli(["train", "-f", str(job)], tmp_path, timeout=60)
    assert measured.returncode == 2, measured.stderr
    assert (
        f"{job}:15: YAML aliases (*lol0) are not allowed in a FineTuneJob file; write the values out" in measured.stderr
    )
    assert_no_traceback(measured)
    # Before: 90 s and 7.8 GB. Now the process is mostly its imports (torch).
    assert measured.peak_rss_bytes < 1024 * MB


def test_any_alias_is_refused_with_its_line(tmp_path: Path) -> None:
    text = VALID.replace("  output:", "  lora: &settings {r: 8}\n  evaluation: {<<: *settings}\n  output:")
    assert _problems(tmp_path, text) == [
        f"{tmp_path / 'job.yaml'}:10: YAML aliases (*settings) are not allowed in a FineTuneJob file; "
        "write the values out"
    ]


def test_an_anchor_without_alias_is_harmless(tmp_path: Path) -> None:
    job = load_job(_write(tmp_path, VALID.replace("  output:", "  lora: &settings {r: 8}\n  output:")))
    assert job.spec.lora.r == 8


def test_job_file_over_one_mib_is_refused_through_the_cli(tmp_path: Path) -> None:
    job = _write(tmp_path, VALID + "# padding\n" * (MAX_JOB_FILE_BYTES // 10))
    size = job.stat().st_size
    assert size > MAX_JOB_FILE_BYTES
    measured = run_cli(["train", "-f", str(job)], tmp_path, timeout=60)
    assert measured.returncode == 2
    assert f"{job}: {size} bytes; a FineTuneJob file may have at most 1048576 bytes (1 MiB)" in measured.stderr
    assert_no_traceback(measured)


def test_endless_job_file_is_read_only_to_the_cap() -> None:
    with pytest.raises(SpecError) as caught:
        load_job("/dev/zero")  # no size to check: the read itself stops at the cap
    assert caught.value.problems == [
        f"/dev/zero: more than {MAX_JOB_FILE_BYTES} bytes; a FineTuneJob file may have at most 1048576 bytes (1 MiB)"
    ]


def test_deep_nesting_and_bad_encoding_are_spec_errors(tmp_path: Path) -> None:
    # Block nesting, which libyaml does not limit: PyYAML's composer would recurse for each level.
    deep = "".join(f"{'  ' * level}k{level}:\n" for level in range(1, 200))
    [problem] = _problems(tmp_path, VALID + deep)
    assert problem == f"{tmp_path / 'job.yaml'}:43: nested more than 32 levels deep; a FineTuneJob needs about 5"
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID.encode() + b"# caf\xe9\n")
    with pytest.raises(SpecError) as caught:
        load_job(path)
    assert caught.value.problems == [f"{path}: not valid UTF-8 (byte {len(VALID) + 6}); save the file as UTF-8"]
