"""Dataset indexing: ImageFolder + box manifests, and what happens to bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.model.spec import Preprocessing, ResizeMode
from training.data import (
    ImageDataset,
    collate_skipping_failures,
    load_dataset,
    read_box_manifest,
)
from training.presets import eval_transform


def _image(path: Path, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path, format=fmt)


def _folder(root: Path) -> None:
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(2):
                _image(root / split / cls / f"{i}.png")


def test_image_folder_classes_and_counts(tmp_path: Path) -> None:
    _folder(tmp_path)
    index = load_dataset(tmp_path)
    assert index.classes == ["cat", "dog"]
    assert not index.with_boxes
    assert index.splits["train"].class_counts(2) == [2, 2]
    assert [s.label for s in index.splits["val"].samples] == [0, 0, 1, 1]


def test_corrupt_and_foreign_files_are_skipped_and_reported(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("hello")
    index = load_dataset(tmp_path)
    train = index.splits["train"]
    assert len(train.samples) == 4
    reasons = dict(train.skipped)
    assert "unreadable image" in reasons[str(tmp_path / "train" / "cat" / "broken.jpg")]
    assert str(tmp_path / "train" / "dog" / "notes.txt") in reasons
    report = index.report()
    assert len(report["splits"]["train"]["skipped"]) == 2


def test_csv_manifest_makes_a_localization_dataset(tmp_path: Path) -> None:
    _folder(tmp_path)
    rows = ["path,label,x_min,y_min,x_max,y_max"]
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(2):
                rows.append(f"{split}/{cls}/{i}.png,{cls},1,2,30,20")
    # One row with the wrong label, one image without a row, one inverted box.
    rows[1] = "train/cat/0.png,dog,1,2,30,20"
    rows = [r for r in rows if not r.startswith("train/dog/1.png")]
    rows = [r if not r.startswith("val/dog/0.png") else "val/dog/0.png,dog,30,2,1,20" for r in rows]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    index = load_dataset(tmp_path)
    assert index.with_boxes
    assert len(index.splits["train"].samples) == 2
    reasons = " ".join(r for _, r in index.splits["train"].skipped)
    assert "manifest label 'dog' != folder 'cat'" in reasons
    assert "no row in the box manifest" in reasons
    assert "inverted" in index.splits["val"].skipped[0][1]
    assert index.splits["train"].samples[0].box == (1.0, 2.0, 30.0, 20.0)


def test_jsonl_manifest(tmp_path: Path) -> None:
    path = tmp_path / "boxes.jsonl"
    path.write_text(
        json.dumps(
            {"path": "a/b.png", "label": "x", "x_min": 1, "y_min": 2, "x_max": 3, "y_max": 4}
        )
        + "\n\n"
    )
    assert read_box_manifest(path) == {"a/b.png": ("x", (1.0, 2.0, 3.0, 4.0))}


def test_manifest_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text("path,label,x_min,y_min,x_max,y_max\na.png,x,1,2,3,4\nb.png,x,1,,3,4\n")
    with pytest.raises(ValueError, match=r"boxes.csv:3: missing field\(s\) y_min"):
        read_box_manifest(path)


def test_missing_root_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folders"):
        load_dataset(tmp_path)


def test_file_that_fails_at_decode_time_is_dropped_from_its_batch(tmp_path: Path) -> None:
    _folder(tmp_path)
    # A truncated JPEG passes the header check during indexing but fails to decode.
    good = tmp_path / "train" / "cat" / "trunc.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    index = load_dataset(tmp_path)
    samples = index.splits["train"].samples
    assert any(s.path == good for s in samples)
    prep = Preprocessing(resize_mode=ResizeMode.STRETCH, resize_size=32)
    dataset = ImageDataset(samples, eval_transform(prep, 32, 32), with_boxes=False)
    batch = collate_skipping_failures([dataset[i] for i in range(len(dataset))])
    assert batch is not None
    images, labels, _ = batch
    assert images.shape == (len(samples) - 1, 3, 32, 32)
    assert len(labels) == len(samples) - 1
