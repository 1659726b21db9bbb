"""The registry's tests run on both backends: the embedded SQLite + local files, and
PostgreSQL + an S3 bucket (real servers, tests/stores.py), chosen through the environment
as a user chooses them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """`sqlite`, or `postgres` with this test's database and bucket set in the environment."""
    if request.param == "postgres":
        request.getfixturevalue("shared_store")
    return str(request.param)


@pytest.fixture
def home(backend: str, tmp_path: Path, tiny_base: Path) -> Path:
    """A new registry bound to `tiny_base`, on `backend`."""
    from registry import Registry

    path = tmp_path / "home"
    Registry.create(path, tiny_base, max_rank=16, actor="tests").close()
    return path
