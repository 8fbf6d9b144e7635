"""Scoring inputs and output formats (the job logic itself runs in the integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.scoring.job import JobError, output_format
from service.scoring.sources import find_inputs, fingerprint, list_inputs


def test_folders_globs_and_single_files(tmp_path: Path) -> None:
    for name in ("b/2.jpg", "a/1.PNG", "a/notes.txt", "c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert list_inputs(str(tmp_path)) == [
        str(tmp_path / n) for n in ("a/1.PNG", "b/2.jpg", "c.webp")
    ]
    assert list_inputs(str(tmp_path / "**" / "*.jpg")) == [str(tmp_path / "b/2.jpg")]
    assert list_inputs(str(tmp_path / "c.webp")) == [str(tmp_path / "c.webp")]
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "missing"))


def test_manifest_paths_are_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("# comment\nx/1.jpg\n\n/abs/2.jpg\n")
    assert list_inputs(str(tmp_path / "list.txt")) == [str(tmp_path / "x/1.jpg"), "/abs/2.jpg"]
    (tmp_path / "bad.csv").write_text("file\nx.jpg\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_inputs(str(tmp_path / "bad.csv"))


def test_fingerprint_changes_with_the_list() -> None:
    assert fingerprint(["a", "b"]) == fingerprint(["a", "b"])
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["ab"]) != fingerprint(["a", "b"])


def test_output_formats() -> None:
    assert output_format(Path("out.csv"), None) == "csv"
    assert output_format(Path("out.jsonl"), None) == "jsonl"
    assert output_format(Path("out"), None) == "parquet"
    with pytest.raises(JobError):
        output_format(Path("out"), "xlsx")


def test_a_folders_other_files_are_counted_or_included(tmp_path: Path) -> None:
    for name in ("1.jpg", "random.bin", "svg.svg", ".DS_Store", ".cache/x.jpg", "sub/2.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = find_inputs(str(tmp_path))
    images = [str(tmp_path / n) for n in (".cache/x.jpg", "1.jpg", "sub/2.png")]
    assert found.paths == images  # as before: every image file, hidden folders too
    assert found.not_images == [str(tmp_path / "random.bin"), str(tmp_path / "svg.svg")]
    line = found.skipped_line()
    assert line is not None and "skipped 2 files" in line and "random.bin, svg.svg" in line
    everything = find_inputs(str(tmp_path), include_all_files=True)
    assert everything.not_images == []
    assert everything.paths == sorted(
        [*images, str(tmp_path / "random.bin"), str(tmp_path / "svg.svg")]
    )
