"""Forks that run from one shared, read-only template mem-file (QEMU 7.2 and 10).

A fork's QEMU maps the template with ``memory-backend-file,share=off`` (QEMU >= 8.2 also
``readonly=on,rom=off``: opened read-only, mapped writable): MAP_PRIVATE, so
every fork of one template reads the same page cache, and a page a fork writes becomes an
anonymous copy of its own (the kernel's copy-on-write); nothing a fork does reaches the
template's file. The incoming state stream of the source carries no RAM (``x-ignore-shared``
on the source's side), so the fork sees its source's memory at once.

Standby of such a fork (QEMU 7.2 cannot migrate only the pages of a private RAM block that
differ from its file):
- the vCPUs are stopped;
- the fork's own pages are found from the host in ``/proc/PID/pagemap`` (present and not a
  file page, or swapped: an anonymous copy-on-write page) and written from
  ``/proc/PID/mem`` into the fork's own mem-file, a copy-on-write clone of the template
  (another inode: ``check_not_template``);
- the device state alone is saved with ``xen-save-devices-state`` (no RAM section, no
  configuration section: its restore sets ``migration.send-configuration=off``), into a
  file vmfork opened and passed as an fd set (a confined VMM creates no file).
The snapshot is then an ordinary one (its mem-file is the guest's whole RAM) of type
``DEVICES``, restored with ``share=on`` on the fork's own file like any other.

The template must never be written while a fork maps it: it is an immutable file (a named
snapshot's mem-file, or a clone of a source's snapshot made for its forks, ``ensure_template``),
never a file some VMM runs on.

``VMFORK_SHARED_RAM``: ``auto`` (default: on where the fork's QEMU opens the template
read-only, ``memory-backend-file,readonly=on,rom=off``: QEMU >= 8.2, the 10.0.2 that setup
puts in ``.tools/qemu``, confined or not; with QEMU 7.2, which opens the file read-write even
with ``share=off``, only where the VMM is not confined: a VMM under its own uid, with a
read-only view, cannot open a template it must not write), ``0`` (off: every fork maps its
own clone). A confined VMM sees its template bound read-only at its path, nothing else of
its source (``confine.starter``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import HypervisorError, InvalidArgument

PAGE = 4096
#: ``VMConfig.snapshot_type`` of a snapshot whose ``state`` holds the device state only.
DEVICES = "devices"
TEMPLATES = "templates"  # in a source's guest dir: the templates of its forks

#: A template is read-only for all, so that the confined VMM of a fork (its own uid) can open
#: it: it is reachable on the host only through root's 0700 dirs (``templates/``, the snapshot
#: store), and a confined VMM sees only its own fork's template, bound read-only.
TEMPLATE_MODE = 0o444

_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61


def mode() -> str:
    v = os.environ.get("VMFORK_SHARED_RAM", "auto")
    if v not in ("auto", "0"):
        raise InvalidArgument(f"invalid VMFORK_SHARED_RAM '{v}': use auto or 0")
    return v


def enabled(readonly: bool) -> bool:
    """True when new forks run from a shared template (see the module's note); ``readonly``:
    their QEMU opens it read-only (``readonly=on,rom=off``), which a confined VMM needs."""
    if mode() == "0":
        return False
    from vmfork import confine

    return readonly or not confine.enabled()


def usable_template(template: str, size: int, *, readonly: bool) -> Path | None:
    """The template a fork's snapshot names, if it is still there and of the RAM's size
    (a template removed with its source: the fork runs on its own clone, same content)."""
    if not template or not enabled(readonly):
        return None
    p = Path(template)
    try:
        return p if p.stat().st_size == size else None
    except OSError:
        return None


def ensure_template(memory: Path, guest_dir: Path) -> Path | None:
    """The template of the forks of the snapshot whose mem-file is ``memory`` (in the source's
    guest dir ``guest_dir``): a copy-on-write clone of it made once, read-only, keyed by the
    mem-file's inode and mtime (a later snapshot of the source gets a new one). The source
    never runs on it: a restore of the source consumes its own snapshot's inode, not this one.
    Templates of earlier snapshots go (a fork that still maps one keeps its inode alive; a
    fork in standby that named one falls back to its own clone, ``usable_template``).
    None where the filesystem cannot reflink: a full copy per source snapshot would cost as
    much disk as a fork (measured on ext4: 94 -> 187 MiB for one fork generation); forks then
    map their own clones, as before."""
    from vmfork.forkvm import CopyError, clone_file

    st = memory.stat()
    root = guest_dir / TEMPLATES
    path = root / f"{st.st_ino}-{st.st_mtime_ns}"
    if path.exists():
        return path
    root.mkdir(mode=0o700, exist_ok=True)
    for old in root.iterdir():
        old.unlink(missing_ok=True)
    tmp = root / f".tmp-{path.name}"
    tmp.unlink(missing_ok=True)
    try:
        clone_file(memory, tmp, mode="reflink")
    except CopyError:
        tmp.unlink(missing_ok=True)
        return None
    os.chmod(tmp, TEMPLATE_MODE)
    from vmfork.util import fsync_file

    fsync_file(tmp)
    os.rename(tmp, path)
    return path


@dataclass
class PrivateRam:
    """The guest RAM mapping of a running fork (a private mapping of its template)."""

    pid: int
    start: int  # address of guest RAM offset 0 in the VMM
    pages: list[int]  # page numbers (from offset 0) the fork wrote: its own copies


@dataclass(frozen=True)
class Mapping:
    """A VMM's private mapping of a template: where it starts, and the template's inode."""

    start: int
    dev: tuple[int, int]  # major, minor
    ino: int


def mapping_of(pid: int, template: Path, size: int) -> Mapping | None:
    """The VMM's private mapping of ``template`` (by its path, also once the template was
    unlinked: the mapping keeps its inode) of ``size`` bytes, if it has one."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return None
    names = (str(template), f"{template} (deleted)")
    return next((m for m, path in _private_maps(lines, size) if path in names), None)


def _private_maps(lines: list[str], size: int) -> Iterator[tuple[Mapping, str]]:
    """The private mappings of a file at offset 0 of exactly ``size`` bytes, with the file's
    path, in the lines of ``/proc/PID/maps``: where a guest RAM of that size can be."""
    for line in lines:
        f = line.split(maxsplit=5)
        if len(f) < 6 or f[1][3] != "p" or int(f[2], 16) != 0:
            continue
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        if hi - lo == size:
            major, minor = (int(x, 16) for x in f[3].split(":"))
            yield Mapping(lo, (major, minor), int(f[4])), f[5]


def check_ram_not_private(pid: int, size: int) -> None:
    """Refuse a device-state-only save of a VMM whose guest RAM is a private file mapping
    that ``mapping_of`` did not find (its own pages would not be saved): any private mapping
    of a file, at offset 0, of exactly the RAM's size."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as e:
        raise HypervisorError(f"cannot read the mappings of VMM {pid}: {e.strerror}") from None
    for m, path in _private_maps(lines, size):
        if m.ino != 0 and path.startswith("/"):
            raise HypervisorError(f"the guest RAM of VMM {pid} is a private mapping of {path}, "
                                  "not of its template: refusing a snapshot without its own pages")


def private_pages(pid: int, start: int, size: int) -> list[int]:
    """Pages of the mapping at ``start`` that are the process's own: present and not a file
    page, or swapped out (an anonymous page). Read from ``/proc/PID/pagemap``."""
    n = size // PAGE
    out: list[int] = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
        off = start // PAGE * 8
        chunk = 1 << 15  # entries per read (256 KiB)
        for base in range(0, n, chunk):
            k = min(chunk, n - base)
            raw = os.pread(pm.fileno(), k * 8, off + base * 8)
            if len(raw) != k * 8:
                raise HypervisorError(f"short read of /proc/{pid}/pagemap")
            for i, e in enumerate(struct.unpack(f"{k}Q", raw)):
                if (e & _PRESENT and not e & _FILE) or e & _SWAPPED:
                    out.append(base + i)
    return out


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first page, count) runs."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def check_not_template(fd: int, m: Mapping) -> None:
    """Refuse to write a fork's pages into the template's inode (the invariant)."""
    st = os.fstat(fd)
    if ((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino) == (m.dev, m.ino):
        raise HypervisorError("refusing to write a fork's RAM into its template (same inode)")


def write_private(ram: PrivateRam, dest: Path, m: Mapping) -> int:
    """Copy the fork's own pages from the (stopped) VMM into ``dest`` at their offsets and
    fsync it; returns the bytes written."""
    written = 0
    max_run = 256  # pages per read/write (1 MiB)
    fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
    try:
        check_not_template(fd, m)
        with open(f"/proc/{ram.pid}/mem", "rb", buffering=0) as mem:
            for first, count in runs(ram.pages):
                for p in range(first, first + count, max_run):
                    k = min(max_run, first + count - p)
                    data = os.pread(mem.fileno(), k * PAGE, ram.start + p * PAGE)
                    if len(data) != k * PAGE:
                        raise HypervisorError(f"short read of the guest RAM of VMM {ram.pid}")
                    os.pwrite(fd, data, p * PAGE)
                    written += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written
