"""What to score: a folder (recursive), a glob, or a manifest of paths (CSV/Parquet/text).

The list is sorted and fixed at the start of a job; its fingerprint goes into the job
manifest so a resumed run can tell whether it is still scoring the same inputs.
"""

from __future__ import annotations

import csv
import glob
import hashlib
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _from_manifest(path: Path) -> list[str]:
    base = path.parent
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["path"])
        entries = [str(p) for p in table.column("path").to_pylist()]
    elif path.suffix == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"{path}: a CSV manifest needs a 'path' column")
            entries = [row["path"] for row in reader]
    else:  # one path per line
        entries = [line.strip() for line in path.read_text().splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    return [str(p if Path(p).is_absolute() else base / p) for p in entries]


def list_inputs(source: str) -> list[str]:
    """Paths to score, sorted for folders and globs, in file order for manifests."""
    path = Path(source)
    if path.is_dir():
        found = [
            str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        return sorted(found)
    if path.is_file() and path.suffix.lower() in {".csv", ".parquet", ".txt", ".lst"}:
        return _from_manifest(path)
    if any(ch in source for ch in "*?["):
        return sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"input {source!r} is not a folder, a manifest, a glob or a file")


def fingerprint(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.encode())
        digest.update(b"\0")
    return digest.hexdigest()
