"""Which base models this machine can fine-tune and serve, and the ids the API gives them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneloom.models import KNOWN_MODELS, find_prepared, known_model

from .errors import ApiError

OWNED_BY_BASE = "tuneloom"


@dataclass(frozen=True)
class BaseModel:
    id: str  # what clients send as `model`: a hub id, or a model directory's absolute path
    directory: Path  # the Hugging Face directory vLLM and the trainer load


def prepared_base_models() -> list[BaseModel]:
    """The known models `tuneloom models prepare` has built on this machine."""
    found = [(model.hub_id, find_prepared(model.hub_id)) for model in KNOWN_MODELS.values()]
    return [BaseModel(hub_id, directory) for hub_id, directory in found if directory]


def resolve_base_model(model: str) -> BaseModel:
    """The base model `model` names: a known model (short name or hub id, prepared) or a local model
    directory. Anything else is a 404 naming `model` and saying what would work."""
    known = known_model(model)
    if known is not None:
        directory = find_prepared(known.hub_id)
        if directory is None:
            raise ApiError(
                404,
                f"model {model!r} is known but not prepared on this machine; run "
                f"`tuneloom models prepare {known.name}` on the API's host, then retry",
                param="model",
                code="model_not_found",
            )
        return BaseModel(known.hub_id, directory)
    path = Path(model).expanduser()
    if path.is_absolute() and (path / "config.json").is_file():
        return BaseModel(str(path), path)
    available = ", ".join(m.id for m in prepared_base_models()) or "none prepared yet"
    raise ApiError(
        404,
        f"model {model!r} is not a base model here; use a prepared model ({available}; see "
        f"`tuneloom models prepare`) or the absolute path of a Hugging Face model directory on the API's host",
        param="model",
        code="model_not_found",
    )
