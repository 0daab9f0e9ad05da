"""Scratch folders for fixtures that outlive a test.

`tmp_path_retention_policy = "failed"` (pyproject.toml) removes a passing test's `tmp_path`, but
pytest keeps every `tmp_path_factory.mktemp` folder until the session ends. A module's trained models
and stores add up to gigabytes over the session, on CI machines whose disk is shared and sometimes
nearly full; these folders follow the same rule as `tmp_path` instead.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def scratch_dir(request: pytest.FixtureRequest, name: str) -> Iterator[Path]:
    """A fresh folder under the session's basetemp, removed at teardown unless a test failed while
    it was in use (its logs and data are then kept for the post-mortem)."""
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    path = factory.mktemp(name)
    failures_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failures_before:
        shutil.rmtree(path, ignore_errors=True)
