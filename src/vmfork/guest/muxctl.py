"""Start, find, reach and stop an instance's exec mux (the host side of ``guest/mux.py``).

The mux of a running instance is recorded in ``run/mux.json`` (its pid and start time,
and the VMM it serves) and listens on ``run/exec.sock`` (mode 0600). :func:`connect`
starts it lazily; :func:`end_execs` stops it, ending every exec with a reason, before
the manager takes the VMM down or talks to the agent itself. Both are called with the
instance lock held.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import vmfork
from vmfork.errors import AgentError, AgentTimeout
from vmfork.guest import protocol as proto
from vmfork.guest.agent import AgentClient
from vmfork.guest.mux import encode_shutdown
from vmfork.layout import GuestDir, short_path
from vmfork.procs import ProcRef
from vmfork.util import atomic_write_json

EXEC_SOCK = "exec.sock"
MUX_JSON = "mux.json"
MUX_LOG = "mux.log"
# Seconds without any client after which the mux exits (the next exec starts another).
IDLE_S = float(os.environ.get("VMFORK_MUX_IDLE", "60"))
# How long a client waits for the mux's greeting while the mux process is alive (a mux
# just started is importing Python; on a loaded host that takes a while).
HELLO_TIMEOUT = 30.0
_BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from vmfork.guest.mux import main; sys.exit(main())"


@dataclass(frozen=True)
class MuxRecord:
    proc: ProcRef
    vmm: ProcRef


class _Gone(AgentError):
    """The mux closed the connection before greeting it: it never saw our requests."""


def record(g: GuestDir) -> MuxRecord | None:
    """The instance's live mux, if any."""
    try:
        d = json.loads((g.run / MUX_JSON).read_text())
        rec = MuxRecord(ProcRef(int(d["pid"]), int(d["start"])),
                        ProcRef(int(d["vmm_pid"]), int(d["vmm_start"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if rec.proc.alive() else None


def connect(g: GuestDir, vmm: ProcRef, connect_agent: Callable[[], AgentClient]) -> AgentClient:
    """A connection to the exec mux of the instance whose VMM is ``vmm``, started (on an agent
    connection made by ``connect_agent``) if none serves that VMM."""
    last: AgentError | None = None
    for _ in range(3):
        rec = record(g)
        if rec is not None and rec.vmm != vmm:
            _stop(g, rec)  # left over from an earlier VMM
            rec = None
        if rec is None:
            rec = _spawn(g, vmm, connect_agent)
        try:
            return _open(g, rec)
        except _Gone as e:  # it was exiting (idle): start another
            last = e
            _stop(g, rec)
    raise AgentError(f"cannot reach the exec mux of {g.path.name}: {last}")


def end_execs(g: GuestDir, reason: str, *, wait_s: float = 0.0) -> None:
    """Stop the instance's mux, if one runs: every exec ends with ``reason`` and its command
    is killed in the guest (waiting up to ``wait_s`` for those to exit). Afterwards the
    agent channel is free for the manager's own connection."""
    rec = record(g)
    if rec is None:
        _clean(g, None)
        return
    try:
        with _open(g, rec) as client:
            client.request(proto.SHUTDOWN, encode_shutdown(reason, wait_s), proto.SHUTDOWN_DONE,
                           wait_s + 5.0, "exec mux shutdown")
    except AgentError:
        pass  # exiting already, or wedged: it is stopped below either way
    _stop(g, rec, wait_first=5.0)


def _open(g: GuestDir, rec: MuxRecord) -> AgentClient:
    try:
        client = AgentClient.connect_unix(g.run / EXEC_SOCK, 5.0, handshake=False)
    except AgentTimeout:
        raise
    except AgentError as e:
        raise _Gone(str(e)) from None
    deadline = time.monotonic() + HELLO_TIMEOUT
    try:
        while True:
            try:
                frame = client.recv_frame(0, min(0.5, max(deadline - time.monotonic(), 0.001)),
                                          "exec mux greeting")
            except AgentTimeout:
                if not rec.proc.alive():
                    raise _Gone("the exec mux exited") from None
                if time.monotonic() >= deadline:
                    raise
                continue
            except AgentError as e:
                raise _Gone(str(e)) from None
            if frame.type == proto.MUX_HELLO:
                return client
    except BaseException:
        client.close()
        raise


def _spawn(g: GuestDir, vmm: ProcRef, connect_agent: Callable[[], AgentClient]) -> MuxRecord:
    """Start a mux on a fresh agent connection and a listening ``run/exec.sock``, both
    opened here and inherited, so a client can connect at once."""
    sock_path = g.run / EXEC_SOCK
    agent = connect_agent()  # connected, and the agent answered a ping
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(listener.fileno(), 0o600)  # the socket file is created with this mode
        sock_path.unlink(missing_ok=True)
        listener.bind(short_path(sock_path))
        os.chmod(sock_path, 0o600)  # in case this kernel ignores the fchmod above
        listener.listen(64)
        afd, lfd = agent.fileno(), listener.fileno()
        pkg_parent = str(Path(vmfork.__file__).resolve().parent.parent)
        argv = [sys.executable, "-I", "-S", "-c", _BOOT, pkg_parent, "--agent-fd", str(afd),
                "--listen-fd", str(lfd), "--idle", str(IDLE_S), "--sock", f"run/{EXEC_SOCK}",
                "--record", f"run/{MUX_JSON}"]
        g.logs.mkdir(parents=True, exist_ok=True)
        with open(g.logs / MUX_LOG, "ab") as log:
            try:
                p = subprocess.Popen(argv, cwd=g.path, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, start_new_session=True, close_fds=True,
                                     pass_fds=(afd, lfd))
            except OSError as e:
                raise AgentError(f"cannot start the exec mux: {e.strerror}", transient=False) from None
        p.returncode = 0  # detached: found again by ProcRef; silence Popen's ResourceWarning
        try:
            proc = ProcRef.of(p.pid)
        except ProcessLookupError:
            raise AgentError(f"the exec mux exited at once (see {g.logs / MUX_LOG})",
                             transient=False) from None
        atomic_write_json(g.run / MUX_JSON, {"pid": proc.pid, "start": proc.start,
                                             "vmm_pid": vmm.pid, "vmm_start": vmm.start},
                          durable=False)
        return MuxRecord(proc, vmm)
    finally:
        listener.close()
        agent.close()  # ours only: the mux holds its own descriptor of the connection


def _stop(g: GuestDir, rec: MuxRecord, *, wait_first: float = 0.0) -> None:
    """Give the mux ``wait_first`` s to exit by itself (it was told to shut down), then
    SIGTERM it (it aborts its clients and exits), SIGKILL after 2 s."""
    if not rec.proc.wait_exit(wait_first):
        rec.proc.kill(timeout=2.0)
    _clean(g, rec)


def _clean(g: GuestDir, rec: MuxRecord | None) -> None:
    """Remove the record and socket of a mux that is gone."""
    path = g.run / MUX_JSON
    with contextlib.suppress(OSError, ValueError, KeyError):
        d = json.loads(path.read_text())
        if rec is None or int(d["pid"]) == rec.proc.pid:
            path.unlink()
    if not path.exists():
        (g.run / EXEC_SOCK).unlink(missing_ok=True)
