"""The repository layout: which folders are versions, and what a user's model path means."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.model.layout import (
    MODEL_FILE,
    is_version_name,
    model_file,
    name_and_version,
    next_version,
    published_versions,
    resolve_model_file,
    scan,
)


def publish(root: Path, name: str, version: str, content: bytes = b"onnx") -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(content)
    return folder / MODEL_FILE


def test_only_numbered_folders_holding_a_model_are_versions(tmp_path: Path) -> None:
    publish(tmp_path, "demo", "1")
    publish(tmp_path, "demo", "10")
    publish(tmp_path, "demo", "2")
    publish(tmp_path, "demo", ".3-in-progress")  # a publish in progress
    publish(tmp_path, "demo", "latest")
    (tmp_path / "demo" / "4").mkdir()  # no model file yet
    publish(tmp_path, ".trash", "1")
    publish(tmp_path, "other", "7")
    (tmp_path / "empty").mkdir()
    (tmp_path / "README").write_text("not a model")

    found = scan(tmp_path)
    assert list(found) == ["demo", "other"]
    assert list(found["demo"]) == [1, 2, 10]  # numeric order, not text order
    assert found["demo"][10] == model_file(tmp_path, "demo", 10)
    assert scan(tmp_path / "missing") == {}
    assert published_versions(tmp_path / "empty") == {}


def test_version_names() -> None:
    assert is_version_name("3") and is_version_name("12")
    for name in ("", "3x", ".3", "-1", "latest", "٣"):
        assert not is_version_name(name), name


def test_next_version_counts_unpublished_folders_too(tmp_path: Path) -> None:
    assert next_version(tmp_path, "demo") == 1
    publish(tmp_path, "demo", "1")
    (tmp_path / "demo" / "5").mkdir()  # a version that failed to publish keeps its number
    publish(tmp_path, "demo", ".6-staging")
    assert next_version(tmp_path, "demo") == 6


def test_a_model_path_resolves_to_a_file(tmp_path: Path) -> None:
    v1 = publish(tmp_path, "demo", "1")
    v2 = publish(tmp_path, "demo", "2")
    (tmp_path / "demo" / "3").mkdir()  # not published: never chosen as the newest
    assert resolve_model_file(tmp_path / "demo") == v2
    assert resolve_model_file(str(tmp_path / "demo" / "1")) == v1
    assert resolve_model_file(v1) == v1
    with pytest.raises(FileNotFoundError, match="NAME\\[/VERSION\\]"):
        resolve_model_file(tmp_path / "demo" / "3")
    with pytest.raises(FileNotFoundError):
        resolve_model_file(tmp_path / "nothing")


def test_name_and_version_of_a_model_argument() -> None:
    assert name_and_version("models/demo/3") == ("demo", "3")
    assert name_and_version("models/demo/3/model.onnx") == ("demo", "3")
    assert name_and_version("demo/3") == ("demo", "3")
    assert name_and_version("models/demo") == ("demo", "")
    assert name_and_version("demo") == ("demo", "")
    with pytest.raises(ValueError):
        name_and_version("")
