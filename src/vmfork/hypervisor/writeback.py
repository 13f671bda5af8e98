"""Start the writeback of the guest's RAM file while the VMM saves its device state.

Once the vCPUs are stopped the guest writes no more to its mem-file, but the standby makes it
durable only at its commit (``integrity.fsync_snapshot``), after QEMU has saved the device
state and quit (~7-12 ms here). ``early_writeback`` asks the kernel to start writing the
dirty pages back in the meantime (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, in a thread:
submitting a few thousand scattered 4 KiB writes can block on the device's queue), so that
the commit's fsync mostly waits for writes already under way.

The commit's fsync stays the durability point: ``SYNC_FILE_RANGE_WRITE`` only starts I/O and
does not consume a writeback error (the fsync still reports it), and a page dirtied again
after it started (QEMU itself, while it saves) is written by that fsync.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range_write(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    f = libc.sync_file_range
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    f(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a failure only means no head start: ignored


@contextlib.contextmanager
def early_writeback(path: Path) -> Iterator[None]:
    """Write ``path``'s dirty pages back in the background while the body runs (best effort;
    the thread is joined on exit, whatever happened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    t = threading.Thread(target=_sync_file_range_write, args=(fd,), name="vmfork-writeback", daemon=True)
    t.start()
    try:
        yield
    finally:
        t.join()
        os.close(fd)
