"""One output row per input image, and its conversions to tables and text formats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from service.model.results import Box, Prediction


@dataclass
class Row:
    path: str
    labels: list[str]
    scores: list[float]
    indices: list[int]
    box: Box | None = None
    box_source: str | None = None
    model: str = ""
    version: str = ""
    error: str | None = None

    @classmethod
    def from_predictions(
        cls,
        path: str,
        predictions: list[Prediction],
        model: str,
        version: str,
        box: Box | None = None,
        box_source: str | None = None,
    ) -> Row:
        return cls(
            path,
            [p.label for p in predictions],
            [float(p.score) for p in predictions],
            [p.index for p in predictions],
            box,
            box_source,
            model,
            version,
        )

    @classmethod
    def failed(cls, path: str, error: str, model: str, version: str) -> Row:
        return cls(path, [], [], [], None, None, model, version, error)


SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("indices", pa.list_(pa.int32())),
        ("box_x_min", pa.float32()),
        ("box_y_min", pa.float32()),
        ("box_x_max", pa.float32()),
        ("box_y_max", pa.float32()),
        ("box_score", pa.float32()),
        ("box_source", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("error", pa.string()),
    ]
)


def to_record(row: Row) -> dict[str, Any]:
    box = row.box
    return {
        "path": row.path,
        "labels": row.labels,
        "scores": row.scores,
        "indices": row.indices,
        "box_x_min": box.x_min if box else None,
        "box_y_min": box.y_min if box else None,
        "box_x_max": box.x_max if box else None,
        "box_y_max": box.y_max if box else None,
        "box_score": box.score if box else None,
        "box_source": row.box_source,
        "model": row.model,
        "version": row.version,
        "error": row.error,
    }


def from_record(record: dict[str, Any]) -> Row:
    box = None
    if record.get("box_x_min") is not None:
        box = Box(
            record["box_x_min"],
            record["box_y_min"],
            record["box_x_max"],
            record["box_y_max"],
            record["box_score"],
        )
    return Row(
        record["path"],
        list(record["labels"]),
        list(record["scores"]),
        list(record["indices"]),
        box,
        record["box_source"],
        record["model"],
        record["version"],
        record["error"],
    )


def to_table(rows: list[Row]) -> pa.Table:
    return pa.Table.from_pylist([to_record(r) for r in rows], schema=SCHEMA)


def to_flat(record: dict[str, Any]) -> dict[str, Any]:
    """A record for CSV: list columns as JSON text."""
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()}
