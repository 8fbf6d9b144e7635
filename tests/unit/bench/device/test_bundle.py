"""The GPU bundle's parts: what it carries, wheels re-zipped with a correct RECORD, parts
within their size, and the device side joining them back and installing what is whole."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from bench.device import receive
from bench.device.bundle import (
    DEVICE_PROVIDES,
    Archive,
    repack,
    requirements,
    slim_nvimgcodec,
    split_into_parts,
)


def test_the_bundle_carries_the_gpu_runtime_and_what_the_device_lacks() -> None:
    pins = requirements()
    names = {pin.split("==")[0] for pin in pins}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert {"nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "grpcio", "protobuf", "pydantic"} <= names
    assert {"tritonclient", "onnxconverter-common", "py-spy"} <= names
    assert not names & DEVICE_PROVIDES  # numpy, scipy, Pillow... are the device's own
    assert all("==" in pin for pin in pins)  # every one at the locks' version


def make_wheel(path: Path, files: dict[str, bytes], package: str = "demo_pkg") -> Path:
    dist = f"{package}-1.0.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(
            f"{dist}/METADATA",
            f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 1.0\n",
        )
        wheel.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{dist}/RECORD", "stale,,\n")
    return path


def test_repack_stores_uncompressed_applies_the_transform_and_redoes_record(tmp_path: Path) -> None:
    wheel = make_wheel(
        tmp_path / "demo_pkg-1.0-py3-none-any.whl",
        {
            "demo_pkg/__init__.py": b"X = 1\n",
            "demo_pkg/nvimgcodec_impl.cpython-311-x86_64-linux-gnu.so": b"other python",
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    repacked = repack(wheel, out, slim_nvimgcodec)
    with zipfile.ZipFile(repacked) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        names = z.namelist()
        record = z.read("demo_pkg-1.0.dist-info/RECORD").decode().splitlines()
        init = z.read("demo_pkg/__init__.py")
    assert not any("cpython-311" in n for n in names)  # dropped, and out of RECORD
    digest = base64.urlsafe_b64encode(hashlib.sha256(init).digest()).rstrip(b"=").decode()
    assert f"demo_pkg/__init__.py,sha256={digest},{len(init)}" in record
    assert not any("cpython-311" in line or line.startswith("stale") for line in record)
    # pip accepts it
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--target",
            str(tmp_path / "site"),
            str(repacked),
        ],
        check=True,
    )
    assert (tmp_path / "site" / "demo_pkg" / "__init__.py").read_bytes() == b"X = 1\n"


def xz_tar(path: Path, files: dict[str, bytes]) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(lzma.compress(buffer.getvalue()))
    return path


def test_parts_fit_their_size_and_the_device_joins_and_installs_each_archive_once_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    # Each archive's wheel has a script: both land in site/bin (py-spy and ORT's tool do).
    wheel = make_wheel(
        tmp_path / "demo_pkg-1.0-py3-none-any.whl",
        {"demo_pkg/__init__.py": b"", "demo_pkg-1.0.data/scripts/demo-tool": b"#!/bin/sh\n"},
    )
    other_wheel = make_wheel(
        tmp_path / "other_pkg-1.0-py3-none-any.whl",
        {"other_pkg/__init__.py": b"", "other_pkg-1.0.data/scripts/other-tool": b"#!/bin/sh\n"},
        package="other_pkg",
    )
    noise = os.urandom(30_000)  # incompressible: the archive stays larger than a part
    base = xz_tar(
        tmp_path / "base.tar.xz",
        {f"wheels/{wheel.name}": wheel.read_bytes(), "artifacts/blob": noise},
    )
    other = xz_tar(
        tmp_path / "ort.tar.xz",
        {
            f"wheels/{other_wheel.name}": other_wheel.read_bytes(),
            "artifacts/other": os.urandom(5_000),
        },
    )
    bundle = tmp_path / "bundle"
    parts = split_into_parts([Archive("base", base), Archive("ort", other)], bundle, 16_000)
    assert len(parts) >= 3
    for part in parts:
        assert sum(int(c["bytes"]) for c in part["chunks"]) <= 16_000
    manifest: dict[str, Any] = {
        "parts": parts,
        "archives": {
            a.name: {"sha256": hashlib.sha256(a.path.read_bytes()).hexdigest()}
            for a in (Archive("base", base), Archive("ort", other))
        },
    }
    for part in parts:
        (bundle / str(part["name"]) / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(receive, "ROOT", tmp_path / "repo")
    work = tmp_path / "work"
    installed: list[str] = []
    for part in parts:
        taken = receive.take_part(bundle / str(part["name"]), work)
        for name in receive.complete_archives(taken, work):
            receive.install(receive.join(taken, name, work), name, work, sys.executable)
            installed.append(name)
        assert not any((bundle / str(part["name"])).glob("*.xz.*"))  # moved out of the tree
    assert installed == ["base", "ort"]
    assert (work / "site" / "demo_pkg" / "__init__.py").is_file()
    assert (work / "site" / "other_pkg" / "__init__.py").is_file()
    assert sorted(p.name for p in (work / "site" / "bin").iterdir()) == ["demo-tool", "other-tool"]
    assert (work / "artifacts" / "blob").read_bytes() == noise
    assert receive.complete_archives(manifest, work) == []  # nothing is installed twice


def test_a_corrupted_chunk_is_refused(tmp_path: Path) -> None:
    archive = xz_tar(tmp_path / "base.tar.xz", {"artifacts/a": b"x" * 100})
    parts = split_into_parts([Archive("base", archive)], tmp_path / "b", 1 << 20)
    manifest: dict[str, Any] = {"parts": parts, "archives": {"base": {"sha256": "0"}}}
    chunk = tmp_path / "b" / "part-1" / str(parts[0]["chunks"][0]["file"])  # type: ignore[index]
    chunk.write_bytes(b"broken")
    (tmp_path / "b" / "part-1" / "manifest.json").write_text(json.dumps(manifest))
    taken = receive.take_part(tmp_path / "b" / "part-1", tmp_path / "work")
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        receive.join(taken, "base", tmp_path / "work")
