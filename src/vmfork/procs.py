"""Processes vmfork starts and later finds again by pid (guarded against pid reuse)."""

from __future__ import annotations

import json
import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

from vmfork import retry


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parens: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks (field 22), or None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def reap(pid: int) -> None:
    """Reap ``pid`` if it is our exited child (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass(frozen=True)
class ProcRef:
    """A process identified by pid + start time, so a reused pid never matches."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcRef:
        st = start_time(pid)
        if st is None:
            raise ProcessLookupError(pid)
        return cls(pid, st)

    def alive(self) -> bool:
        reap(self.pid)
        fields = _stat_fields(self.pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return int(fields[19]) == self.start

    def cmdline(self) -> list[str]:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return []
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to exit; True if it did.

        Woken by a pidfd the moment the process exits (no polling lag); falls back to short
        growing sleeps where pidfds are unavailable.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # gone already, or no pidfd support
            return self._poll_exit(timeout)
        try:
            if self.alive():  # checked after opening: the pidfd refers to this very process
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(max(timeout, 0) * 1000)
            return not self.alive()  # alive() also reaps it if it is our child
        finally:
            os.close(pidfd)

    def _poll_exit(self, timeout: float) -> bool:
        return any(not self.alive() for _ in retry.attempts(timeout))

    def kill(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; returns once the process is gone."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if not self.alive():
                return
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if self.wait_exit(wait):
                return


def recorded(path: Path, key: str | None = None) -> ProcRef | None:
    """The process recorded in the JSON file ``path`` (``{"pid", "start"}``, or under
    ``key``), if it is still that process."""
    try:
        d = json.loads(path.read_text())
        if key is not None:
            d = d[key]
        ref = ProcRef(int(d["pid"]), int(d["start"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ref if ref.alive() else None
