"""AdapterCatalog and the resolver on a local store (no vLLM server): what a name resolves to,
and what is refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tuneloom.names import AdapterId
from tuneloom.registry import ADAPTER_FILES, MANIFEST, publish_adapter
from tuneloom.serving.adapters import AdapterCatalog, ServingSettings
from tuneloom.serving.names import AdapterNotFound, CorruptAdapter, InvalidAdapterName, NotPromoted
from tuneloom.storage import LocalStore


@pytest.fixture
def source(tmp_path: Path) -> AdapterCatalog:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    settings = ServingSettings(
        store_uri=str(tmp_path / "store"),
        base_model_dir=base,
        served_model_name="base",
        adapter_cache_dir=tmp_path / "cache",
        latest_ttl_s=0.0,
    )
    return AdapterCatalog(settings, LocalStore(tmp_path / "store"))


def _publish(source: AdapterCatalog, name: str, content: bytes, manifest: dict | None = None) -> None:
    folder = source.settings.adapter_cache_dir.parent / f"src-{name}-{len(content)}"
    folder.mkdir(exist_ok=True)
    for file_name in ADAPTER_FILES:
        (folder / file_name).write_bytes(content)
    publish_adapter(source.store, "default", name, {f: folder / f for f in ADAPTER_FILES}, manifest or {})


NOT_PROMOTED = {
    "promotion": {"promoted": False, "reasons": ["general.nllShift 5.9000 is above maxGeneralNllShift 0.5"]}
}


def test_latest_skips_a_damaged_version_and_a_pinned_one_is_refused(source: AdapterCatalog) -> None:
    _publish(source, "pirate", b"v1")
    _publish(source, "pirate", b"v2")
    source.store.put_bytes(f"{AdapterId('default', 'pirate', '2').store_prefix}/{ADAPTER_FILES[1]}", b"tampered")
    assert source.resolve("pirate").adapter.served_name == "default/pirate@1"
    with pytest.raises(CorruptAdapter) as caught:
        source.resolve("pirate@2")
    assert str(source.store.uri) not in str(caught.value)
    assert not (source.settings.adapter_cache_dir / "default" / "pirate" / "2").exists()


def test_a_manifest_without_the_weights_is_damaged_not_a_bad_request(source: AdapterCatalog) -> None:
    _publish(source, "lamp", b"v1")
    prefix = AdapterId("default", "lamp", "1").store_prefix
    manifest = json.loads(source.store.get_bytes(f"{prefix}/{MANIFEST}"))
    del manifest["files"][ADAPTER_FILES[1]]
    source.store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(CorruptAdapter, match=r"lists no adapter_model\.safetensors"):
        source.resolve("lamp")


def test_a_removed_version_is_not_found_even_when_cached(source: AdapterCatalog) -> None:
    _publish(source, "ember", b"v1")
    assert source.resolve("ember@1").path.is_dir()
    source.store.delete(f"{AdapterId('default', 'ember', '1').store_prefix}/{MANIFEST}")
    for model in ("ember@1", "ember"):
        with pytest.raises(AdapterNotFound) as caught:
            source.resolve(model)
        assert str(source.store.uri) not in str(caught.value)


def test_a_cached_copy_of_another_manifest_is_fetched_again(source: AdapterCatalog) -> None:
    _publish(source, "robot", b"old weights")
    first = source.resolve("robot@1").path
    source.store.delete_prefix(AdapterId("default", "robot", "1").store_prefix)
    _publish(source, "robot", b"new weights, same version number")
    fresh = AdapterCatalog(source.settings, source.store)  # a restarted server with the same cache
    assert (fresh.resolve("robot@1").path / ADAPTER_FILES[1]).read_bytes() == b"new weights, same version number"
    assert first == fresh.resolve("robot@1").path


def test_the_resolver_takes_only_what_the_catalog_resolved(source: AdapterCatalog) -> None:
    from tuneloom.serving.resolver import RegistryResolver

    _publish(source, "pirate", b"v1")
    resolver = RegistryResolver(source)
    # Not resolved yet: the resolver looks nothing up itself.
    assert asyncio.run(resolver.resolve_lora("base", "default/pirate@1")) is None
    resolved = source.resolve("pirate")  # what the middleware does with a client's name
    for floating in ("pirate", "pirate@1", "default/pirate"):
        assert asyncio.run(resolver.resolve_lora("base", floating)) is None, floating
    request = asyncio.run(resolver.resolve_lora("base", "default/pirate@1"))
    assert request is not None and request.lora_name == "default/pirate@1"
    assert Path(request.lora_path) == resolved.path and resolved.path.is_dir()
    with pytest.raises(InvalidAdapterName):
        source.resolve("pirate", require_version=True)


@pytest.mark.parametrize("base_model", ["/no/such/model-dir", "no-such-org/unprepared-model"])
def test_serve_refuses_a_missing_base_model_before_starting_vllm(tmp_path: Path, base_model: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELOOM_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-I", "-m", "tuneloom.cli", "serve", "--base-model", base_model]
    command += ["--store", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--base-model" in result.stderr and "Traceback" not in result.stderr


def test_latest_means_the_latest_promoted_version_and_a_pinned_unpromoted_one_is_a_conflict(
    source: AdapterCatalog,
) -> None:
    _publish(source, "poet", b"v1")  # a manifest from before the gate: promoted
    _publish(source, "poet", b"v2", {"promotion": {"promoted": True, "reasons": []}})
    _publish(source, "poet", b"v3", NOT_PROMOTED)
    assert source.resolve("poet").adapter.served_name == "default/poet@2"
    with pytest.raises(NotPromoted) as caught:
        source.resolve("poet@3")
    assert caught.value.status == 409 and caught.value.error_type == "ConflictError"
    assert "not promoted (general.nllShift 5.9000 is above maxGeneralNllShift 0.5)" in str(caught.value)
    assert "--allow-unpromoted" in str(caught.value)
    assert not (source.settings.adapter_cache_dir / "default" / "poet" / "3").exists()
    assert source.resolve("poet@1").adapter.version == "1"


def test_allow_unpromoted_serves_a_pinned_version_but_latest_still_skips_it(
    source: AdapterCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(source, "poet", b"v1")
    _publish(source, "poet", b"v2", NOT_PROMOTED)
    inspecting = AdapterCatalog(replace(source.settings, allow_unpromoted=True), source.store)
    assert inspecting.resolve("poet@2").path.is_dir()
    assert inspecting.resolve("poet").adapter.version == "1"
    for key, value in inspecting.settings.to_env().items():  # how `tuneloom serve` hands it to vLLM's process
        monkeypatch.setenv(key, value)
    assert ServingSettings.from_env().allow_unpromoted


def test_a_name_without_a_promoted_version_is_a_conflict_naming_the_newest(source: AdapterCatalog) -> None:
    _publish(source, "draft", b"v1", NOT_PROMOTED)
    with pytest.raises(
        NotPromoted, match=r"'default/draft' has no promoted version.*'default/draft@1' was not promoted"
    ):
        source.resolve("draft")


def test_serve_allow_unpromoted_reaches_the_vllm_process_environment(tmp_path: Path) -> None:
    from tuneloom.cli import build_parser
    from tuneloom.serving.server import ServeOptions, build_launch

    args = build_parser().parse_args(["serve", "--base-model", "m", "--store", str(tmp_path), "--allow-unpromoted"])
    assert (
        args.allow_unpromoted
        and not build_parser().parse_args(["serve", "--base-model", "m", "--store", "s"]).allow_unpromoted
    )
    for allowed, value in ((True, "1"), (False, "0")):
        _, env = build_launch(ServeOptions(base_model="m", store=str(tmp_path), allow_unpromoted=allowed), tmp_path)
        assert env["TUNELOOM_ALLOW_UNPROMOTED"] == value
