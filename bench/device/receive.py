"""On the device: take in one part of the GPU bundle (``bench.device.bundle``) and install
whatever archive is now complete. Standard library only: it runs before anything is
installed.

    python3 -m bench.device.receive .gpu-bundle/part-1 --work /tmp/imgclf-device

Chunks are moved out of the working tree into ``WORK/chunks`` (the next call's transfer
does not carry them again), checked against the manifest's sha256, and each archive whose
chunks are all there is joined, unpacked and installed once: its wheels with ``pip
--no-index --no-deps`` into WORK/site, the generated protobuf code into
``service/proto_gen``, artifacts into ``WORK/artifacts``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def take_part(part: Path, work: Path) -> dict[str, Any]:
    manifest = json.loads((part / "manifest.json").read_text())
    chunks = work / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    (work / "manifest.json").write_text(json.dumps(manifest))
    for path in sorted(part.iterdir()):
        if path.name != "manifest.json":
            shutil.move(str(path), chunks / path.name)
    return manifest  # type: ignore[no-any-return]


def complete_archives(manifest: dict[str, Any], work: Path) -> list[str]:
    """Archives whose every chunk is in WORK/chunks and which are not installed yet."""
    wanted: dict[str, list[dict[str, Any]]] = {}
    for part in manifest["parts"]:  # type: ignore[attr-defined]
        for chunk in part["chunks"]:
            wanted.setdefault(str(chunk["archive"]), []).append(chunk)
    ready = []
    for name, chunks in wanted.items():
        done = work / f"{name}.installed"
        if not done.exists() and all((work / "chunks" / str(c["file"])).is_file() for c in chunks):
            ready.append(name)
    return ready


def join(manifest: dict[str, Any], name: str, work: Path) -> Path:
    chunks = [
        c
        for part in manifest["parts"]  # type: ignore[attr-defined]
        for c in part["chunks"]
        if c["archive"] == name
    ]
    target = work / f"{name}.tar.xz"
    with open(target, "wb") as out:
        for chunk in sorted(chunks, key=lambda c: int(c["index"])):
            data = (work / "chunks" / str(chunk["file"])).read_bytes()
            if _sha256(data) != chunk["sha256"]:
                raise SystemExit(f"{chunk['file']}: sha256 mismatch (a broken transfer)")
            out.write(data)
    expected = manifest["archives"][name]["sha256"]  # type: ignore[index]
    if _sha256(target.read_bytes()) != expected:
        raise SystemExit(f"{name}.tar.xz: sha256 mismatch after joining")
    return target


def merge_into(source: Path, target: Path) -> None:
    """Move ``source``'s tree into ``target``, folders merged, files replaced."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink() and destination.is_dir():
            merge_into(entry, destination)
        else:
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
    source.rmdir()


def install(archive: Path, name: str, work: Path, python: str) -> None:
    unpacked = work / "unpacked" / name
    if unpacked.exists():
        shutil.rmtree(unpacked)
    unpacked.mkdir(parents=True)
    with lzma.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        tar.extractall(unpacked, filter="data")
    wheels = sorted((unpacked / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--target",
                str(unpacked / "site"),
                *map(str, wheels),
            ],
            check=True,
        )
        shutil.rmtree(unpacked / "wheels")
        # Merged, not pip's --upgrade into one target: that replaces a top-level folder
        # two archives share (bin/: the base's py-spy went when onnxruntime-gpu came).
        merge_into(unpacked / "site", work / "site")
    if (unpacked / "proto_gen").is_dir():
        target = ROOT / "service" / "proto_gen"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(unpacked / "proto_gen", target)
    if (unpacked / "artifacts").is_dir():
        shutil.copytree(unpacked / "artifacts", work / "artifacts", dirs_exist_ok=True)
    archive.unlink()
    (work / f"{name}.installed").write_text(f"{len(wheels)} wheels\n")
    print(f"installed {name}: {len(wheels)} wheels", flush=True)


# onnxruntime-gpu 1.31 links these (and loads cuDNN and cuFFT when needed); nvImageCodec
# loads nvJPEG.
GPU_LIBRARIES = (
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
    "libnvjpeg.so.13",
)
PROBED_PACKAGES = (
    "torch",
    "numpy",
    "pillow",
    "onnx",
    "grpcio",
    "protobuf",
    "onnxruntime",
    "onnxruntime-gpu",
)


def probe() -> None:
    """Which GPU libraries load here, and the machine's versions of what we rely on."""
    import ctypes
    import importlib.metadata as metadata

    for name in GPU_LIBRARIES:
        try:
            ctypes.CDLL(name)
            print(f"{name}: loads")
        except OSError as exc:
            print(f"{name}: MISSING ({exc})")
    for dist in PROBED_PACKAGES:
        try:
            print(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist}: not installed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.device.receive")
    parser.add_argument(
        "part", type=Path, nargs="?", help="a part folder as carried (.gpu-bundle/part-N)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf-device"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--probe", action="store_true", help="only report the GPU libraries")
    args = parser.parse_args(argv)
    if args.probe or args.part is None:
        probe()
        return 0
    started = time.monotonic()
    manifest = take_part(args.part, args.work)
    for name in complete_archives(manifest, args.work):
        install(join(manifest, name, args.work), name, args.work, args.python)
    waiting = [
        p["name"]
        for p in manifest["parts"]  # type: ignore[attr-defined]
        if not all((args.work / "chunks" / c["file"]).is_file() for c in p["chunks"])
    ]
    print(
        f"received {args.part.name} in {time.monotonic() - started:.1f} s; "
        f"parts still to come: {waiting or 'none'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
