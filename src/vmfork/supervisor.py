"""Why a VMM died: its exit status, kept by a tiny shell that waits for it.

A VMM runs detached (its own session) and outlives the vmfork command that started it, so
nobody would collect its exit status: a QEMU killed by SIGBUS (its file-backed guest RAM
could not get a block on a full filesystem) would look like any other vanished process.

So the VMM is started by ``/bin/sh``, which starts it as its own child, prints the child's
pid on its stdout (a pipe to vmfork, which records the VMM's pid as before), closes that
pipe, waits for the child and writes ``exit <pid> <status>`` (the shell's status: 128+N for
signal N) into ``run/vmm-exit``. The shell costs ~1 MiB of RSS and no CPU while it waits,
and adds one fork+exec (~1 ms) to a VMM start. Alternatives ruled out: a Python supervisor
(~10 MiB and ~30 ms of start-up per VMM), the proc connector (root only, and only while a
listener runs), and guessing from free space after the fact (space may be freed since).

The record is written in place into a file created, with its block allocated, before the
VMM starts (``1<>`` opens without truncating): it can be written on a full filesystem,
which is exactly when it matters. The VMM gets its own session, as before (util-linux
``setsid``, which execs it under the same pid). Like any background job of a
non-interactive shell, it starts with SIGINT and SIGQUIT ignored; vmfork stops VMMs with
QMP, SIGTERM or SIGKILL. After starting it, the shell ignores SIGHUP, SIGINT and SIGTERM,
so it is there to record the VMM's end.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmfork.layout import GuestDir
from vmfork.procs import ProcRef, recorded

#: Where the record goes, relative to the guest dir (the VMM's and the shell's cwd).
EXIT_FILE = "run/vmm-exit"
_RECORD_LEN = 64  # bytes: the placeholder and every record have exactly this length

_SCRIPT = (
    'f=$1; shift; "$@" >&2 & p=$!; echo "$p"; exec >&-; trap "" HUP INT TERM; '
    'wait "$p"; s=$?; printf "%-63s\\n" "exit $p $s" 1<>"$f"'
)


@dataclass(frozen=True)
class VmmExit:
    """How a supervised VMM ended."""

    pid: int
    status: int  # the shell's view: the exit code, or 128 + the signal number

    @property
    def signal(self) -> int | None:
        return self.status - 128 if self.status > 128 else None

    @property
    def code(self) -> int | None:
        return None if self.status > 128 else self.status

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"was killed by {name}"
        return f"exited with status {self.code}"


def start_supervised(argv: list[str], cwd: Path, *, start: Callable[..., subprocess.Popen[bytes]] | None = None,
                     **popen_kw: Any) -> tuple[ProcRef, ProcRef]:
    """Start ``argv`` in ``cwd`` under the supervising shell; return (VMM, shell).

    ``popen_kw`` are ``subprocess.Popen`` arguments (``stderr`` is where the VMM's output
    goes; ``stdout`` is taken); ``start`` replaces ``subprocess.Popen``. Raises OSError if
    ``argv[0]`` cannot be executed or the shell does not report a pid.
    """
    if not os.access(argv[0], os.X_OK) and not _on_path(argv[0]):
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    record = Path(cwd) / EXIT_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record, "wb") as f:  # the placeholder: its block is what the shell writes into
        f.write(b"running".ljust(_RECORD_LEN - 1) + b"\n")
    sh = (start or subprocess.Popen)(
        ["/bin/sh", "-c", _SCRIPT, "vmfork-supervisor", EXIT_FILE, *_setsid(), *argv],
        cwd=cwd, stdout=subprocess.PIPE, **popen_kw,
    )
    assert sh.stdout is not None
    with sh.stdout:
        line = sh.stdout.readline()  # written by the shell right after it forked the VMM
    sh.returncode = 0  # detached: tracked by ProcRef; silence Popen's ResourceWarning
    shell = ProcRef.of(sh.pid)
    try:
        return ProcRef.of(int(line)), shell
    except (ValueError, ProcessLookupError):
        # The VMM was gone before we looked (it failed at once): a ref that is not alive.
        if line.strip().isdigit():
            return ProcRef(int(line), -1), shell
        raise OSError(f"the supervising shell did not start {argv[0]}") from None


@functools.cache
def _setsid() -> list[str]:
    path = shutil.which("setsid")
    return [path] if path else []


def _on_path(cmd: str) -> bool:
    return "/" not in cmd and shutil.which(cmd) is not None


def read_exit(guest_dir: Path) -> VmmExit | None:
    """The exit record in ``guest_dir``, or None if there is none (yet)."""
    try:
        words = (Path(guest_dir) / EXIT_FILE).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) == 3 and words[0] == "exit" and words[1].isdigit() and words[2].isdigit():
        return VmmExit(int(words[1]), int(words[2]))
    return None


def wait_exit_record(guest_dir: Path, vmm_pid: int, shell: ProcRef | None, timeout: float = 2.0) -> VmmExit | None:
    """The exit record of the VMM ``vmm_pid`` (already gone), once its shell has written it.

    None if there is none: the VMM was not supervised, or the shell was killed too.
    """
    if shell is not None:
        shell.wait_exit(timeout)
    ex = read_exit(guest_dir)
    return ex if ex is not None and ex.pid == vmm_pid else None


def vmm_ended(g: GuestDir) -> VmmExit | None:
    """How the VMM still recorded in ``run/vmm.json`` ended, if it has.

    vmfork removes that record whenever it stops a VMM itself (stop, standby): a record of a
    VMM that is gone means the VMM ended on its own, or was killed. None while it runs, if
    there is no record, or if its end was not recorded.
    """
    try:
        rec = json.loads(g.vmm_json.read_text())
        vmm = ProcRef(int(rec["pid"]), int(rec["start"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if vmm.alive():
        return None
    return wait_exit_record(g.path, vmm.pid, recorded(g.vmm_json, "supervisor"))


def death_cause(g: GuestDir) -> str | None:
    """Why this guest's VMM died, in words, if it died of something (not a clean exit).

    A VMM killed by SIGBUS while its guest RAM is a file here (QEMU's shared file mapping)
    died because a page of that file could not get a block: the filesystem was full.
    """
    ex = vmm_ended(g)
    if ex is None or ex.status == 0:
        return None
    if ex.signal == signal.SIGBUS and g.memory.exists():
        return ("guest RAM could not be written: filesystem full "
                "(no space for a page of its RAM file: the VMM was killed by SIGBUS)")
    return f"the VMM {ex.describe()}"
