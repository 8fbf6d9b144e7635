"""The import layers of service/ (pyproject's ``[tool.importlinter]``, run by ``make
lint``): every contract holds on the tree, each one fails when an import breaks it, and the
forbidden lists name every module they must, so a new module cannot slip past them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {contract["id"]: contract for contract in CONFIG["contracts"]}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def service_children() -> set[str]:
    """Every module and package directly under service/ (generated code included)."""
    children = {f"service.{p.stem}" for p in (ROOT / "service").glob("*.py")}
    children |= {
        f"service.{p.name}"
        for p in (ROOT / "service").iterdir()
        if p.is_dir() and (p / "__init__.py").exists()
    }
    children |= {"service.proto_gen"}  # built by make setup; absent from a bare checkout
    return children - {"service.__init__"}


def forbidden(contract_id: str) -> set[str]:
    return set(CONTRACTS[contract_id]["forbidden_modules"])


def test_training_and_the_model_contract_are_kept_from_everything_else_of_service() -> None:
    everything_but_the_model = service_children() - {"service.model"}
    assert forbidden("training-uses-model-only") == everything_but_the_model
    assert forbidden("model-stands-alone") == everything_but_the_model


def test_the_client_is_kept_from_every_server_module() -> None:
    allowed = {"service.model", "service.client", "service.proto_gen"}
    assert forbidden("client-without-server") == service_children() - allowed


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """service/ and training/ as Python sources only, where imports can be broken."""
    tree = tmp_path_factory.mktemp("layers")
    for package in ("service", "training"):
        shutil.copytree(
            ROOT / package,
            tree / package,
            ignore=lambda _, names: [n for n in names if n == "__pycache__" or n == "static"],
        )
    return tree


def test_every_contract_holds_on_the_tree(source_copy: Path) -> None:
    result = lint_imports(source_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract_id"),
    [
        ("training/export.py", "import service.server.main", "training-uses-model-only"),
        ("service/model/runner.py", "import service.server.config", "model-stands-alone"),
        ("service/client/core.py", "import service.server.repository", "client-without-server"),
        ("service/server/online.py", "import torch", "service-without-torch"),
    ],
)
def test_each_contract_fails_when_an_import_breaks_it(
    source_copy: Path, module: str, line: str, contract_id: str
) -> None:
    path = source_copy / module
    original = path.read_text()
    try:
        path.write_text(f"{original}\n{line}  # breaks the layer\n")
        result = lint_imports(source_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert f"{CONTRACTS[contract_id]['name']} BROKEN" in result.stdout, result.stdout
