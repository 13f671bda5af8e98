"""vmlinux extraction from an x86 bzImage: synthetic bzImages for every
compression, and the real Debian kernel when one is around."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmfork.errors import ImageError
from vmfork.images import kernel as kern
from vmfork.paths import cache_dir

FAKE_ELF = b"\x7fELF\x02\x01\x01" + os.urandom(4096) + b"\0" * 20000


def fake_bzimage(payload: bytes, setup_sects: int = 4, offset: int = 0x3C0) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects if setup_sects != 4 else 0  # 0 means 4
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"\xcc" * 100


def size_append(data: bytes, n: int) -> bytes:
    return data + struct.pack("<I", n)


def cli(tool: list[str], data: bytes) -> bytes:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not installed")
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "xz":
        return size_append(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), len(data))
    if kind == "lzma":
        return size_append(lzma.compress(data, format=lzma.FORMAT_ALONE), len(data))
    if kind == "bzip2":
        return size_append(bz2.compress(data), len(data))
    if kind == "lz4":
        return size_append(cli(["lz4", "-l", "-c", "-9"], data), len(data))
    if kind == "zstd":
        return size_append(cli(["zstd", "-c", "-q"], data), len(data))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd"])
@pytest.mark.parametrize("setup_sects", [4, 27])
def test_extract_each_compression(kind: str, setup_sects: int) -> None:
    bz = fake_bzimage(compress(kind, FAKE_ELF), setup_sects)
    hdr = kern.parse_setup_header(bz)
    assert hdr.setup_sects == setup_sects and hdr.pm_start == (setup_sects + 1) * 512
    elf, got_kind = kern.extract_vmlinux(bz)
    assert got_kind == kind and elf == FAKE_ELF


def test_rejects_non_bzimage() -> None:
    with pytest.raises(ImageError, match="HdrS"):
        kern.parse_setup_header(b"\0" * 4096)


def test_rejects_unknown_compression_and_non_elf() -> None:
    with pytest.raises(ImageError, match="unknown kernel payload compression"):
        kern.extract_vmlinux(fake_bzimage(b"\x00\x01\x02\x03" * 10))
    with pytest.raises(ImageError, match="not an ELF"):
        kern.extract_vmlinux(fake_bzimage(compress("gzip", b"not an elf" * 100)))


def test_rejects_size_mismatch() -> None:
    bad = lzma.compress(FAKE_ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    with pytest.raises(ImageError, match="bzImage says"):
        kern.extract_vmlinux(fake_bzimage(size_append(bad, len(FAKE_ELF) + 1)))


def test_payload_outside_file() -> None:
    bz = bytearray(fake_bzimage(compress("gzip", FAKE_ELF)))
    struct.pack_into("<I", bz, 0x24C, len(bz) * 2)
    with pytest.raises(ImageError, match="outside"):
        kern.extract_vmlinux(bytes(bz))


def _real_bzimage() -> Path | None:
    env = os.environ.get("VMFORK_TEST_IMAGES")
    if env:
        found = sorted(Path(env).glob("*/bzImage"))
        if found:
            return found[0]
    return None


def _real_bzimage_from_deb(tmp_path: Path) -> Path | None:
    debs = sorted((cache_dir() / "debs").glob("linux-image-*.deb"))
    if not debs:
        return None
    kern.unpack_deb(debs[-1], tmp_path)
    found = sorted((tmp_path / "boot").glob("vmlinuz-*"))
    return found[0] if found else None


def test_real_debian_kernel(tmp_path: Path) -> None:
    path = _real_bzimage() or _real_bzimage_from_deb(tmp_path)
    if path is None:
        msg = "no real bzImage: set VMFORK_TEST_IMAGES to a built images dir or build an image"
        print(msg)
        pytest.skip(msg)
    data = path.read_bytes()
    elf, kind = kern.extract_vmlinux(data)
    assert elf.startswith(b"\x7fELF")
    assert elf[4] == 2  # ELFCLASS64
    assert kern.has_pvh_note(elf), "Debian's kernel should carry the PVH entry note"
    print(f"{path}: {kind}, vmlinux {len(elf)} bytes")
