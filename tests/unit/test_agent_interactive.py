"""Interactive exec against the real guest agent (agent.c in its host test mode): stdin
streamed with flow control, EOF, a PTY with its window size and resizes, kills."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

import pytest

from vmfork.guest import AgentClient
from vmfork.guest import protocol as proto
from vmfork.guest.agent import ExecResult, ExecStdin

pytestmark = pytest.mark.timeout(60)


class Session:
    """An interactive exec whose output a thread collects (``expect`` waits for a pattern)."""

    def __init__(self, c: AgentClient, argv: list[str], **kw: object) -> None:
        self.rid = c.start_exec(argv, interactive=True, **kw)  # type: ignore[arg-type]
        self.stdin: ExecStdin = c.stdin_of(self.rid)
        self.out = bytearray()
        self.cond = threading.Condition()
        self.result: ExecResult | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                r = c.wait_exec(self.rid, argv, on_stdout=self._add, on_stderr=self._add)
            except BaseException as e:  # reported by wait()
                self.error = e
                r = None
            with self.cond:
                self.result = r
                self.cond.notify_all()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def _add(self, chunk: bytes) -> None:
        with self.cond:
            self.out += chunk
            self.cond.notify_all()

    def expect(self, pattern: bytes, timeout: float = 15.0) -> re.Match[bytes]:
        end = time.monotonic() + timeout
        with self.cond:
            while (m := re.search(pattern, bytes(self.out))) is None:
                left = end - time.monotonic()
                assert left > 0 and self.result is None and self.error is None, \
                    f"{pattern!r} not seen; output so far: {bytes(self.out)!r}"
                self.cond.wait(left)
            del self.out[: m.end()]
            return m

    def wait(self, timeout: float = 15.0) -> ExecResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the command did not end; output: {bytes(self.out)!r}"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone for our purpose
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def test_conversation_over_stdin(agent: Path) -> None:
    with AgentClient.connect_unix(agent, 5.0) as c:
        s = Session(c, ["sh", "-c", "read x; echo got:$x; read y; echo second:$y"])
        s.stdin.write(b"hello\n")
        s.expect(rb"got:hello\n")  # answered before the next line is sent
        s.stdin.write(b"bye\n")
        s.expect(rb"second:bye\n")
        assert s.wait().exit_code == 0


def test_eof_ends_cat_and_big_stdin_is_flow_controlled(agent: Path) -> None:
    data = os.urandom(3 << 20)  # > the window many times: writes wait for the acks
    with AgentClient.connect_unix(agent, 5.0) as c:
        s = Session(c, ["sha256sum"])
        s.stdin.write(data[:1000])
        s.stdin.write(data[1000:])
        s.stdin.close()
        r = s.wait()
        assert r.exit_code == 0
        assert s.expect(rb"[0-9a-f]{64}").group().decode() == hashlib.sha256(data).hexdigest()
        s = Session(c, ["cat"])
        s.stdin.write(b"line\n")
        s.expect(rb"line\n")
        s.stdin.close()
        assert s.wait().exit_code == 0
        with pytest.raises(BrokenPipeError):
            s.stdin.write(b"too late")


def test_a_command_not_reading_blocks_the_writer_within_the_window(agent: Path) -> None:
    with AgentClient.connect_unix(agent, 5.0) as c:
        s = Session(c, ["sh", "-c", "echo $$; exec sleep 300"])
        pid = int(s.expect(rb"(\d+)\n").group(1))
        with pytest.raises(Exception, match="does not read its stdin"):
            s.stdin.write(b"x" * (4 << 20), timeout=2.0)  # the pipe (64 KiB) + agent queue fill up
        c.kill(s.rid)
        assert s.wait().signal == 9 and _gone(pid)


def test_tty_size_resize_and_winch(agent: Path) -> None:
    script = ("tty; stty size; trap 'echo winch; stty size' WINCH; echo ready; "
              "i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done")
    with AgentClient.connect_unix(agent, 5.0) as c:
        s = Session(c, ["sh", "-c", script], tty=True, rows=30, cols=100)
        assert re.fullmatch(rb"/dev/pts/\d+", s.expect(rb"(\S+)\r\n").group(1))
        s.expect(rb"30 100\r\n")
        s.expect(rb"ready\r\n")
        s.stdin.resize(40, 120)
        s.expect(rb"winch\r\n40 120\r\n")
        c.kill(s.rid)
        assert s.wait().signal == 9


def test_tty_stdin_eof_and_stderr_on_the_terminal(agent: Path) -> None:
    with AgentClient.connect_unix(agent, 5.0) as c:
        s = Session(c, ["sh", "-c", "echo to-stderr >&2; [ -t 0 ] && [ -t 2 ] && echo isatty; "
                                    "echo term=$TERM; exec cat"], tty=True)
        s.expect(rb"to-stderr\r\n")
        s.expect(rb"isatty\r\nterm=xterm\r\n")
        s.stdin.write(b"abc\n")
        s.expect(rb"abc\r\n")  # echoed by the terminal, then by cat
        s.stdin.close()  # ^D at the start of a line: cat reads end of file
        r = s.wait()
        assert r.exit_code == 0 and r.stderr == b""


def test_last_tty_output_before_exit_is_not_lost(agent: Path) -> None:
    with AgentClient.connect_unix(agent, 5.0) as c:
        for _ in range(5):
            s = Session(c, ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo END"], tty=True)
            r = s.wait()
            assert r.exit_code == 0
            assert s.expect(rb"END\r\n") and s.out == b""


def test_stdin_frames_for_unknown_or_finished_execs_are_ignored(agent: Path) -> None:
    with AgentClient.connect_unix(agent, 5.0) as c:
        c._send_raw(proto.STDIN, proto.encode_target(4242) + b"data")
        c._send_raw(proto.STDIN_EOF, proto.encode_target(4242))
        c._send_raw(proto.RESIZE, proto.encode_resize(4242, 10, 10))
        assert c.exec(["echo", "fine"]).stdout == b"fine\n"
        with pytest.raises(Exception, match="malformed"):
            c.request(proto.RESIZE, b"\0\0", proto.PONG, 5.0, "bad resize")


def test_errors_from_the_guest_are_bounded_and_printable(tmp_path: Path) -> None:
    """A guest's error text reaches the host cut short and without control characters."""
    import socket

    a, b = socket.socketpair()
    with AgentClient(a, "test") as c:
        rid = c.start_exec(["true"])
        frame = proto.encode_frame(proto.ERROR, rid, b"\x1b[31mred\n" + b"x" * (1 << 20))
        threading.Thread(target=b.sendall, args=(frame,), daemon=True).start()  # read meanwhile
        with pytest.raises(Exception) as info:
            c.wait_exec(rid, ["true"])
        text = str(info.value)
        assert len(text) < 400 and "\x1b" not in text and "\n" not in text and "red" in text
    b.close()
