"""Shared fixtures: real servers and real model weights, started and built by the tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneloom.storage import LocalStore, ObjectStore, open_store
from tuneloom_dev.seaweedfs import SeaweedFS

from .kube import api, kube_cluster, namespace, pod_runner  # noqa: F401  (fixtures shared by every test module)
from .served import served  # noqa: F401


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Points the standard AWS variables and tuneloom's endpoint setting at the test server."""
    for name, value in seaweedfs.client_env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture
def s3_root(s3_env: SeaweedFS) -> Iterator[str]:
    """A fresh, empty bucket as an s3:// root URI, deleted afterwards so its volumes are freed."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_env.create_bucket(bucket)
    yield f"s3://{bucket}/root"
    s3_env.delete_bucket(bucket)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The same test against both backends; S3 pages by 4 so every listing crosses pages."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_root"), page_size=4)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tuneloom's model cache; reuses TUNELOOM_CACHE_DIR when set so runs share the prepared model."""
    configured = os.environ.get("TUNELOOM_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face directory."""
    from tuneloom.models import prepare_model

    return prepare_model("smollm2-135m-instruct", cache_dir=model_cache)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with SmolLM2's tokenizer and chat template: trains in seconds."""
    from tuneloom_dev.tinymodel import derive_tiny_model

    return derive_tiny_model(smollm2_dir, tmp_path_factory.mktemp("tiny") / "model")
