"""What to score: a folder (recursive), a glob, or a manifest of paths (CSV/Parquet/text).

The list is sorted and fixed at the start of a job; its fingerprint goes into the job
manifest so a resumed run can tell whether it is still scoring the same inputs.
"""

from __future__ import annotations

import csv
import glob
import hashlib
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Inputs:
    """The paths to score, and the files a folder held that are not scored."""

    paths: list[str]
    # Files in a scanned folder without an image suffix (hidden ones are not counted).
    not_images: list[str] = field(default_factory=list)

    def skipped_line(self, shown: int = 5) -> str | None:
        """What the summary says about ``not_images`` (None when there are none)."""
        if not self.not_images:
            return None
        names = ", ".join(Path(p).name for p in self.not_images[:shown])
        more = f" and {len(self.not_images) - shown} more" if len(self.not_images) > shown else ""
        return (
            f"skipped {len(self.not_images)} files without an image suffix ({names}{more}); "
            "--include-all-files scores them (as error rows if they are not images)"
        )


def find_inputs(source: str, include_all_files: bool = False) -> Inputs:
    """Paths to score, sorted for folders and globs, in file order for manifests. A
    folder's files without an image suffix are listed apart, or scored with the rest when
    ``include_all_files`` (a file that is not an image then gets an error row)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file())
        images = {p for p in files if Path(p).suffix.lower() in IMAGE_SUFFIXES}
        # Hidden non-image files (.DS_Store, .git/…) are nobody's input.
        others = [p for p in files if p not in images and not _hidden(p, path)]
        if include_all_files:
            return Inputs(sorted(images.union(others)))
        return Inputs(sorted(images), others)
    if path.is_file() and path.suffix.lower() in {".csv", ".parquet", ".txt", ".lst"}:
        return Inputs(_from_manifest(path))
    if any(ch in source for ch in "*?["):
        return Inputs(sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file()))
    if path.is_file():
        return Inputs([str(path)])
    raise FileNotFoundError(f"input {source!r} is not a folder, a manifest, a glob or a file")


def _hidden(path: str, root: Path) -> bool:
    return any(part.startswith(".") for part in Path(path).relative_to(root).parts)


def list_inputs(source: str) -> list[str]:
    """The paths ``find_inputs`` would score."""
    return find_inputs(source).paths


def fingerprint(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.encode())
        digest.update(b"\0")
    return digest.hexdigest()
