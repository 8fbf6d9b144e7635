"""``make gpu-bundle``: everything a bare CUDA 13 machine lacks to serve and measure us, in
parts that each fit one transfer to it.

The device image has Python 3.12, PyTorch, numpy, scipy, Pillow, onnx and the CUDA 13 and
cuDNN 9 libraries, and cannot download anything. The bundle brings:

* the cp312 manylinux wheels of ``requirements/serve.lock`` (less what the device image
  provides: ``DEVICE_PROVIDES``), of ``requirements/gpu.txt`` (onnxruntime-gpu in place of
  onnxruntime, nvImageCodec, nvJPEG) and of the few export and profiling tools the device
  run uses (``FROM_DEV_LOCK``), each re-zipped uncompressed so that the outer xz sees (and
  squeezes) the raw bytes;
* onnxruntime-gpu's CUDA provider slimmed to the device's GPU architecture
  (``bench.device.fatbin``: 284 MB, of which 141 MB are cubins for other GPUs);
* the generated protobuf code (the device has no grpcio-tools) and the demo checkpoint
  without its optimizer state (the device run exports it there).

Two archives, ``base`` (everything but onnxruntime-gpu, installable on its own, so the
device can start preparing while the rest travels) and ``ort``, xz-compressed and cut
into parts of at most ``--part-mib``. ``manifest.json`` lists the parts in the order to
send them, with every chunk's sha256; ``bench.device.receive`` reassembles them there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.device.fatbin import slim_fatbins

ROOT = Path(__file__).resolve().parents[2]
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
# In the device image already (KINDS.md's package list), large, and used by us through
# long-stable APIs: not carried. Everything else of the serving lock travels at our pins
# (our generated protobuf code needs our grpcio and protobuf, for one).
DEVICE_PROVIDES = frozenset({"numpy", "scipy", "pillow", "ml-dtypes", "onnxruntime", "onnx"})
# Pinned in requirements/dev.lock; the device run needs them and the device lacks them.
FROM_DEV_LOCK = ("onnxconverter-common", "py-spy")
# What the CUDA provider is slimmed to: sm_90, the H100 and H200.
DEFAULT_GPU_ARCH = 90
DEFAULT_PART_MIB = 56
ORT_WHEEL = "onnxruntime_gpu"
CUDA_PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
# nvImageCodec ships its Python module for every CPython from 3.9 to 3.14t: one is needed.
NVIMGCODEC_OTHER_PYTHONS = tuple(
    f"nvimgcodec_impl.cpython-{tag}-x86_64-linux-gnu.so"
    for tag in ("39", "310", "311", "313", "313t", "314", "314t")
)


def _pins(lock: Path) -> dict[str, str]:
    """name → 'name==version' from a uv-compiled lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name = line.split("==", 1)[0].split("[", 1)[0].strip().lower()
            pins[name] = line.split(";", 1)[0].strip()
    return pins


def requirements(root: Path = ROOT) -> list[str]:
    """The pinned requirements the bundle carries, in a stable order."""
    serve = _pins(root / "requirements" / "serve.lock")
    dev = _pins(root / "requirements" / "dev.lock")
    gpu = _pins(root / "requirements" / "gpu.txt")
    wanted = {name: pin for name, pin in serve.items() if name not in DEVICE_PROVIDES}
    for name in FROM_DEV_LOCK:
        wanted[name] = dev[name]
    for name, pin in gpu.items():
        if name not in DEVICE_PROVIDES:
            wanted[name] = pin
    return [wanted[name] for name in sorted(wanted)]


def download(specs: Iterable[str], dest: Path) -> list[Path]:
    """cp312 manylinux wheels of exactly these pins, without their dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        "cp" + PYTHON_VERSION.replace(".", ""),
        "--abi",
        "abi3",
        "--abi",
        "none",
        *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
        "--dest",
        str(dest),
        *specs,
    ]
    subprocess.run(command, check=True)
    return sorted(dest.glob("*.whl"))


Transform = Callable[[str, bytes], bytes | None]  # (member, data) → new data, or None: drop


def _record_line(name: str, data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    import base64

    encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return f"{name},sha256={encoded},{len(data)}"


def repack(wheel: Path, out: Path, transform: Transform | None = None) -> Path:
    """The wheel, uncompressed (ZIP_STORED), with ``transform`` applied and RECORD redone."""
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        record_name = next(n for n in source.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in source.infolist():
            if info.filename == record_name or info.is_dir():
                continue
            data = source.read(info.filename)
            if transform is not None:
                changed = transform(info.filename, data)
                if changed is None:
                    continue
                data = changed
            member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            member.external_attr = info.external_attr
            dst.writestr(member, data)
            lines.append(_record_line(info.filename, data))
        lines.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(lines) + "\n")
    return target


def slim_ort(gpu_arch: int | None, log: Callable[[str], None]) -> Transform:
    def transform(name: str, data: bytes) -> bytes | None:
        if name == CUDA_PROVIDER and gpu_arch is not None:
            slim = bytearray(data)
            log(f"{name}: {slim_fatbins(slim, gpu_arch).summary()}")
            return bytes(slim)
        return data

    return transform


def slim_nvimgcodec(name: str, data: bytes) -> bytes | None:
    return None if name.endswith(NVIMGCODEC_OTHER_PYTHONS) else data


def slim_checkpoint(checkpoint: Path) -> bytes:
    """The checkpoint without what only ``--resume`` reads (the optimizer is 2/3 of it)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("optimizer", "scheduler", "scaler"):
        state.pop(key, None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@dataclass
class Archive:
    name: str
    path: Path


def _xz(source: Path, target: Path) -> None:
    """xz -6, on every core when the xz tool is there (Python's lzma uses one)."""
    if shutil.which("xz"):
        with open(target, "wb") as out:
            subprocess.run(["xz", "-6", "-T0", "-c", str(source)], stdout=out, check=True)
    else:
        with open(source, "rb") as src, lzma.open(target, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _tar(folder: Path, target: Path) -> None:
    with tarfile.open(target, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_into_parts(archives: list[Archive], out: Path, part_bytes: int) -> list[dict[str, Any]]:
    """Archives in order, cut into chunks filling parts of at most ``part_bytes``."""
    parts: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    room = part_bytes

    def close() -> None:
        nonlocal current, room
        if current:
            parts.append({"name": f"part-{len(parts) + 1}", "chunks": current})
        current, room = [], part_bytes

    for archive in archives:
        data_size = archive.path.stat().st_size
        offset, index = 0, 0
        with open(archive.path, "rb") as handle:
            while offset < data_size:
                if room == 0:
                    close()
                take = min(room, data_size - offset)
                name = f"{archive.name}.tar.xz.{index:03d}"
                folder = out / f"part-{len(parts) + 1}"
                folder.mkdir(parents=True, exist_ok=True)
                data = handle.read(take)
                (folder / name).write_bytes(data)
                current.append(
                    {
                        "file": name,
                        "archive": archive.name,
                        "index": index,
                        "bytes": take,
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
                offset += take
                room -= take
                index += 1
    close()
    return parts


def build_bundle(
    out: Path,
    *,
    gpu_arch: int | None = DEFAULT_GPU_ARCH,
    part_mib: int = DEFAULT_PART_MIB,
    wheel_cache: Path | None = None,
    checkpoint: Path | None = ROOT / "runs" / "demo" / "best.pt",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the bundle to ``out`` (replacing it) and return its manifest."""
    proto_gen = ROOT / "service" / "proto_gen"
    if not (proto_gen / "classifier" / "v1" / "classifier_pb2.py").is_file():
        raise SystemExit("no generated protobuf code: run `make proto` first")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    specs = requirements()
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as scratch_name:
        scratch = Path(scratch_name)
        wheels = download(specs, wheel_cache or scratch / "downloads")
        log(f"{len(wheels)} wheels for {len(specs)} pins")
        base, ort = scratch / "base", scratch / "ort"
        for folder in (base / "wheels", ort / "wheels"):
            folder.mkdir(parents=True)
        for wheel in wheels:
            if wheel.name.startswith(ORT_WHEEL):
                repack(wheel, ort / "wheels", slim_ort(gpu_arch, log))
            elif wheel.name.startswith("nvidia_nvimgcodec"):
                repack(wheel, base / "wheels", slim_nvimgcodec)
            else:
                repack(wheel, base / "wheels")
        shutil.copytree(proto_gen, base / "proto_gen", ignore=shutil.ignore_patterns("__pycache__"))
        if checkpoint is not None and checkpoint.is_file():
            (base / "artifacts").mkdir()
            (base / "artifacts" / "demo-best.pt").write_bytes(slim_checkpoint(checkpoint))
        archives = []
        for name, folder in (("base", base), ("ort", ort)):
            tar = scratch / f"{name}.tar"
            _tar(folder, tar)
            _xz(tar, scratch / f"{name}.tar.xz")
            archives.append(Archive(name, scratch / f"{name}.tar.xz"))
            log(
                f"{name}: {tar.stat().st_size / 1e6:.1f} MB tar, "
                f"{(scratch / f'{name}.tar.xz').stat().st_size / 1e6:.1f} MB xz"
            )
        parts = split_into_parts(archives, out, part_mib * 1024 * 1024)
        manifest = {
            "python": PYTHON_VERSION,
            "gpu_arch": gpu_arch,
            "requirements": specs,
            "archives": {
                a.name: {"sha256": _sha256(a.path), "bytes": a.path.stat().st_size}
                for a in archives
            },
            "parts": parts,
        }
    text = json.dumps(manifest, indent=1) + "\n"
    (out / "manifest.json").write_text(text)
    for part in parts:
        (out / str(part["name"]) / "manifest.json").write_text(text)
    return manifest


def plan(manifest: dict[str, Any]) -> str:
    """The transfers, in order, as the device tool's calls."""
    lines = ["send in this order, each within the warm window of the one before:"]
    parts = manifest["parts"]
    assert isinstance(parts, list)
    for part in parts:
        size = sum(int(c["bytes"]) for c in part["chunks"]) / 2**20
        lines.append(
            f"  {part['name']}: {size:.1f} MiB  carry .gpu-bundle/{part['name']}  "
            f"run: bash bench/device/device.sh receive .gpu-bundle/{part['name']}"
        )
    lines.append("then, with the last part: bash bench/device/device.sh run $OUT")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device.bundle", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    parser.add_argument(
        "--gpu-arch",
        default=str(DEFAULT_GPU_ARCH),
        help="keep only this architecture's cubins in the CUDA provider (90: H100/H200; all: "
        "keep every one)",
    )
    parser.add_argument("--part-mib", type=int, default=DEFAULT_PART_MIB)
    parser.add_argument("--wheel-cache", type=Path, help="download the wheels here (reused)")
    args = parser.parse_args(argv)
    arch = None if args.gpu_arch == "all" else int(args.gpu_arch)
    manifest = build_bundle(
        args.out, gpu_arch=arch, part_mib=args.part_mib, wheel_cache=args.wheel_cache
    )
    print(plan(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
