"""The real guest agent (agent.c) and the real host client, without a VM: the agent
is compiled for the host and run in its test mode (``--listen-unix PATH``), which
serves the protocol on a unix socket and never sets the clock or powers off."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork.errors import AgentError, AgentTimeout
from vmfork.guest import AgentClient, wait_ready
from vmfork.guest import protocol as proto
from vmfork.images.build import compile_agent

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("musl-gcc") or shutil.which("gcc")):
        pytest.skip("no C compiler (musl-gcc or gcc) to build the agent")
    out = tmp_path_factory.mktemp("agent") / "vmfork-agent"
    compile_agent(out)
    return out


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([str(agent_bin), "--listen-unix", str(sock)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "agent did not start listening"
            time.sleep(0.01)
        yield sock
    finally:
        proc.kill()
        proc.wait()


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
    c._send(proto.EXEC, proto.encode_exec(["sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.1; done"]))
    time.sleep(0.15)
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
    deadline = time.monotonic() + 20
    while not done.exists():
        assert time.monotonic() < deadline, "the command stalled after its host went away"
        time.sleep(0.05)


def test_garbage_and_errors(agent: Path) -> None:
    with connect(agent) as c:
        c._sock.sendall(b"\0garbage VFK")
        c._sock.sendall(b"VFK1P" + b"\0\0\0\1" + b"\xff\xff\xff\xff")  # oversize header
        c.ping()
        rid = c._send(b"W")
        frame = c._recv(rid, time.monotonic() + 5, "unknown")
        assert frame.type == proto.ERROR and b"unknown request type 'W'" in frame.payload
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
