"""The exec mux (guest/mux.py, guest/muxctl.py) in front of the real guest agent in its test
mode: the real mux process, real sockets, real commands (run on the host by the agent).
The agent process stands in for the VMM the mux serves (its pid is what the record names)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.conftest import AgentServer
from vmfork import retry
from vmfork.errors import ExecAborted
from vmfork.guest import mux as muxmod
from vmfork.guest import muxctl
from vmfork.guest.agent import AgentClient, ExecResult
from vmfork.layout import GuestDir
from vmfork.locking import file_lock
from vmfork.procs import ProcRef

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def guest(agent_server: AgentServer, tmp_path: Path) -> Iterator[tuple[GuestDir, ProcRef, Callable[[], AgentClient]]]:
    g = GuestDir(tmp_path / "g")
    g.ensure_dirs()
    vmm = ProcRef.of(agent_server.proc.pid)
    yield g, vmm, lambda: AgentClient.connect_unix(agent_server.sock, 5.0)
    rec = muxctl.record(g)
    if rec is not None:
        rec.proc.kill(timeout=2)


def _gone(pid: int, within: float = 10.0) -> bool:
    return any(not Path(f"/proc/{pid}").exists() for _ in retry.attempts(within))


def test_concurrent_execs_share_one_agent_connection(guest) -> None:
    g, vmm, connect_agent = guest
    results: dict[int, ExecResult] = {}

    def one(i: int) -> None:
        argv = ["sh", "-c", f"sleep 0.5; echo out{i}; echo err{i} >&2; exit {i}"]
        with file_lock(g.path / "lock", what="test"):  # as Manager.exec: locked to start only
            c = muxctl.connect(g, vmm, connect_agent)
            rid = c.start_exec(argv)
        with c:
            results[i] = c.wait_exec(rid, argv)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: (r.exit_code, r.stdout, r.stderr) for i, r in results.items()} == {
        i: (i, f"out{i}\n".encode(), f"err{i}\n".encode()) for i in range(8)
    }
    rec = muxctl.record(g)
    assert rec is not None and rec.vmm == vmm
    mode = (g.run / muxctl.EXEC_SOCK).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    # one mux served them all: the log names one process
    assert (g.logs / muxctl.MUX_LOG).read_text().count("serving") == 1


def test_client_gone_kills_its_command(guest) -> None:
    g, vmm, connect_agent = guest
    c = muxctl.connect(g, vmm, connect_agent)
    rid = c.start_exec(["sh", "-c", "sleep 300 & echo $! $$; wait"])
    pids = [int(p) for p in c.recv_frame(rid, 10, "pids").payload.split()]
    c.close()  # as a killed `vmfork exec` does
    assert all(_gone(p) for p in pids), "the command outlived its client"
    with muxctl.connect(g, vmm, connect_agent) as c2:  # the mux serves on
        assert c2.exec(["echo", "ok"]).stdout == b"ok\n"


def test_end_execs_aborts_every_exec_with_the_reason(guest) -> None:
    g, vmm, connect_agent = guest
    errors: list[str] = []
    pids: list[int] = []
    started = threading.Semaphore(0)

    def long() -> None:
        with file_lock(g.path / "lock", what="test"):
            c = muxctl.connect(g, vmm, connect_agent)
        with c:
            def note(chunk: bytes) -> None:
                pids.append(int(chunk))
                started.release()

            try:
                c.exec(["sh", "-c", "echo $$; exec sleep 300"], on_stdout=note)
            except ExecAborted as e:
                errors.append(str(e))

    threads = [threading.Thread(target=long) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=20)
    rec = muxctl.record(g)
    assert rec is not None
    muxctl.end_execs(g, "the instance was put in standby", wait_s=5.0)
    for t in threads:
        t.join(timeout=20)
    assert errors == ["the instance was put in standby"] * 3
    # it waited for the kills: the commands are gone now, not eventually
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert not rec.proc.alive()
    assert not (g.run / muxctl.MUX_JSON).exists() and not (g.run / muxctl.EXEC_SOCK).exists()
    with muxctl.connect(g, vmm, connect_agent) as c:  # a new mux starts on demand
        assert c.exec(["echo", "again"]).stdout == b"again\n"


def test_lost_agent_aborts_execs(guest, agent_server: AgentServer) -> None:
    g, vmm, connect_agent = guest
    with muxctl.connect(g, vmm, connect_agent) as c:
        rid = c.start_exec(["sh", "-c", "echo go; exec sleep 300"])
        assert c.recv_frame(rid, 10, "start").payload == b"go\n"
        agent_server.proc.kill()  # the "VMM" dies
        with pytest.raises(ExecAborted, match="guest agent connection was closed"):
            c.wait_exec(rid, ["sh"])
    rec = muxctl.record(g)
    assert rec is None or rec.proc.wait_exit(10)


def test_idle_mux_exits_and_a_new_one_starts(guest, monkeypatch: pytest.MonkeyPatch) -> None:
    g, vmm, connect_agent = guest
    monkeypatch.setattr(muxctl, "IDLE_S", 0.2)
    with muxctl.connect(g, vmm, connect_agent) as c:
        assert c.exec(["echo", "1"]).stdout == b"1\n"
    rec = muxctl.record(g)
    assert rec is not None and rec.proc.wait_exit(10), "the idle mux did not exit"
    assert not (g.run / muxctl.EXEC_SOCK).exists()
    with muxctl.connect(g, vmm, connect_agent) as c:
        assert c.exec(["echo", "2"]).stdout == b"2\n"
    rec2 = muxctl.record(g)
    assert rec2 is not None and rec2.proc != rec.proc


def test_a_mux_of_another_vmm_is_replaced(guest, agent_server: AgentServer) -> None:
    g, vmm, connect_agent = guest
    with muxctl.connect(g, vmm, connect_agent) as c:
        c.exec(["true"])
    old = muxctl.record(g)
    other = ProcRef(vmm.pid, vmm.start + 1)  # as if the VMM had been restarted
    muxctl.end_execs(g, "restart")  # the old mux let go of the (single) agent connection
    assert old is not None and not old.proc.alive()
    with muxctl.connect(g, other, connect_agent) as c:
        assert c.exec(["echo", "new"]).stdout == b"new\n"
    new = muxctl.record(g)
    assert new is not None and new.vmm == other


def test_slow_client_is_held_and_does_not_stall_others(agent_server: AgentServer, tmp_path: Path) -> None:
    """A client that does not read gets its command's output held in the guest: the mux
    buffers about CLIENT_HIGH for it, other clients go on, and nothing is lost."""
    up = AgentClient.connect_unix(agent_server.sock, 5.0)
    path = tmp_path / "exec.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    mux = muxmod.Mux(socket.socket(fileno=os.dup(up.fileno())), listener, idle_s=600)
    up.close()
    loop = threading.Thread(target=mux.run, daemon=True)
    loop.start()

    def client() -> AgentClient:
        c = AgentClient.connect_unix(path, 5.0, handshake=False)
        c.recv_frame(0, 5, "hello")
        return c

    total = 64 << 20
    done = tmp_path / "done"
    slow = client()
    rid = slow.start_exec(["sh", "-c", f"head -c {total} /dev/zero; touch {done}"])
    assert any(any(c.held for c in list(mux.clients)) for _ in retry.attempts(20)), "never held"
    with client() as fast:  # not stalled behind the slow one
        assert fast.exec(["echo", "fast"]).stdout == b"fast\n"
    assert not done.exists()  # the command waits for its reader
    buffered = max(len(c.out) for c in list(mux.clients))
    assert buffered < muxmod.CLIENT_HIGH + (4 << 20)
    got = 0

    def count(chunk: bytes) -> None:
        nonlocal got
        got += len(chunk)

    r = slow.wait_exec(rid, ["sh"], on_stdout=count)
    assert (r.exit_code, got) == (0, total) and done.exists()
    slow.close()
    mux.stop_requested = True
    mux.wake_w.send(b"t")
    loop.join(timeout=10)
    assert mux.done


def test_interactive_exec_through_the_mux(guest) -> None:
    """stdin, its acks, EOF and resizes pass the mux (targets rewritten per client: a client
    cannot reach another's exec), and a gone client's tty command is killed."""
    g, vmm, connect_agent = guest
    argv = ["sh", "-c", "read x; echo got:$x; exec cat"]
    with muxctl.connect(g, vmm, connect_agent) as c, muxctl.connect(g, vmm, connect_agent) as other:
        rid = c.start_exec(argv, interactive=True)
        stdin = c.stdin_of(rid)
        stdin.write(b"one\n")
        assert _output(c, rid, b"got:one\n") == b"got:one\n"
        orid = other.start_exec(["sleep", "300"], interactive=True)
        other._send_raw(muxmod.proto.STDIN, muxmod.proto.encode_target(rid) + b"intruder\n")
        other._send_raw(muxmod.proto.STDIN_EOF, muxmod.proto.encode_target(rid))
        big = os.urandom(1 << 20)  # four windows: written only as the acks come back
        done = threading.Thread(target=lambda: (stdin.write(big), stdin.close()))
        done.start()
        r = c.wait_exec(rid, argv)
        done.join(10)
        assert r.exit_code == 0 and r.stdout == big  # nothing of the intruder's
        other.kill(orid)
        assert other.wait_exec(orid, ["sleep"]).signal == 9

    c = muxctl.connect(g, vmm, connect_agent)
    rid = c.start_exec(["sh", "-c", "echo $$; stty size; exec sleep 300"], interactive=True, tty=True,
                       rows=12, cols=34)
    out = _output(c, rid, b"12 34")
    pid = int(out.split()[0])
    c.close()
    assert _gone(pid), "the tty command outlived its client"


def _output(c: AgentClient, rid: int, until: bytes) -> bytes:
    """Output of exec ``rid`` up to ``until`` (stdin acks skipped)."""
    out = b""
    while until not in out:
        f = c.recv_frame(rid, 10, "output")
        if f.type != muxmod.proto.STDIN_ACK:
            out += f.payload
    return out
