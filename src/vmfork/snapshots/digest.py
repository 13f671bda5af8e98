"""Content digests of snapshot files, fast on sparse guest RAM.

``sha256-z1m``: the file is read in 1 MiB blocks; a block that is a hole (SEEK_DATA) or
all zeros is skipped, every other block is hashed with its offset, and the size ends it.
The digest is of the content, not of the allocation: a hole and a block of zeros hash the
same, so a sparse copy, a reflink clone and an exported-then-imported file agree. SHA-256
because OpenSSL runs it on the CPU's SHA extensions here (1.3 GB/s on this machine against
0.7 GB/s for BLAKE2b); a 256 MiB guest's RAM is mostly never-touched holes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from vmfork.fs import data_ranges

ALGO = "sha256-z1m"
BLOCK = 1 << 20
_ZERO = bytes(BLOCK)


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"size": ..., "digest": ...}`` of ``path`` (its page cache is dropped after)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        done = 0  # blocks below this offset are hashed (two data ranges may share a block)
        for start, end in data_ranges(fd, size):
            off = max(start - start % BLOCK, done)
            while off < end:
                n = min(BLOCK, size - off)
                block = os.pread(fd, n, off)
                if block != _ZERO[:len(block)]:
                    h.update(struct.pack("<QI", off, len(block)))
                    h.update(block)
                off += BLOCK
            done = off
        h.update(struct.pack("<Q", size))
        try:  # reading a mem-file fills its page cache with large folios: never keep them
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
    finally:
        os.close(fd)
    return {"size": size, "digest": f"{ALGO}:{h.hexdigest()}"}
