"""What the benchmark reads off the host: facts, disk usage, extents, process memory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20


# --- host facts -------------------------------------------------------------------------------
def _first_line(path: str, prefix: str = "") -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.strip()
    except OSError:
        pass
    return ""


def host_facts(qemu_version: str = "", accel: str = "") -> dict[str, Any]:
    """Kernel, distribution, CPU, memory, QEMU, accel, THP policy, Python, vmfork commit."""
    os_name = _first_line("/etc/os-release", "PRETTY_NAME=").partition("=")[2].strip('"')
    cpu = _first_line("/proc/cpuinfo", "model name").partition(":")[2].strip()
    mem = _first_line("/proc/meminfo", "MemTotal:").split()
    thp = ""
    with contextlib.suppress(OSError):
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    commit = ""
    repo = Path(__file__).resolve().parents[3]
    if (repo / ".git").exists() and shutil.which("git"):
        r = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, check=False)
        commit = r.stdout.strip()
    return {
        "kernel": platform.release(),
        "os": os_name,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(int(mem[1]) / (1 << 20), 1) if len(mem) > 1 else None,
        "qemu": qemu_version,
        "accel": accel,
        "thp_enabled": thp,
        "python": platform.python_version(),
        "vmfork_commit": commit,
    }


def loadavg() -> float:
    return os.getloadavg()[0]


# --- disk -------------------------------------------------------------------------------------
def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem of ``path`` after writing everything back (sync)."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# FIEMAP, kept here rather than imported from vmfork.forkvm: the bench also measures older
# versions of vmfork (before/after comparisons), which must not need newer helpers.
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HDR = "=QQIIII"  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_EXT = "=QQQQQIIII"  # logical, physical, length, reserved64[2], flags, reserved[3]


@dataclass
class Extents:
    count: int = 0
    bytes: int = 0
    shared_bytes: int = 0

    @property
    def exclusive_bytes(self) -> int:
        return self.bytes - self.shared_bytes


def extents(path: Path, batch: int = 512) -> Extents:
    """Data extents of ``path`` (FIEMAP, synced first): count, bytes, bytes shared with
    other files (reflinks). Raises OSError where FIEMAP is unsupported."""
    hdr = struct.calcsize(_FIEMAP_HDR)
    ext = struct.calcsize(_FIEMAP_EXT)
    out = Extents()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            buf = bytearray(struct.pack(_FIEMAP_HDR, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, batch, 0))
            buf += bytes(ext * batch)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = struct.unpack_from(_FIEMAP_HDR, buf)[3]
            if mapped == 0:
                return out
            for i in range(mapped):
                logical, _phys, length, _r1, _r2, flags, *_ = struct.unpack_from(_FIEMAP_EXT, buf, hdr + i * ext)
                out.count += 1
                out.bytes += length
                if flags & FIEMAP_EXTENT_SHARED:
                    out.shared_bytes += length
                start = logical + length
                if flags & FIEMAP_EXTENT_LAST:
                    return out
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


_NR_CACHESTAT = 451  # x86_64 and the generic table (aarch64); Linux 6.5+


def cache_stat(path: Path) -> tuple[int, int] | None:
    """Bytes of ``path``'s page cache: (cached, dirty) (cachestat(2)), or None if unknown."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, 0)  # offset 0, length 0 = to the end
    out = (ctypes.c_uint64 * 5)()  # cache, dirty, writeback, evicted, recently evicted
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if libc.syscall(ctypes.c_long(_NR_CACHESTAT), fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
            return None
    finally:
        os.close(fd)
    page = os.sysconf("SC_PAGE_SIZE")
    return int(out[0]) * page, int(out[1]) * page


def dirty_bytes(path: Path) -> int | None:
    """Bytes of ``path``'s page cache that are dirty (cachestat(2)), or None if unknown."""
    st = cache_stat(path)
    return None if st is None else st[1]


# --- process memory ---------------------------------------------------------------------------
def parse_smaps_rollup(text: str) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` → {field: bytes} (Rss, Pss, Pss_Anon, Pss_File, ...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
            out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def smaps_rollup(pid: int) -> dict[str, int]:
    return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())


# --- loop-mounted filesystems -----------------------------------------------------------------
_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
}


def loop_fs_problem(kind: str) -> str | None:
    """Why a ``kind`` loop filesystem cannot be made here, or None."""
    if os.geteuid() != 0:
        return f"loop-mounting {kind} needs root"
    for tool in (_MKFS[kind][0], "mount", "umount", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def _mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@contextlib.contextmanager
def loop_fs(kind: str, size_mib: int, base: Path) -> Iterator[Path]:
    """A fresh ``kind`` filesystem of ``size_mib`` (sparse image under ``base``), mounted;
    unmounted and deleted on exit, whatever happened."""
    work = Path(tempfile.mkdtemp(prefix=f"loop-{kind}-", dir=base))
    image, mnt = work / f"{kind}.img", work / "mnt"
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_mib * MiB)
        subprocess.run([*_MKFS[kind], str(image)], check=True, capture_output=True)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            for _ in range(10):
                if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode == 0:
                    break
                time.sleep(0.3)
            if _mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def python_exe() -> str:
    return sys.executable
