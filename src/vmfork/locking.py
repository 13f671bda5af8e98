"""File locks (flock): released by the kernel when the holder dies, so a crash never wedges."""

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


@contextmanager
def file_lock(path: Path, *, what: str, timeout: float = 30.0) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the block.

    Waits up to ``timeout`` seconds (0 = try once); then raises Busy naming ``what``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for _ in retry.attempts(timeout, first=0.005, cap=0.1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
        else:
            raise Busy(f"{what} is busy: another vmfork command holds its lock{_holder(path)}")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Take the lock without waiting; return the fd (caller closes it) or None if held."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
