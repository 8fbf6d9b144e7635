"""Slim a CUDA library to the one GPU architecture it will run on.

onnxruntime-gpu's CUDA provider (284 MB) is mostly ``.nv_fatbin``: every kernel compiled
for sm_75, 80, 86, 89, 90 and 120. The CUDA driver loads, from each fat binary, the cubin
built for the device's own architecture (a cubin runs only on its own major version), so
on an H100/H200 (sm_90) the others are dead weight. This zeroes their payloads in place:
headers, offsets and the file's size stay as they were, nothing is relinked, and runs of
zeros compress to nothing, so the library travels at about a third of its size.

Conservative by construction: a fat binary with no cubin for the kept architecture is left
whole (whatever the driver would do with it, it still can), and PTX entries are never
touched (the driver may JIT them).

Fat binary layout (as cuobjdump reads it): a 16-byte header ``magic 0xBA55ED50, u16
version, u16 header size, u64 size of the entries``, then entries, each ``u16 kind (1 PTX,
2 ELF), u16 version, u32 header size, u64 padded payload size, ..., u32 sm arch at byte
28``, followed by its payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
_SECTION = b".nv_fatbin"


@dataclass
class SlimReport:
    fatbins: int = 0
    kept_whole: int = 0  # fat binaries without a cubin for the kept architecture
    zeroed_bytes: int = 0
    kept_bytes: int = 0
    archs: dict[int, int] = field(default_factory=dict)  # sm -> cubins seen

    def summary(self) -> str:
        return (
            f"{self.fatbins} fat binaries ({self.kept_whole} kept whole), "
            f"{self.zeroed_bytes / 1e6:.1f} MB of other architectures zeroed, "
            f"{self.kept_bytes / 1e6:.1f} MB kept; cubins by sm: {dict(sorted(self.archs.items()))}"
        )


def fatbin_section(data: bytes | bytearray) -> tuple[int, int] | None:
    """(offset, size) of the ``.nv_fatbin`` section of an ELF64 little-endian file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    for index in range(shnum):
        name, offset, size = header(index)
        end = data.index(b"\0", strtab + name)
        if bytes(data[strtab + name : end]) == _SECTION:
            return offset, size
    return None


def _entries(data: bytearray, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(kind, sm, payload offset, payload size) of one fat binary's entries."""
    out = []
    pos = start
    while pos + 32 <= end:
        kind, _, header_size, padded = struct.unpack_from("<HHIQ", data, pos)
        sm = struct.unpack_from("<I", data, pos + 28)[0]
        if header_size < 32 or pos + header_size + padded > end:
            raise ValueError(f"malformed fat binary entry at {pos:#x}")
        out.append((kind, sm, pos + header_size, padded))
        pos += header_size + padded
    return out


def slim_fatbins(data: bytearray, keep_sm: int) -> SlimReport:
    """Zero, in place, every cubin not built for ``keep_sm`` in fat binaries that have one."""
    report = SlimReport()
    section = fatbin_section(data)
    if section is None:
        return report
    offset, size = section
    section_end = offset + size
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic, offset, section_end)
    while pos != -1:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        start, end = pos + header_size, pos + header_size + fat_size
        if end > section_end:
            raise ValueError(f"fat binary at {pos:#x} runs past its section")
        entries = _entries(data, start, end)
        report.fatbins += 1
        for kind, sm, _, _ in entries:
            if kind == KIND_ELF:
                report.archs[sm] = report.archs.get(sm, 0) + 1
        if not any(kind == KIND_ELF and sm == keep_sm for kind, sm, _, _ in entries):
            report.kept_whole += 1
        else:
            for kind, sm, payload, length in entries:
                if kind == KIND_ELF and sm != keep_sm:
                    data[payload : payload + length] = bytes(length)
                    report.zeroed_bytes += length
                else:
                    report.kept_bytes += length
        pos = data.find(magic, end, section_end)
    return report
