"""The CustomResourceDefinitions, generated from the API models in `tuneloom.api`.

The committed copies in `crds/` and `charts/tuneloom/crds/` are written from these by the dev
tools (`tuneloom dev crds`); a test fails when either drifts.
pydantic emits JSON Schema (2020-12); Kubernetes wants a structural OpenAPI v3.0 subset: no $ref,
a type on every node, `nullable` instead of `anyOf [.., null]`, boolean exclusive bounds, and no
`additionalProperties: false` beside `properties` (the API server prunes unknown fields itself).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tuneloom.api import (
    API_GROUP,
    API_VERSION,
    AdapterSpec,
    AdapterStatus,
    FineTuneJobSpec,
    FineTuneJobStatus,
    ModelServerSpec,
    ModelServerStatus,
)

_DROPPED = {"title", "additionalProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """One JSON Schema node turned into its structural OpenAPI v3.0 equivalent."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return {**_structural({**options[0], **rest}, defs), "nullable": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or (key == "default" and value is None):
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _structural(child, defs) for name, child in value.items()}
        else:
            out[key] = _structural(value, defs)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if out.get("format") == "date-time":
        out["type"] = "string"
    return out


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(item) for item in node]
    return node


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return _structural(schema, schema.get("$defs", {}))


def _column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, **extra}


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    description: str,
    spec: tuple[type[BaseModel], str],
    status: tuple[type[BaseModel], str],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec[0])
    spec_schema["description"] = spec[1]
    # Status is written by the operator alone; API-server defaults there would only add noise.
    status_schema = _without_defaults(openapi_schema(status[0]))
    status_schema["description"] = status[1]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["tuneloom"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "tuneloom.dev/v1alpha1"},
                                "kind": {"type": "string", "description": kind},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def finetunejob_crd() -> dict[str, Any]:
    return _crd(
        "FineTuneJob",
        "finetunejobs",
        ["ftj"],
        "A fine-tuning run: a base model, chat data and a method (LoRA, QLoRA or full) produce an evaluated adapter "
        "in object storage.",
        (FineTuneJobSpec, "What to fine-tune, on which data, how, and where the result goes."),
        (FineTuneJobStatus, "Where the job stands; written by the operator only."),
        [
            _column("Phase", ".status.phase"),
            _column("Base model", ".spec.baseModel"),
            _column("Progress", ".status.progress.percent", "integer", description="percent of steps"),
            _column("Train loss", ".status.progress.trainLoss", "number"),
            _column("Val loss", ".status.progress.validationLoss", "number"),
            _column("Age", ".metadata.creationTimestamp", "date"),
        ],
        {"status": {}},
    )


def adapter_crd() -> dict[str, Any]:
    return _crd(
        "Adapter",
        "adapters",
        ["adp"],
        "A LoRA adapter in the registry, checked in object storage before it is Ready to be served. A succeeded "
        "FineTuneJob creates one; a PEFT folder trained elsewhere is imported through one.",
        (AdapterSpec, "Which adapter, for which base model, and where its files are."),
        (AdapterStatus, "The version checked and where it is loaded; written by the operator only."),
        [
            _column("Phase", ".status.phase"),
            _column("Base model", ".spec.baseModel"),
            _column("Version", ".status.version", description="the version checked: the latest unless pinned"),
            _column("Val loss", ".status.validationLoss", "number"),
            _column("Promoted", ".status.promoted", "boolean", description="passed its promotion gate"),
            _column("Loaded on", ".status.loadedOn[*].modelServer"),
            _column("Age", ".metadata.creationTimestamp", "date"),
        ],
        {"status": {}},
    )


def modelserver_crd() -> dict[str, Any]:
    return _crd(
        "ModelServer",
        "modelservers",
        ["msrv"],
        "vLLM serving one base model and the adapters of its namespace: a Deployment of tuneloom serve pods and a "
        "Service on port 8000 (OpenAI API).",
        (ModelServerSpec, "The base model, the pods, and the adapters to load ahead of the first request."),
        (ModelServerStatus, "Replicas and the adapters loaded on each pod; written by the operator only."),
        [
            _column("Base model", ".spec.baseModel"),
            _column("Replicas", ".spec.replicas", "integer"),
            _column("Ready", ".status.readyReplicas", "integer"),
            _column("Age", ".metadata.creationTimestamp", "date"),
        ],
        # The scale subresource: `kubectl scale msrv` and a HorizontalPodAutoscaler act on spec.replicas.
        {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """Every CRD this project defines, by its plural name."""
    return {"finetunejobs": finetunejob_crd(), "adapters": adapter_crd(), "modelservers": modelserver_crd()}
