"""Slimming a CUDA library's fat binaries, on a small ELF file built here with the same
layout as onnxruntime-gpu's CUDA provider (section table, ``.nv_fatbin``, fat binaries)."""

from __future__ import annotations

import struct

import pytest

from bench.device.fatbin import FATBIN_MAGIC, KIND_ELF, KIND_PTX, fatbin_section, slim_fatbins


def entry(kind: int, sm: int, payload: bytes) -> bytes:
    padded = payload + bytes(-len(payload) % 8)
    header = struct.pack("<HHIQII", kind, 0x0101, 64, len(padded), 0, len(payload))
    header += struct.pack("<II", 0, sm)  # bytes 24..31: sm at 28
    return header + bytes(64 - len(header)) + padded


def fatbin(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def elf(section: bytes) -> bytes:
    """ELF64 LE: header, then .nv_fatbin's bytes, then the names, then 3 section headers."""
    names = b"\0.shstrtab\0.nv_fatbin\0"
    data_at = 64
    names_at = data_at + len(section)
    shoff = names_at + len(names)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)

    def sh(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    table = sh(0, 0, 0) + sh(1, names_at, len(names)) + sh(11, data_at, len(section))
    return header + section + names + table


def test_other_architectures_are_zeroed_and_the_kept_one_and_ptx_are_untouched() -> None:
    keep, other, ptx = b"\x5a" * 40, b"\x4b" * 24, b".ptx" * 4
    section = fatbin(
        entry(KIND_ELF, 75, other), entry(KIND_ELF, 90, keep), entry(KIND_PTX, 90, ptx)
    )
    data = bytearray(elf(section))
    size = len(data)
    report = slim_fatbins(data, 90)
    assert len(data) == size  # nothing moves: offsets stay valid
    assert keep in data and ptx in data and other not in data
    assert report.zeroed_bytes == 24 and report.fatbins == 1 and report.kept_whole == 0
    assert report.archs == {75: 1, 90: 1}


def test_a_fat_binary_without_the_kept_architecture_is_left_whole() -> None:
    only_old = fatbin(entry(KIND_ELF, 75, b"\x4b" * 16), entry(KIND_ELF, 80, b"\x50" * 16))
    with_90 = fatbin(entry(KIND_ELF, 80, b"\x51" * 16), entry(KIND_ELF, 90, b"\x5a" * 16))
    data = bytearray(elf(only_old + with_90))
    report = slim_fatbins(data, 90)
    assert b"\x4b" * 16 in data and b"\x50" * 16 in data  # the first: untouched
    assert b"\x51" * 16 not in data and b"\x5a" * 16 in data
    assert (report.fatbins, report.kept_whole, report.zeroed_bytes) == (2, 1, 16)


def test_files_without_fat_binaries_and_broken_ones() -> None:
    assert fatbin_section(elf(b"")) is not None
    assert slim_fatbins(bytearray(elf(b"")), 90).fatbins == 0
    with pytest.raises(ValueError, match="not a 64-bit"):
        slim_fatbins(bytearray(b"MZ" + bytes(100)), 90)
    truncated = fatbin(entry(KIND_ELF, 90, b"\x5a" * 16))[:-8]
    with pytest.raises(ValueError, match=r"runs past|malformed"):
        slim_fatbins(bytearray(elf(truncated)), 90)
