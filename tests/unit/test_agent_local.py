"""The real guest agent (agent.c) and the real host client, without a VM: the agent
is compiled for the host and run in its test mode (``--listen-unix PATH``), which
serves the protocol on a unix socket and never sets the clock or powers off."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmfork import retry
from vmfork.errors import AgentError, AgentTimeout
from vmfork.guest import AgentClient, wait_ready
from vmfork.guest import protocol as proto

pytestmark = pytest.mark.timeout(60)


def connect(sock: Path) -> AgentClient:
    return AgentClient.connect_unix(sock, timeout=5.0)


def test_exec_basics(agent: Path) -> None:
    with connect(agent) as c:
        r = c.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.signal) == (
            3, b"out\n", b"err\n", False, None,
        )
        r = c.exec(["sh", "-c", 'echo "$FOO"; pwd'], env={"FOO": "bar baz"}, cwd="/")
        assert r.stdout == b"bar baz\n/\n"
        r = c.exec(["sh", "-c", "kill -TERM $$"])
        assert (r.exit_code, r.signal) == (143, 15)


def test_exec_failures(agent: Path) -> None:
    with connect(agent) as c:
        r = c.exec(["/nonexistent/program"])
        assert r.exit_code == 127 and b"cannot execute /nonexistent/program" in r.stderr
        r = c.exec(["true"], cwd="/nonexistent-dir")
        assert r.exit_code == 127 and b"cannot change directory" in r.stderr


def test_binary_output_and_stdin(agent: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB with NULs
    with connect(agent) as c:
        r = c.exec(["cat"], stdin=data)
        assert r.exit_code == 0 and r.stdout == data
        r = c.exec(["sha256sum"], stdin=data)
        assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        # the command does not read its stdin at all
        r = c.exec(["true"], stdin=b"x" * (1 << 20))
        assert r.exit_code == 0


def test_large_output_streamed(agent: Path) -> None:
    chunks: list[bytes] = []
    with connect(agent) as c:
        r = c.exec(["head", "-c", str(30 << 20), "/dev/zero"], on_stdout=chunks.append)
    assert r.exit_code == 0 and r.stdout == b""
    assert sum(map(len, chunks)) == 30 << 20 and len(chunks) > 1


def test_timeout_kills_process_group(agent: Path) -> None:
    with connect(agent) as c:
        t0 = time.monotonic()
        r = c.exec(["sh", "-c", "sleep 30 & sleep 30; echo never"], timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert r.timed_out and r.exit_code == 124 and r.signal == 9 and r.stdout == b""


def test_background_child_does_not_block_exit(agent: Path) -> None:
    with connect(agent) as c:
        t0 = time.monotonic()
        r = c.exec(["sh", "-c", "sleep 5 & echo started"])
        assert r.stdout == b"started\n" and time.monotonic() - t0 < 3


def test_disconnect_mid_request_then_reconnect(agent: Path) -> None:
    c = connect(agent)
    rid = c._send(proto.EXEC, proto.encode_exec(["sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.1; done"]))
    assert c.recv_frame(rid, 5, "first output").payload == b"1\n"  # it runs: now go away
    c.close()
    with connect(agent) as c2:
        r = c2.exec(["echo", "fresh"])
        assert r.stdout == b"fresh\n"  # nothing of the old command leaks in


def test_disconnect_during_large_output_command_still_finishes(agent: Path, tmp_path: Path) -> None:
    done = tmp_path / "done"
    c = connect(agent)
    script = f"head -c 50000000 /dev/zero; touch {done}"
    c._send(proto.EXEC, proto.encode_exec(["sh", "-c", script]))
    assert c._sock.recv(65536)  # output is flowing
    c.close()
    with connect(agent) as c2:
        assert c2.exec(["echo", "ok"]).stdout == b"ok\n"
    assert any(done.exists() for _ in retry.attempts(20)), "the command stalled after its host went away"


def test_garbage_and_errors(agent: Path) -> None:
    with connect(agent) as c:
        c._sock.sendall(b"\0garbage VFK")
        c._sock.sendall(b"VFK1P" + b"\0\0\0\1" + b"\xff\xff\xff\xff")  # oversize header
        c.ping()
        rid = c._send(b"V")
        frame = c._recv(rid, time.monotonic() + 5, "unknown")
        assert frame.type == proto.ERROR and b"unknown request type 'V'" in frame.payload
        rid = c._send(proto.KILL, b"\0")  # the target must be 4 bytes
        frame = c._recv(rid, time.monotonic() + 5, "bad kill")
        assert frame.type == proto.ERROR and b"4-byte request id" in frame.payload
        rid = c._send(proto.EXEC, b"\0\0")
        frame = c._recv(rid, time.monotonic() + 5, "bad exec")
        assert frame.type == proto.ERROR and b"malformed" in frame.payload
        with pytest.raises(AgentError, match="environment"):
            c.exec(["true"], env={"A=B": "x"})
        assert c.exec(["echo", "still fine"]).stdout == b"still fine\n"


def test_sync_set_time_poweroff(agent: Path) -> None:
    with connect(agent) as c:
        c.sync()
        c.set_time()  # test mode: acknowledged, clock untouched
        c.poweroff()  # test mode: the agent exits
    with pytest.raises(AgentError):
        AgentClient.connect_unix(agent, timeout=1.0)


def test_set_hostname_validates_and_acknowledges(agent: Path) -> None:
    with connect(agent) as c:
        c.set_hostname("fork-7")  # test mode: acknowledged, hostname untouched
        for bad in ("", "x" * 65, "a\0b"):
            with pytest.raises(AgentError, match="set-hostname"):
                c.set_hostname(bad)
        assert c.exec(["echo", "still here"]).stdout == b"still here\n"


def test_wait_ready(agent: Path, tmp_path: Path) -> None:
    c = wait_ready(lambda: AgentClient.connect_unix(agent, timeout=1.0), 5.0)
    c.close()
    missing = tmp_path / "nothing.sock"
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout, match="not ready"):
        wait_ready(lambda: AgentClient.connect_unix(missing, timeout=0.2), 0.5)
    assert time.monotonic() - t0 < 2
    with pytest.raises(AgentError, match="VMM exited"):
        wait_ready(lambda: AgentClient.connect_unix(missing, timeout=0.2), 5, alive=lambda: False)


def test_vsock_uds_handshake(agent: Path, tmp_path: Path) -> None:
    """Firecracker's hybrid vsock, played by a tiny proxy: CONNECT <port> → OK <n>."""
    uds = tmp_path / "v.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(uds))
    srv.listen(1)
    seen: list[bytes] = []

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        conn, _ = srv.accept()
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        seen.append(line)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(str(agent))
        conn.sendall(b"OK 1073741824\n")
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
        pipe(conn, up)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with AgentClient.connect_vsock_uds(uds, 52, timeout=5.0) as c:
        assert c.exec(["echo", "via vsock"]).stdout == b"via vsock\n"
    assert seen == [b"CONNECT 52\n"]
    srv.close()


def _gone(pid: int, within: float = 10.0) -> bool:
    return any(not Path(f"/proc/{pid}").exists() for _ in retry.attempts(within))


def test_kill_frame_kills_the_process_group(agent: Path) -> None:
    with connect(agent) as c:
        rid = c.start_exec(["sh", "-c", "sleep 300 & echo $! $$; wait"])
        pids = [int(p) for p in c.recv_frame(rid, 5, "pids").payload.split()]
        c.kill(rid)
        r = c.wait_exec(rid, ["sh"])
        assert (r.exit_code, r.signal) == (137, 9)
        assert all(_gone(p) for p in pids), "a process of the killed command survived"
        c._send(proto.KILL, proto.encode_target(rid))  # finished, or unknown: ignored
        c._send(proto.KILL, proto.encode_target(12345))
        assert c.exec(["echo", "still fine"]).stdout == b"still fine\n"


def test_hold_and_go_output(agent: Path, tmp_path: Path) -> None:
    """HOLD stops the agent reading a command's output; GO resumes it; nothing is lost.
    Deterministic: the agent serves every ready descriptor in one poll round, so once the
    command has written, a ping's answer is followed by its output unless it is held."""
    gate, written = tmp_path / "gate", tmp_path / "written"
    os.mkfifo(gate)
    with connect(agent) as c:
        rid = c.start_exec(["sh", "-c", f"cat {gate} >/dev/null; echo data; touch {written}; exec sleep 300"])
        c._send(proto.HOLD, proto.encode_target(rid))
        with open(gate, "wb"):
            pass  # let the command go on
        assert any(written.exists() for _ in retry.attempts(10))
        seen: list[bytes] = []
        for _ in range(2):
            pid = c._send(proto.PING, b"x")
            while (f := c._reader.next_frame()) is None or f.req_id != pid:
                if f is not None:
                    seen.append(f.type)
                else:
                    c._reader.feed(c._sock.recv(65536))
        assert proto.STDOUT not in seen, "output of a held command was read"
        c._send(proto.GO, proto.encode_target(rid))
        assert c.recv_frame(rid, 10, "output after GO") == proto.Frame(proto.STDOUT, rid, b"data\n")
        c.kill(rid)
        assert c.wait_exec(rid, ["sh"]).signal == 9


def test_buffered_output_is_capped_and_says_so(agent: Path) -> None:
    with connect(agent) as c:
        r = c.exec(["sh", "-c", "head -c 5000 /dev/zero; head -c 300 /dev/zero >&2"], max_output=1000)
    assert (len(r.stdout), r.stdout_dropped, len(r.stderr), r.stderr_dropped) == (1000, 4000, 300, 0)
    assert r.truncated and r.exit_code == 0


def test_interrupted_wait_kills_the_command(agent: Path) -> None:
    pids: list[int] = []

    def interrupt(chunk: bytes) -> None:
        pids.append(int(chunk))
        raise KeyboardInterrupt  # as Ctrl-C in `vmfork exec` would

    with connect(agent) as c:
        with pytest.raises(KeyboardInterrupt):
            c.exec(["sh", "-c", "echo $$; exec sleep 300"], on_stdout=interrupt)
        assert pids and _gone(pids[0]), "the interrupted command still runs"
        assert c.exec(["echo", "next"]).stdout == b"next\n"
