"""File locks (flock): released by the kernel when the holder dies, so a crash never wedges.

A lock file may be removed by its holder (an instance that is gone needs no lock file). So
that removing one is safe, a lock is only taken once the file that was locked is still the
file at that path: whoever waited on a removed file sees that, and tries again on the new
one. Callers re-read what the lock protects once they hold it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmfork import retry
from vmfork.errors import Busy


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f" (held by pid {text})" if text else ""


def _still_linked(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _try(path: Path, *, create: bool) -> int | None:
    """One attempt: the fd of the locked, still linked ``path``, or None if someone holds it.

    Raises FileNotFoundError when ``path`` does not exist and ``create`` is False."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        if _still_linked(fd, path):
            return fd
        os.close(fd)  # its holder removed it while we waited: lock the new one
        if not create:
            raise FileNotFoundError(errno.ENOENT, "lock file removed", str(path))


@contextmanager
def file_lock(path: Path, *, what: str, timeout: float = 30.0, remove: bool = False) -> Iterator[int]:
    """Hold an exclusive flock on ``path`` for the block; yields the fd.

    Waits up to ``timeout`` seconds (0 = try once); then raises Busy naming ``what``.
    With ``remove``, the lock file is removed before it is released.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd: int | None = None
    for _ in retry.attempts(timeout, first=0.005, cap=0.1):
        fd = _try(path, create=True)
        if fd is not None:
            break
    if fd is None:
        raise Busy(f"{what} is busy: another vmfork command holds its lock{_holder(path)}")
    try:
        pid = str(os.getpid()).encode()  # the holder, for Busy messages: written over, then cut
        os.pwrite(fd, pid, 0)  # to length (ext4 flushes a file truncated to 0 that had data:
        os.ftruncate(fd, len(pid))  # ~2-4 ms a lock)
        yield fd
    finally:
        if remove:
            release(fd, path, remove=True)
        else:
            os.close(fd)


def try_lock(path: Path, *, create: bool = False) -> int | None:
    """Take the lock without waiting; return the fd (caller releases it) or None if held.

    Without ``create``, a missing lock file also gives None."""
    try:
        return _try(path, create=create)
    except FileNotFoundError:
        return None


def unlink_held(fd: int, path: Path) -> None:
    """Remove the lock file ``path`` whose lock ``fd`` holds (not someone else's new one)."""
    if _still_linked(fd, path):
        path.unlink(missing_ok=True)


def release(fd: int, path: Path, *, remove: bool = False) -> None:
    """Release a lock taken here; with ``remove`` the lock file is removed first (while held)."""
    try:
        if remove:
            unlink_held(fd, path)
    finally:
        os.close(fd)
