"""Pausing a guest for lack of space, and the mark that says so (``run/space-paused.json``).

The mark names the VMM (pid + start time) it was written for, so it means nothing once that
VMM is gone; it is written only after the guest really was paused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmfork.layout import GuestDir
from vmfork.procs import ProcRef

TYPE_CHECKING = False  # typing only for the type checker (see vmfork/__init__.py)
if TYPE_CHECKING:
    from vmfork.hypervisor.qmp import QMP

MARK = "space-paused.json"


@dataclass(frozen=True)
class SpacePause:
    pid: int
    start: int
    at: str  # when (UTC, ISO 8601)
    free_bytes: int  # free space when the watchdog acted
    low_water_bytes: int

    def describe(self) -> str:
        from vmfork.space.watermarks import fmt  # imports util: kept off the path of `ps`

        return (f"paused by the space watchdog at {self.at}: {fmt(self.free_bytes)} free, below the "
                f"low-water mark of {fmt(self.low_water_bytes)}; it resumes once space is freed "
                "(or use 'vmfork resume')")


def mark_path(g: GuestDir) -> Path:
    return g.run / MARK


def read_mark(g: GuestDir, proc: ProcRef) -> SpacePause | None:
    """The watchdog's pause mark of this very VMM, if there is one."""
    try:
        p = SpacePause(**json.loads(mark_path(g).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return p if (p.pid, p.start) == (proc.pid, proc.start) else None


def clear_mark(g: GuestDir) -> None:
    mark_path(g).unlink(missing_ok=True)


def _qmp(g: GuestDir, proc: ProcRef) -> QMP:
    from vmfork.hypervisor.qmp import QMP  # asyncio + qemu.qmp: imported when needed

    return QMP.connect(g.run / "qmp.sock", timeout=2.0, alive=proc.alive)


def pause(g: GuestDir, proc: ProcRef, free: int, low: int) -> None:
    """Pause the guest (QMP ``stop``: its vCPUs stop, in-flight I/O is drained), then mark it.

    Raises HypervisorError if QEMU did not answer."""
    with _qmp(g, proc) as q:
        q.execute("stop")
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    mark = SpacePause(proc.pid, proc.start, at, free, low)
    tmp = mark_path(g).with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(asdict(mark)) + "\n")
        tmp.rename(mark_path(g))
    except OSError:  # the guest is paused all the same: it just will not resume by itself
        tmp.unlink(missing_ok=True)


def pause_again(g: GuestDir, proc: ProcRef) -> bool:
    """Pause a marked guest again if it runs (someone resumed it); keep its mark.
    True if it was running."""
    with _qmp(g, proc) as q:
        if q.execute("query-status").get("status") != "running":
            return False
        q.execute("stop")
    return True


#: QEMU run states a guest is resumed from: paused (``stop``), or stopped by a disk write
#: error (QEMU's default ``werror=enospc`` stops the guest when its disk cannot grow). Never
#: from a migration state: that is a standby or restore at work.
RESUMABLE = ("paused", "io-error")


def resume(g: GuestDir, proc: ProcRef) -> bool:
    """Resume a paused guest and clear the mark. True if it was resumed, False if it was
    in no state to resume from (running, or a standby or restore at work).

    Safe without the instance lock (which a long ``exec`` may hold): QEMU serves one QMP
    client at a time, and a standby does its whole save (stop, migrate, quit) in one QMP
    session; within ours, a standby is either not started (no ``.snapshot-tmp``) or done
    with QEMU, and a restore shows a migration state until it resumes the guest itself.
    """
    with _qmp(g, proc) as q:
        status = q.execute("query-status").get("status")
        if status not in RESUMABLE or g.snapshot_tmp.exists():
            if status == "running":
                clear_mark(g)
            return False
        q.execute("cont")
    clear_mark(g)
    return True
