"""The space watchdog: one light process per data dir, alive while a VMM runs there.

``ensure(root)`` is called whenever vmfork has started a VMM; it starts
``python -m vmfork.space.watchdog ROOT`` (detached) unless one already holds
``locks/watchdog.lock``. The watchdog then:

- reads the free space of ``guests/`` (one ``statvfs``) at an interval that shrinks as the
  free space nears the low-water mark: the time the fastest guest (taken as 1 GiB/s) would
  need to reach the mark, between 20 ms and 1 s;
- below the low-water mark, pauses every guest whose RAM is a file here (QMP ``stop``),
  marks it (``run/space-paused.json``) and logs it; a marked guest found running again while
  space is still short is paused again;
- at or above the high-water mark, resumes the guests it paused (``pause.resume`` says why
  that is safe without the instance lock: a long ``exec`` may hold it);
- every second: looks for running VMMs (their ``run/vmm.json``) and cuts console and VMM
  logs that passed their cap (``vmfork.logfile``);
- exits when no VMM runs. Before exiting it releases its lock and looks once more, so a VMM
  recorded by a command that saw the lock still held is never left without a watchdog.

It imports only vmfork's ground floor until the free space comes within 1 GiB of the
low-water mark; then it loads the QMP client, so that a pause does not wait for the import.
Events go to ``ROOT/watchdog.log`` and to the guest's ``logs/vmm.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from vmfork.errors import VmforkError
from vmfork.fs import free_bytes
from vmfork.layout import GuestDir
from vmfork.locking import try_lock
from vmfork.logfile import CONSOLE_LOG_KEEP, CONSOLE_LOG_MAX, cap
from vmfork.procs import ProcRef, recorded
from vmfork.space.watermarks import fmt, high_water, low_water, pausing_enabled

LOCK = "watchdog.lock"
LOG = "watchdog.log"
SCAN_S = 1.0  # look for VMMs, cap logs, re-pause marked guests
MIN_TICK, MAX_TICK = 0.02, 1.0
PAUSED_TICK = 0.25  # free space below the mark: every guest is paused, look less often
MAX_RATE = 1 << 30  # bytes/s: the fastest a guest is assumed to fill the filesystem
ARM_MARGIN = 1 << 30  # load the QMP client once free space is within this of the mark


def ensure(root: Path) -> bool:
    """Start the watchdog of data dir ``root`` unless one runs. True if one was started.

    ``VMFORK_WATCHDOG=0`` starts none (no pausing and no log capping; for tests)."""
    if os.environ.get("VMFORK_WATCHDOG", "1").strip() == "0":
        return False
    lock = root / "locks" / LOCK
    os.close(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    fd = try_lock(lock)
    if fd is None:
        return False  # held: a watchdog runs
    os.close(fd)  # the new process takes it (if two start, one gives up at once)
    p = subprocess.Popen(
        [sys.executable, "-m", "vmfork.space.watchdog", str(root)], cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    p.returncode = 0  # detached; silence Popen's ResourceWarning
    return True


def running(root: Path) -> int | None:
    """The pid of the watchdog of data dir ``root`` if one runs (holds its lock), else None."""
    lock = root / "locks" / LOCK
    if not lock.exists():
        return None
    fd = try_lock(lock)
    if fd is not None:
        os.close(fd)
        return None
    try:
        return int(lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _take(lock: Path) -> int:
    """Take the watchdog lock (the fd, -1 if held) and write our pid into it."""
    fd = try_lock(lock)
    if fd is None:
        return -1
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _name(g: GuestDir) -> str:
    try:
        return str(json.loads(g.metadata.read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return g.path.name


class Watchdog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.guests = root / "guests"
        self.lock_path = root / "locks" / LOCK
        self.low, self.high = low_water(), high_water()
        self.pausing = pausing_enabled()
        self.vmms: list[tuple[GuestDir, ProcRef]] = []
        self.armed = False
        self.last_repause = 0.0

    # --- log ----------------------------------------------------------------------------
    def log(self, msg: str, g: GuestDir | None = None) -> None:
        line = f"{_now()} {msg}\n".encode()
        targets = [self.root / LOG] + ([g.vmm_log] if g is not None else [])
        for path in targets:
            with contextlib.suppress(OSError):  # a full filesystem must not stop the watchdog
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, line if path.name == LOG else b"--- vmfork watchdog: " + line)
                finally:
                    os.close(fd)

    # --- main loop ----------------------------------------------------------------------
    def run(self) -> int:
        with contextlib.suppress(OSError):
            os.close(os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        fd = _take(self.lock_path)
        if fd < 0:
            return 0
        self.log(f"started (pid {os.getpid()}): low-water {fmt(self.low)}, high-water {fmt(self.high)}, "
                 f"pausing {'on' if self.pausing else 'off'}")
        last_scan = float("-inf")
        try:
            while True:
                now = time.monotonic()
                if now - last_scan >= SCAN_S:
                    last_scan = now
                    self.vmms = self.scan()
                    self.cap_logs()
                    if not self.vmms:
                        os.close(fd)
                        fd = -1
                        if not self.scan():
                            self.log("no VMM runs here any more: exiting")
                            return 0
                        fd = _take(self.lock_path)
                        if fd < 0:
                            return 0  # another watchdog took over
                        continue
                try:
                    free = free_bytes(self.guests)
                except OSError:
                    return 0  # the data dir is gone
                if self.pausing:
                    self.check(free)
                time.sleep(self.interval(free))
        finally:
            if fd >= 0:
                os.close(fd)

    def interval(self, free: int) -> float:
        if free < self.low:
            return PAUSED_TICK
        return max(MIN_TICK, min(MAX_TICK, (free - self.low) / MAX_RATE))

    def scan(self) -> list[tuple[GuestDir, ProcRef]]:
        out = []
        try:
            entries = sorted(os.scandir(self.guests), key=lambda e: e.name)
        except OSError:
            return []
        for e in entries:
            g = GuestDir(Path(e.path))
            proc = recorded(g.vmm_json)
            if proc is not None:
                out.append((g, proc))
        return out

    def cap_logs(self) -> None:
        for g, _proc in self.vmms:
            for path in (g.console_log, g.vmm_log):
                with contextlib.suppress(OSError):
                    cut = cap(path, CONSOLE_LOG_MAX, CONSOLE_LOG_KEEP)
                    if cut and path == g.console_log:
                        self.log(f"'{_name(g)}': cut the oldest {fmt(cut)} of {path.name}")
        with contextlib.suppress(OSError):
            cap(self.root / LOG, CONSOLE_LOG_MAX, CONSOLE_LOG_KEEP)

    # --- space --------------------------------------------------------------------------
    def check(self, free: int) -> None:
        if not self.armed and free < self.low + ARM_MARGIN:
            import vmfork.hypervisor.qmp  # noqa: F401  (loaded now, so that a pause need not wait)

            self.armed = True
        if free < self.low:
            self.pause_all(free)
        elif free >= self.high:
            self.resume_all(free)

    def pause_all(self, free: int) -> None:
        from vmfork.space.pause import pause, pause_again, read_mark

        t0 = time.monotonic()
        repause = t0 - self.last_repause >= SCAN_S
        if repause:
            self.last_repause = t0
        self.vmms = self.scan()  # a VMM may have started since the last scan
        for g, proc in self.vmms:
            if not g.memory.exists():
                continue  # its RAM is not a file here: it cannot die of this
            marked = read_mark(g, proc) is not None
            if marked and not repause:
                continue
            t1 = time.monotonic()
            try:
                if marked:  # paused, or resumed by someone since: then pause it again
                    if not pause_again(g, proc):
                        continue
                else:
                    pause(g, proc, free, self.low)
            except VmforkError as e:
                self.log(f"'{_name(g)}': could not pause it: {e}", g)
                continue
            t2 = time.monotonic()
            try:
                after = free_bytes(self.guests)
            except OSError:
                after = -1
            self.log(f"'{_name(g)}': paused{' again' if marked else ''}: {fmt(free)} free < low-water "
                     f"{fmt(self.low)} (seen {(t1 - t0) * 1000:.0f} ms before the pause, which took "
                     f"{(t2 - t1) * 1000:.0f} ms; {fmt(after)} free after it) [free_bytes={free} "
                     f"after_bytes={after}]", g)

    def resume_all(self, free: int) -> None:
        from vmfork.space.pause import read_mark, resume

        for g, proc in self.vmms:
            if read_mark(g, proc) is None:
                continue
            try:
                if resume(g, proc):
                    self.log(f"'{_name(g)}': resumed: {fmt(free)} free >= high-water {fmt(self.high)}", g)
            except VmforkError as e:
                self.log(f"'{_name(g)}': could not resume it: {e}", g)



def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vmfork.space.watchdog DATA_DIR", file=sys.stderr)
        return 2
    return Watchdog(Path(argv[0])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
