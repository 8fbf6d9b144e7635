"""The model repository's layout on disk, spelled out once: ``<root>/<name>/<version>/model.onnx``.

The server's repository scan, the exporter's publish, batch scoring's model argument and the
bench all go through these functions, so the layout can change in one place. Stdlib only:
the exporter (torch side) and the server (no torch) both import it.

Rules:
* a version is a folder whose name is a number (ASCII digits) and which holds ``model.onnx``;
* dot-folders (a publish in progress, editor droppings) are never versions; the exporter
  stages in one and renames it into place, so a version appears whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.onnx"


def is_version_name(name: str) -> bool:
    """``"3"`` yes; ``"3x"``, ``".3-in-progress"``, ``"latest"`` no."""
    return name.isascii() and name.isdigit()


def model_file(root: Path, name: str, version: int) -> Path:
    return root / name / str(version) / MODEL_FILE


def published_versions(model_dir: Path) -> dict[int, Path]:
    """Version → model file for every published version in one model's folder, ascending."""
    if not model_dir.is_dir():
        return {}
    found = {
        int(v.name): v / MODEL_FILE
        for v in model_dir.iterdir()
        if v.is_dir() and is_version_name(v.name) and (v / MODEL_FILE).is_file()
    }
    return dict(sorted(found.items()))


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """Model name → {version: model file} for every model with a published version."""
    found: dict[str, dict[int, Path]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        versions = published_versions(model_dir)
        if versions:
            found[model_dir.name] = versions
    return found


def next_version(root: Path, name: str) -> int:
    """The number a new version of ``name`` gets: one past every version folder there,
    published or not (a folder that failed to load still holds its number)."""
    folder = root / name
    taken = (
        [int(p.name) for p in folder.iterdir() if p.is_dir() and is_version_name(p.name)]
        if folder.is_dir()
        else []
    )
    return max(taken, default=0) + 1


def resolve_model_file(model: str | Path) -> Path:
    """What a user may name as "the model": a model file, ``<root>/NAME/N`` (that version),
    or ``<root>/NAME`` (its newest published version)."""
    path = Path(model)
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    versions = published_versions(path)
    if versions:
        return versions[max(versions)]
    raise FileNotFoundError(
        f"no model at {model}: expected a model file, or a folder NAME[/VERSION] holding "
        f"<version>/{MODEL_FILE}"
    )


def name_and_version(model: str | Path) -> tuple[str, str]:
    """``models/demo/3``, ``demo/3``, ``models/demo/3/model.onnx`` → ("demo", "3");
    ``models/demo``, ``demo`` → ("demo", ""), where "" means the server's newest."""
    parts = Path(model).parts
    if parts and parts[-1] == MODEL_FILE:
        parts = parts[:-1]
    if not parts:
        raise ValueError(f"not a model name: {str(model)!r}")
    if len(parts) >= 2 and is_version_name(parts[-1]):
        return parts[-2], parts[-1]
    return parts[-1], ""
