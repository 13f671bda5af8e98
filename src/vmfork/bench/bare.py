"""The floor: restore a snapshot with QEMU's own command line and nothing of vmfork's.

A raw AF_UNIX socket speaks the few QMP lines a restore needs (no client library, no
asyncio, no locks, no metadata): greeting, ``qmp_capabilities``,
``migrate-set-capabilities`` (x-ignore-shared, events), ``getfd`` (the state file,
SCM_RIGHTS), ``migrate-incoming fd:…``, the ``MIGRATION`` event saying ``completed`` (no
polling), then ``cont`` (the snapshot was taken paused, so the guest stays paused until
told).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork.layout import short_path


class BareQMPError(RuntimeError):
    pass


class RawQMP:
    """Newline-delimited JSON over a unix socket; events are kept until asked for."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: Path | str, deadline: float, alive: Any = None) -> RawQMP:
        """Connect to ``path`` (a str: already short enough for AF_UNIX, see ``short_path``)."""
        target = path if isinstance(path, str) else short_path(path)
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(target)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline or (alive is not None and not alive()):
                    raise BareQMPError(f"QMP socket {path} did not answer") from None
                time.sleep(0.0005)
        s.settimeout(max(deadline - time.monotonic(), 0.1))
        q = cls(s)
        greeting = q._read()
        if "QMP" not in greeting:
            raise BareQMPError(f"unexpected QMP greeting {greeting!r}")
        return q

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BareQMPError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, cmd: str, args: dict[str, Any] | None = None, fds: list[int] | None = None) -> Any:
        msg = json.dumps({"execute": cmd, **({"arguments": args} if args else {})}).encode()
        if fds:
            socket.send_fds(self.sock, [msg], fds)
        else:
            self.sock.sendall(msg)
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise BareQMPError(f"{cmd}: {r['error'].get('desc')}")
            return r.get("return")

    def wait_event(self, name: str) -> dict[str, Any]:
        for i, e in enumerate(self.events):
            if e.get("event") == name:
                return self.events.pop(i)
        while True:
            r = self._read()
            if r.get("event") == name:
                return r
            if "event" in r:
                self.events.append(r)

    def close(self) -> None:
        self.sock.close()


@dataclass
class BareRestore:
    """Phase timings (seconds) of one bare restore, from just before the exec."""

    spawn_to_qmp_s: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0
    pid: int = 0
    phases: dict[str, float] = field(default_factory=dict)


def bare_restore(argv: list[str], cwd: Path, state: Path, timeout: float = 30.0) -> tuple[BareRestore, subprocess.Popen[bytes]]:
    """Start ``argv`` (which must end in ``-incoming defer``) in ``cwd`` and restore ``state``.

    The QMP socket is ``cwd/run/qmp.sock`` as in vmfork's command line. Returns the timings
    and the running QEMU (the caller stops it with :func:`bare_quit`).
    """
    (cwd / "run" / "qmp.sock").unlink(missing_ok=True)
    sock = short_path(cwd / "run" / "qmp.sock")  # AF_UNIX paths are short; resolved before the clock starts
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        q = RawQMP.connect(sock, t0 + timeout, alive=lambda: p.poll() is None)
        t_qmp = time.monotonic()
        try:
            q.execute("qmp_capabilities")
            q.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "x-ignore-shared", "state": True},
                                        {"capability": "events", "state": True}]})
            q.execute("getfd", {"fdname": "state"}, fds=[fd])
            q.execute("migrate-incoming", {"uri": "fd:state"})
            while True:
                status = q.wait_event("MIGRATION").get("data", {}).get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise BareQMPError(f"incoming migration {status}")
            q.execute("cont")
            t1 = time.monotonic()
        finally:
            q.close()
    except BaseException:
        p.kill()
        p.wait()
        raise
    finally:
        os.close(fd)
    r = BareRestore(spawn_to_qmp_s=t_qmp - t0, load_s=t1 - t_qmp, total_s=t1 - t0, pid=p.pid)
    return r, p


def bare_quit(p: subprocess.Popen[bytes], cwd: Path) -> None:
    try:
        q = RawQMP.connect(cwd / "run" / "qmp.sock", time.monotonic() + 2)
        q.execute("qmp_capabilities")
        try:
            q.execute("quit")
        except BareQMPError:
            pass
        q.close()
    except (OSError, BareQMPError):
        p.kill()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# --- a pool of pre-started VMMs: the prototype the bench measures ---------------------------
FICLONE = 0x40049409


@dataclass
class Prestarted:
    """A QEMU started ahead of any fork, in a staging dir on placeholder files, waiting in
    ``-incoming defer`` with QMP negotiated."""

    proc: subprocess.Popen[bytes]
    qmp: RawQMP
    start_s: float  # exec to ready: what a pool takes off a fork's critical path


def prestart(argv: list[str], stage: Path, sizes: dict[str, int], timeout: float = 30.0) -> Prestarted:
    """Start ``argv`` (ending in ``-incoming defer``) in ``stage`` on placeholder files of
    ``sizes`` (name → bytes: the mem-file and the disk, sized as the fork's will be: QEMU
    reads their sizes when it starts)."""
    for d in ("run", "logs"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        with open(stage / name, "wb") as f:
            f.truncate(size)
    sock = short_path(stage / "run" / "qmp.sock")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=stage, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        q = RawQMP.connect(sock, t0 + timeout, alive=lambda: p.poll() is None)
        q.execute("qmp_capabilities")
    except BaseException:
        p.kill()
        p.wait()
        raise
    return Prestarted(p, q, time.monotonic() - t0)


def claim(pre: Prestarted, stage: Path, final: Path, files: dict[str, Path], state: Path) -> BareRestore:
    """Make the pre-started VMM a fork: clone each source file *into the inode QEMU already
    holds open* (``FICLONE`` onto the placeholder: the fork's own inode, never the source's),
    rename the staging dir to its final name (QEMU's cwd and sockets move with it), load the
    device state, ``cont``. Timed from the first clone to the guest running."""
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        t0 = time.monotonic()
        for name, src in files.items():
            sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            dfd = os.open(stage / name, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            finally:
                os.close(sfd)
                os.close(dfd)
        t_clone = time.monotonic()
        os.rename(stage, final)
        q = pre.qmp
        q.execute("migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": True},
                                    {"capability": "events", "state": True}]})
        q.execute("getfd", {"fdname": "state"}, fds=[fd])
        q.execute("migrate-incoming", {"uri": "fd:state"})
        while True:
            status = q.wait_event("MIGRATION").get("data", {}).get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise BareQMPError(f"incoming migration {status}")
        q.execute("cont")
        t1 = time.monotonic()
    finally:
        os.close(fd)
    return BareRestore(load_s=t1 - t_clone, total_s=t1 - t0, pid=pre.proc.pid, phases={"clone_s": t_clone - t0})
