"""Fixtures shared by the server's unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.service.server.planes import publish


@pytest.fixture
def two_versions(tmp_path: Path) -> Path:
    """A repository whose model has versions 1 and 2 (tiny real models)."""
    publish(tmp_path, 1)
    publish(tmp_path, 2)
    return tmp_path
