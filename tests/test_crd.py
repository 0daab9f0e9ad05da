"""The committed CRDs are what the API models generate, and document every field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneloom.operator.crd import adapter_crd, finetunejob_crd, modelserver_crd
from tuneloom_dev.crds import crd_dirs, rendered, write_crds

ROOT = Path(__file__).resolve().parent.parent
ALL_CRDS = [finetunejob_crd, adapter_crd, modelserver_crd]


def test_committed_crds_match_the_models() -> None:
    assert sorted(rendered()) == ["adapters.yaml", "finetunejobs.yaml", "modelservers.yaml"]
    for directory in crd_dirs(ROOT):
        for name, text in rendered().items():
            committed = (directory / name).read_text()
            assert committed == text, f"{directory}/{name} is stale: run `tuneloom dev crds`"


def test_writer_fills_both_folders_of_a_checkout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a tuneloom checkout"):
        write_crds(tmp_path)
    (tmp_path / "charts" / "tuneloom").mkdir(parents=True)
    (tmp_path / "charts" / "tuneloom" / "Chart.yaml").write_text("name: tuneloom\n")
    written = write_crds(tmp_path)
    assert {path.relative_to(tmp_path).as_posix() for path in written} == {
        f"{folder}/{name}" for folder in ("crds", "charts/tuneloom/crds") for name in rendered()
    }
    assert all(path.read_text() == rendered()[path.name] for path in written)


def _undocumented(node: dict, path: str) -> list[str]:
    missing = []
    for name, child in (node.get("properties") or {}).items():
        if name != "metadata" and "description" not in child:
            missing.append(f"{path}.{name}")
        missing += _undocumented(child, f"{path}.{name}")
    if "items" in node:
        missing += _undocumented(node["items"], f"{path}[]")
    return missing


@pytest.mark.parametrize("crd", ALL_CRDS)
def test_every_field_has_a_description(crd) -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _undocumented(schema, "") == []


@pytest.mark.parametrize("crd", ALL_CRDS)
def test_schema_is_structural(crd) -> None:
    """No $ref, anyOf or JSON-Schema-2020 numeric exclusive bounds: the API server refuses them."""
    text = yaml.safe_dump(crd())
    assert "$ref" not in text and "anyOf" not in text


def test_lora_rank_bound_is_openapi_v3() -> None:
    lora = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "lora"
    ]
    assert lora["properties"]["r"] == {
        "default": 16,
        "description": "LoRA rank.",
        "exclusiveMinimum": True,
        "maximum": 1024,
        "minimum": 0,
        "type": "integer",
    }


def test_adapter_source_is_one_of_registry_or_uri() -> None:
    spec = adapter_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["source"]["oneOf"] == [{"required": ["registry"]}, {"required": ["uri"]}]


def test_modelserver_scales_through_its_scale_subresource() -> None:
    version = modelserver_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert modelserver_crd()["spec"]["names"]["shortNames"] == ["msrv"]
    rank = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["maxLoraRank"]
    assert rank["enum"] == [1, 8, 16, 32, 64, 128, 256, 320, 512]
