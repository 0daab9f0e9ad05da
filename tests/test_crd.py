"""The committed CRDs are what the API models generate, and document every field."""

from __future__ import annotations

import yaml

from tuneloom.operator.crd import CRD_DIR, finetunejob_crd, rendered


def test_committed_crds_match_the_models() -> None:
    for name, text in rendered().items():
        committed = (CRD_DIR / name).read_text()
        assert committed == text, f"crds/{name} is stale: run `python -m tuneloom.operator.crd`"


def _undocumented(node: dict, path: str) -> list[str]:
    missing = []
    for name, child in (node.get("properties") or {}).items():
        if name != "metadata" and "description" not in child:
            missing.append(f"{path}.{name}")
        missing += _undocumented(child, f"{path}.{name}")
    if "items" in node:
        missing += _undocumented(node["items"], f"{path}[]")
    return missing


def test_every_field_has_a_description() -> None:
    schema = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _undocumented(schema, "") == []


def test_schema_is_structural() -> None:
    """No $ref, anyOf or JSON-Schema-2020 numeric exclusive bounds: the API server refuses them."""
    text = yaml.safe_dump(finetunejob_crd())
    assert "$ref" not in text and "anyOf" not in text
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
