"""A deterministic writer of uncompressed newc ("070701") cpio archives, as the
kernel unpacks them for an initramfs. No root needed (device nodes are just entries)."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO


@dataclass
class _Entry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class CpioArchive:
    """Entries keyed by path; written sorted (parents before children), with
    mtime 0, uid/gid 0 and sequential inode numbers, so equal input gives equal bytes."""

    entries: dict[str, _Entry] = field(default_factory=dict)

    @staticmethod
    def _norm(path: str) -> str:
        p = str(PurePosixPath("/") / path.lstrip("/")).lstrip("/")
        if not p or p == "." or ".." in PurePosixPath(p).parts:
            raise ValueError(f"bad archive path {path!r}")
        return p

    def _parents(self, path: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            p = str(parent)
            if p not in (".", "/", "") and p not in self.entries:
                self.entries[p] = _Entry(stat.S_IFDIR | 0o755)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        p = self._norm(path)
        self._parents(p)
        self.entries[p] = _Entry(stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        p = self._norm(path)
        self._parents(p)
        self.entries[p] = _Entry(stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        p = self._norm(path)
        self._parents(p)
        self.entries[p] = _Entry(stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        p = self._norm(path)
        self._parents(p)
        self.entries[p] = _Entry(stat.S_IFCHR | mode, rdev=(major, minor))

    def write(self, out: BinaryIO) -> int:
        """Write the archive; returns its size in bytes."""
        size = 0
        for ino, name in enumerate(sorted(self.entries, key=lambda n: PurePosixPath(n).parts), 1):
            e = self.entries[name]
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            size += _write_entry(out, name, ino, e.mode, nlink, e.data, e.rdev)
        size += _write_entry(out, "TRAILER!!!", 0, 0, 1, b"", (0, 0))
        pad = -size % 512
        out.write(b"\0" * pad)
        return size + pad


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _write_entry(
    out: BinaryIO, name: str, ino: int, mode: int, nlink: int, data: bytes, rdev: tuple[int, int]
) -> int:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    blob = header + raw_name + _pad4(len(header) + len(raw_name)) + data + _pad4(len(data))
    out.write(blob)
    return len(blob)
