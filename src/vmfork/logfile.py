"""Log files a guest can fill: read their end without reading them whole, and cap them.

A guest's serial console goes to ``logs/console.log`` through QEMU's file chardev, opened
with ``O_APPEND``: a guest that floods its console would grow it without limit. ``cap``
keeps such a file under a size by cutting its oldest part, keeping the newest ``keep``
bytes. It runs while the VMM keeps writing, so it cuts in place:

- ``fallocate(FALLOC_FL_COLLAPSE_RANGE)`` (XFS, ext4) removes whole blocks from the front
  of the file, atomically with respect to the writer's appends: nothing is lost but the
  cut part, and the kept part may begin in the middle of a line;
- elsewhere (tmpfs, btrfs...) it copies the newest part and truncates the file to it,
  which can drop what the writer appends at that very moment.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: Console log cap: past CONSOLE_LOG_MAX bytes, the oldest part is cut to keep CONSOLE_LOG_KEEP.
CONSOLE_LOG_MAX = 1 << 20
CONSOLE_LOG_KEEP = 512 << 10

FALLOC_FL_COLLAPSE_RANGE = 0x08
_BLOCK = 64 << 10


def read_tail(path: Path, lines: int, *, max_bytes: int = 1 << 20) -> bytes:
    """The last ``lines`` lines of ``path`` (at most its last ``max_bytes`` bytes), read
    backwards from the end in blocks. A missing file reads as empty."""
    if lines <= 0:
        return b""
    data = b""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            pos = end
            # lines+1 newlines: the last line may or may not end with one
            while pos > 0 and end - pos < max_bytes and data.count(b"\n") <= lines:
                n = min(_BLOCK, pos, max_bytes - (end - pos))
                pos -= n
                f.seek(pos)
                data = f.read(n) + data
    except OSError:
        return b""
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept)


def cap(path: Path, limit: int = CONSOLE_LOG_MAX, keep: int = CONSOLE_LOG_KEEP) -> int:
    """If ``path`` is larger than ``limit`` bytes, cut its oldest part so that about its
    newest ``keep`` bytes remain (at least ``keep``: the cut is whole filesystem blocks).
    Returns the bytes cut (0 if none, or if the file is missing)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        st = os.fstat(fd)
        if st.st_size <= limit:
            return 0
        block = max(st.st_blksize, 512)
        cut = (st.st_size - keep) // block * block
        if cut <= 0:
            return 0
        try:
            _collapse(fd, cut)
            return cut
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        # copy the newest part to the front, then truncate (may drop a concurrent append)
        size = os.fstat(fd).st_size
        newest = os.pread(fd, size - cut, cut)
        os.pwrite(fd, newest, 0)
        os.ftruncate(fd, len(newest))
        return cut
    finally:
        os.close(fd)


def _collapse(fd: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
