"""Filesystem probes shared by the copier, the backends, the manager and doctor.

Reflink support, the filesystem type of a path (mountinfo), XFS's copy-on-write extent
size hint (fsxattr), data extents and their sharing (FIEMAP), allocated and free space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: ``_IOW(0x94, 9, int)`` from ``<linux/fs.h>``.
FICLONE = 0x40049409


def reflink_supported(directory: Path) -> bool:
    """Whether FICLONE works in ``directory``: tries it between two scratch files there.

    False if the filesystem refuses, or if the scratch files cannot be created.
    The scratch files are removed.
    """
    directory = Path(directory)
    a = directory / f".vmfork-reflink-probe-{os.getpid()}-{time.monotonic_ns()}"
    b = a.with_name(a.name + ".clone")
    fds: list[int] = []
    try:
        fd_a = os.open(a, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fds.append(fd_a)
        os.write(fd_a, b"\0vmfork" * 585 + b"\0")  # one 4 KiB block
        fd_b = os.open(b, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fds.append(fd_b)
        fcntl.ioctl(fd_b, FICLONE, fd_a)
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
        for p in (a, b):
            with contextlib.suppress(OSError):
                os.unlink(p)


def _unescape_mountinfo(field: str) -> str:
    # Mount points in mountinfo escape space, tab, newline and backslash as \ooo.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path) -> str:
    """The filesystem type of ``path`` ("xfs", "ext4", "btrfs", "tmpfs", ...).

    ``path`` is resolved first (it need not exist); the mount with the longest
    mount point containing it wins (for stacked mounts, the last one).
    """
    target = str(Path(path).resolve())
    best, best_len = "unknown", -1
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                mount_point = _unescape_mountinfo(fields[4])
                fstype = fields[sep + 1]
            except (ValueError, IndexError):
                continue
            if mount_point == "/":
                matches = True
            else:
                matches = target == mount_point or target.startswith(mount_point + "/")
            if matches and len(mount_point) >= best_len:
                best, best_len = fstype, len(mount_point)
    return best


# ---------------------------------------------------------------------------
# copy-on-write extent size hint (XFS)

#: ``_IOR('X', 31, struct fsxattr)`` / ``_IOW('X', 32, struct fsxattr)`` from ``<linux/fs.h>``.
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_COWEXTSIZE = 0x00010000
# struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 bytes of padding
_FSXATTR = "=IIIII8s"


def cow_extent_size_hint(path: Path) -> int | None:
    """The copy-on-write extent size hint of ``path`` in bytes (XFS ``cowextsize``), or
    None if it has none or the filesystem has no such thing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(struct.calcsize(_FSXATTR)))
    except OSError:
        return None
    finally:
        os.close(fd)
    xflags, _ext, _n, _proj, cowextsize, _pad = struct.unpack(_FSXATTR, raw)
    return cowextsize if xflags & FS_XFLAG_COWEXTSIZE and cowextsize else None


def set_cow_extent_size_hint(directory: Path, size: int) -> bool:
    """Give ``directory`` a copy-on-write extent size hint of ``size`` bytes (XFS).

    Files and directories created in it afterwards inherit the hint. It is the unit in
    which XFS allocates a copy-on-write of a shared (reflinked) extent; the default is
    32 blocks (128 KiB): a fork that dirties one 4 KiB page of its mem-file then gets a
    128 KiB allocation, most of it never written. With 4 KiB, a fork generation of a
    256 MiB guest added 1.4 MiB of disk instead of ~12 MiB (see docs/bench).

    Returns whether ``directory`` has the hint now: False where the filesystem has no such
    thing (ext4 ignores it, tmpfs and btrfs refuse it) or refuses the size.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(struct.calcsize(_FSXATTR)))
        xflags, extsize, _n, projid, cowextsize, pad = struct.unpack(_FSXATTR, raw)
        if xflags & FS_XFLAG_COWEXTSIZE and cowextsize == size:
            return True
        new = struct.pack(_FSXATTR, xflags | FS_XFLAG_COWEXTSIZE, extsize, 0, projid, size, pad)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, new)
    except OSError:
        return False
    finally:
        os.close(fd)
    return cow_extent_size_hint(directory) == size  # ext4 accepts the call and ignores the flag


# ---------------------------------------------------------------------------
# extents (FIEMAP)

#: ``_IOWR('f', 11, struct fiemap)`` from ``<linux/fs.h>``.
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
# struct fiemap: start, length, flags, mapped_extents, extent_count, reserved
_FIEMAP_HDR = "=QQIIII"
# struct fiemap_extent: logical, physical, length, reserved64[2], flags, reserved[3]
_FIEMAP_EXT = "=QQQQQIIII"


@dataclass
class ExtentStats:
    count: int = 0  # data extents
    bytes: int = 0  # bytes in them
    shared_bytes: int = 0  # of which shared with other files (reflinks)

    @property
    def exclusive_bytes(self) -> int:
        return self.bytes - self.shared_bytes


def extent_stats(path: Path, *, stop_at_shared: bool = False, sync: bool = True) -> ExtentStats:
    """The data extents of ``path`` (FIEMAP; dirty data written back first with ``sync``).

    ``stop_at_shared`` returns at the first extent shared with another file. Raises OSError
    where FIEMAP is unsupported (tmpfs, ...).
    """
    out = ExtentStats()
    for _logical, _phys, length, flags in _fiemap(path, sync=sync):
        out.count += 1
        out.bytes += length
        if flags & FIEMAP_EXTENT_SHARED:
            out.shared_bytes += length
            if stop_at_shared:
                break
    return out


def _fiemap(path: Path, *, sync: bool, batch: int = 256) -> Iterator[tuple[int, int, int, int]]:
    """The data extents of ``path`` as ``(logical, physical, length, flags)`` (FIEMAP)."""
    hdr, ext = struct.calcsize(_FIEMAP_HDR), struct.calcsize(_FIEMAP_EXT)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            buf = bytearray(struct.pack(_FIEMAP_HDR, start, (1 << 64) - 1 - start,
                                        FIEMAP_FLAG_SYNC if sync else 0, 0, batch, 0))
            buf += bytes(ext * batch)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = struct.unpack_from(_FIEMAP_HDR, buf)[3]
            if mapped == 0:
                return
            for i in range(mapped):
                logical, phys, length, _r1, _r2, flags, *_ = struct.unpack_from(_FIEMAP_EXT, buf, hdr + i * ext)
                yield logical, phys, length, flags
                start = logical + length
                if flags & FIEMAP_EXTENT_LAST:
                    return
    finally:
        os.close(fd)


def has_shared_extents(path: Path) -> bool:
    """Whether some data of ``path`` is shared with another file (a reflink clone or its
    source), i.e. writing it will copy-on-write. False where this cannot be known."""
    try:
        return extent_stats(path, stop_at_shared=True, sync=False).shared_bytes > 0
    except OSError:
        return False


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` data ranges of ``fd`` below ``size`` (SEEK_DATA/SEEK_HOLE)."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA: all data
                ranges.append((pos, size))
                break
            raise
        if start >= size:
            break
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # the file shrank under us
                raise
            end = size
        end = min(end, size)
        if end <= start:
            break
        ranges.append((start, end))
        pos = end
    return ranges


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk (``st_blocks * 512``) for ``path`` and, if it is a
    directory, everything below it. Symlinks are not followed."""
    total = 0
    stack = [os.fspath(path)]
    while stack:
        p = stack.pop()
        st = os.lstat(p)
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                stack.extend(e.path for e in it)
    return total


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still allocate on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def physical_extents(path: Path, *, sync: bool = True) -> list[tuple[int, int, bool]]:
    """The data extents of ``path`` as ``(physical offset, length, shared)`` (FIEMAP; dirty
    data written back first with ``sync``). Raises OSError where FIEMAP is unsupported."""
    return [(phys, length, bool(flags & FIEMAP_EXTENT_SHARED))
            for _logical, phys, length, flags in _fiemap(path, sync=sync, batch=512)]
