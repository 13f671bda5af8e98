"""The files of one instance, in one place (``guests/<id>/``).

    instance.json                     metadata (atomic writes)
    disk.raw                          per-instance sparse overlay disk (ext4, guest /root, /var ...)
    memory                            guest RAM while the VMM runs (QEMU memory-backend-file)
    run/                              VMM runtime: vmm.json (pid), qmp.sock, agent.sock, fc.sock
    logs/console.log, logs/vmm.log    serial console and VMM stdout/stderr
    snapshots/snapshot-latest/        memory + state + config.json: a complete snapshot
    snapshots/.snapshot-tmp/          a standby in progress (never valid; removed by recovery)
    snapshots/.restoring/             a restore in progress (the snapshot is being consumed)
    snapshots/snapshot-base/          (Firecracker) the snapshot the running VM came from
    snapshots/.live-snapshot/         a named snapshot of the running guest in progress
    snapshots/.rollback/              a rollback in progress

The VMM runs with the instance dir as its working directory and gets relative paths, so
socket paths stay short and a cloned directory needs no path rewriting for QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SNAPSHOT_FILES = ("memory", "state", "config.json")
LIVE_DIR = ".live-snapshot"  # in snapshots/: a live snapshot under way
ROLLBACK_DIR = ".rollback"  # in snapshots/: a rollback under way


@dataclass(frozen=True)
class GuestDir:
    path: Path

    @property
    def metadata(self) -> Path:
        return self.path / "instance.json"

    @property
    def disk(self) -> Path:
        return self.path / "disk.raw"

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def run(self) -> Path:
        return self.path / "run"

    @property
    def vmm_json(self) -> Path:
        return self.run / "vmm.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def console_log(self) -> Path:
        return self.logs / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.logs / "vmm.log"

    @property
    def snapshots(self) -> Path:
        return self.path / "snapshots"

    @property
    def snapshot_latest(self) -> Path:
        return self.snapshots / "snapshot-latest"

    @property
    def snapshot_tmp(self) -> Path:
        return self.snapshots / ".snapshot-tmp"

    @property
    def snapshot_base(self) -> Path:
        """Firecracker only: the snapshot a running VM was restored from (base for a Diff)."""
        return self.snapshots / "snapshot-base"

    @property
    def restoring(self) -> Path:
        return self.snapshots / ".restoring"

    def unfinished(self) -> bool:
        """Whether an operation on this guest was cut short here (recovery finishes or
        undoes it): a standby, a restore, a live snapshot or a rollback under way."""
        return any(p.exists() for p in (self.snapshot_tmp, self.restoring, self.snapshots / LIVE_DIR,
                                          self.snapshots / ROLLBACK_DIR))

    def has_snapshot(self) -> bool:
        return snapshot_complete(self.snapshot_latest)

    def ensure_dirs(self) -> None:
        for p in (self.path, self.run, self.logs, self.snapshots):
            p.mkdir(0o700, parents=True, exist_ok=True)


def snapshot_complete(d: Path) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in SNAPSHOT_FILES)


def short_path(p: Path) -> str:
    """A path usable for AF_UNIX even when ``p`` is longer than sun_path allows.

    Opens the parent directory (O_PATH) and returns ``/proc/self/fd/N/<name>``. The fd is
    kept open for the life of the process (a handful per command).
    """
    s = str(p)
    if len(s.encode()) < 100:
        return s
    import os

    fd = os.open(p.parent, os.O_PATH | os.O_CLOEXEC)
    _KEEP.append(fd)
    return f"/proc/self/fd/{fd}/{p.name}"


_KEEP: list[int] = []
