"""Real loop-mounted filesystems for tests (XFS with reflink, btrfs, ext4).

Usage::

    from tests.fsutil import loop_fs, loop_fs_unavailable_reason

    reason = loop_fs_unavailable_reason("xfs")
    if reason:
        pytest.skip(reason)
    with loop_fs("xfs", 400, tmp_path) as mnt:
        ...

``loop_fs`` creates a sparse image file under ``base``, runs mkfs on it, loop-mounts
it on a fresh directory and, on exit (also on failure), unmounts it (lazily as a
last resort) and deletes the image and the directories.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vmfork.util import sha256_file as sha256_file  # re-exported for the tests

KINDS = ("xfs", "btrfs", "ext4")

#: Smallest sizes mkfs accepts with the options used here (MiB).
MIN_SIZE_MB = {"xfs": 300, "btrfs": 128, "ext4": 8}

_MKFS: dict[str, list[str]] = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
}


class LoopFsError(RuntimeError):
    """Creating or mounting a loop filesystem failed (the tool's output is kept)."""


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoopFsError(f"{cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
        raise LoopFsError(f"{' '.join(cmd)} exited {proc.returncode}: {out}")


def _is_mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if mount_point == target:
                return True
    return False


def _unmount(mnt: Path) -> None:
    """Unmount ``mnt``: retry a few times if busy, then detach it lazily."""
    for _ in range(5):
        if not _is_mounted(mnt):
            return
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        time.sleep(0.2)
    if _is_mounted(mnt):
        # Last resort; the loop device (autoclear) goes away with the last user.
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@contextlib.contextmanager
def loop_fs(kind: str, size_mb: int, base: Path) -> Iterator[Path]:
    """Yield the mount point of a fresh ``kind`` filesystem of ``size_mb`` MiB.

    The image file lives in a new directory under ``base``; everything is removed
    on exit.
    """
    if kind not in _MKFS:
        raise ValueError(f"unknown filesystem kind {kind!r}; expected one of {KINDS}")
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"loopfs-{kind}-", dir=base))
    image = work / f"{kind}.img"
    mnt = work / "mnt"
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        _run([*_MKFS[kind], str(image)])
        mnt.mkdir()
        _run(["mount", "-o", "loop", str(image), str(mnt)])
        mounted = True
        yield mnt
    finally:
        if mounted:
            _unmount(mnt)
        shutil.rmtree(work, ignore_errors=True)


@functools.cache
def loop_fs_unavailable_reason(kind: str) -> str | None:
    """Why a ``kind`` loop filesystem cannot be used here, or None if it can.

    Checks root, the mkfs/mount tools and one real mkfs + loop mount (cached).
    """
    if kind not in _MKFS:
        return f"unknown filesystem kind {kind!r}"
    if os.geteuid() != 0:
        return f"loop-mounting {kind} needs root (running as uid {os.geteuid()})"
    for tool in (_MKFS[kind][0], "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found (install {_package_hint(tool)})"
    try:
        with (
            tempfile.TemporaryDirectory(prefix="loopfs-probe-") as tmp,
            loop_fs(kind, MIN_SIZE_MB[kind], Path(tmp)),
        ):
            pass
    except (LoopFsError, OSError) as exc:
        return f"cannot create and loop-mount a {kind} filesystem: {exc}"
    return None


def skip_unless_loop_fs(kind: str) -> None:
    """``pytest.skip`` with the reason if a ``kind`` loop filesystem is unavailable."""
    import pytest

    reason = loop_fs_unavailable_reason(kind)
    if reason is not None:
        pytest.skip(reason)


def _package_hint(tool: str) -> str:
    return {
        "mkfs.xfs": "xfsprogs",
        "mkfs.btrfs": "btrfs-progs",
        "mkfs.ext4": "e2fsprogs",
    }.get(tool, "util-linux/mount")


# ---------------------------------------------------------------------------
# test data helpers

MiB = 1 << 20
_PATTERN = os.urandom(4 * MiB)


def write_sparse_file(path: Path, size: int, data_ranges: list[tuple[int, int]]) -> int:
    """Create ``path`` of ``size`` bytes with data only in ``data_ranges`` (``[start, end)``,
    best 4 KiB aligned) and holes elsewhere. Every 4 KiB block of data is distinct.
    Returns the number of data bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        for start, end in data_ranges:
            pos = start
            while pos < end:
                n = min(len(_PATTERN), end - pos)
                chunk = bytearray(_PATTERN[:n])
                for block in range(0, n, 4096):  # stamp the offset into each block
                    chunk[block : block + 8] = (pos + block).to_bytes(8, "little")
                os.pwrite(fd, chunk, pos)
                pos += n
                written += n
    finally:
        os.close(fd)
    return written


def random_data_ranges(
    size: int, fraction: float, mean_run: int, seed: int = 0
) -> list[tuple[int, int]]:
    """4 KiB aligned data ranges covering about ``fraction`` of ``size``, in runs of
    0.5-1.5 x ``mean_run`` bytes separated by holes (like a guest memory file)."""
    rnd = random.Random(seed)
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        n = min(size - pos, max(4096, rnd.randint(mean_run // 2, mean_run * 3 // 2) // 4096 * 4096))
        if rnd.random() < fraction:
            if ranges and ranges[-1][1] == pos:
                ranges[-1] = (ranges[-1][0], pos + n)
            else:
                ranges.append((pos, pos + n))
        pos += n
    return ranges


def free_bytes(path: Path) -> int:
    """Free bytes of the filesystem holding ``path``, after flushing it (syncfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        # os.sync() rather than syncfs(2), which Python does not expose.
        os.sync()
    finally:
        os.close(fd)
    sv = os.statvfs(path)
    return sv.f_bfree * sv.f_frsize
