"""Which version a request gets, and which models a repository serves.

The repository's state is set as ``load()`` leaves it (READY versions, loading and failed
ones, known names), so the rules are checked without loading ONNX Runtime; loading itself
and hot reload run against real models in tests/integration/service/server/test_lifecycle.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.model.errors import InvalidArgumentError, NotFoundError, UnavailableError
from service.server.config import Settings
from service.server.metrics import Metrics
from service.server.repository import ModelRepository
from service.server.versions import ModelVersion, VersionState


def repository(tmp_path: Path, **settings: object) -> ModelRepository:
    return ModelRepository(
        Settings(model_repository=tmp_path, **settings),  # type: ignore[arg-type]
        Metrics(),
        ThreadPoolExecutor(1),
    )


def serve(repo: ModelRepository, name: str, *versions: int) -> None:
    repo._known.add(name)
    for v in versions:
        entry = ModelVersion(name, v, Path(f"{name}/{v}/model.onnx"), state=VersionState.READY)
        repo._versions.setdefault(name, {})[v] = entry


def test_an_empty_version_means_the_newest_ready_one(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    serve(repo, "demo", 1, 3, 2)
    assert repo.resolve("demo", "").version == 3
    assert repo.resolve("demo", "1").version == 1
    # With one model the name may be left out, as the SDK's default does.
    assert repo.resolve("", "").name == "demo"


def test_unknown_names_and_versions_are_not_found_with_what_exists(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    serve(repo, "demo", 1, 2)
    serve(repo, "digits", 4)
    with pytest.raises(NotFoundError, match="this server has: demo, digits"):
        repo.resolve("cats", "")
    with pytest.raises(NotFoundError, match="served versions: 1, 2"):
        repo.resolve("demo", "9")
    with pytest.raises(InvalidArgumentError, match="several models; it has: demo, digits"):
        repo.resolve("", "")
    with pytest.raises(InvalidArgumentError, match="must be a number"):
        repo.resolve("demo", "latest")


def test_loading_and_failed_versions_are_unavailable_with_the_reason(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    serve(repo, "demo", 1)
    repo._loading[("demo", 2)] = ModelVersion("demo", 2, Path("demo/2/model.onnx"))
    repo._failures[("demo", 3)] = ModelVersion(
        "demo", 3, Path("demo/3/model.onnx"), state=VersionState.FAILED, error="bad protobuf"
    )
    with pytest.raises(UnavailableError, match="version 2 is still loading"):
        repo.resolve("demo", "2")
    with pytest.raises(UnavailableError, match="version 3 failed to load: bad protobuf"):
        repo.resolve("demo", "3")
    # A failed newer version never hides the ready older one.
    assert repo.resolve("demo", "").version == 1


def test_a_known_model_without_a_ready_version_is_unavailable_not_unknown(
    tmp_path: Path,
) -> None:
    repo = repository(tmp_path)
    repo._known.add("demo")
    with pytest.raises(UnavailableError, match="no ready version"):
        repo.resolve("demo", "")


def test_the_served_names_follow_config_explicit_loads_and_unloads(tmp_path: Path) -> None:
    on_disk: dict[str, dict[int, Path]] = {"a": {}, "b": {}, "c": {}}
    everything = repository(tmp_path)
    assert everything.selected_names(on_disk) == ["a", "b", "c"]

    configured = repository(tmp_path, models=["b", "zeta"])
    assert configured.selected_names(on_disk) == ["b", "zeta"]  # zeta: reported missing
    configured._added.add("c")  # LoadModel("c") beyond the configured list
    configured._unloaded.add("b")  # UnloadModel("b") holds until it is loaded again
    assert configured.selected_names(on_disk) == ["c", "zeta"]


def test_health_needs_every_configured_model_or_any_one(tmp_path: Path) -> None:
    anything = repository(tmp_path)
    assert not anything.serving()
    serve(anything, "demo", 1)
    assert anything.serving()

    configured = repository(tmp_path, models=["demo", "digits"])
    serve(configured, "demo", 1)
    assert not configured.serving()  # digits is configured and not ready
    configured._unloaded.add("digits")  # unloaded on purpose: no longer required
    assert configured.serving()
