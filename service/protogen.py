"""Generate the gRPC Python code from proto/ into service/proto_gen/ (never committed).

    python -m service.protogen [--check]

Run by ``make setup``/``make proto`` and by the Dockerfile's builder stage; needs
grpcio-tools (a dev dependency). The proto is compiled under the virtual path
``service/proto_gen/`` so that the generated modules import each other as
``service.proto_gen.classifier.v1`` instead of a top-level ``classifier`` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "service/proto_gen"
PROTOS = ["classifier/v1/classifier.proto"]


def outputs() -> list[Path]:
    out = []
    for proto in PROTOS:
        stem = ROOT / PACKAGE / proto.removesuffix(".proto")
        out += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2_grpc.py"), Path(f"{stem}_pb2.pyi")]
    return out


def up_to_date() -> bool:
    sources = [PROTO_ROOT / p for p in PROTOS]
    newest = max(p.stat().st_mtime for p in sources)
    return all(p.is_file() and p.stat().st_mtime >= newest for p in outputs())


def generate() -> None:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[f"{PACKAGE}/{p}" for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages (not namespace packages), so type checkers and setuptools see them.
    for proto in PROTOS:
        folder = ROOT / PACKAGE
        for part in Path(proto).parent.parts:
            (folder / "__init__.py").touch()
            folder = folder / part
        (folder / "__init__.py").touch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.protogen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the code is stale")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if up_to_date() else 1
    if args.force or not up_to_date():
        generate()
        print(f"generated {', '.join(str(p.relative_to(ROOT)) for p in outputs())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
