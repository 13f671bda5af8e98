"""Host-side client of the guest agent (one connection per AgentClient).

The same client talks to the agent directly (the manager's own requests at boot, restore
and stop) or through the instance's exec mux (``guest/mux.py``), which speaks the same
protocol.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vmfork import retry
from vmfork.errors import AgentError, AgentTimeout, ExecAborted
from vmfork.guest import protocol as proto
from vmfork.layout import short_path

# How much longer than the guest-side timeout the host waits for an exec's exit frame.
EXEC_TIMEOUT_MARGIN_S = 10.0
_RECV_SIZE = 1 << 16
# Output an exec collects (no callback given) is kept up to this many bytes per stream;
# the rest is read and dropped, and counted in ExecResult.stdout_dropped/stderr_dropped.
MAX_BUFFERED_OUTPUT = 16 << 20
# Text a host-side abort carries (the mux's reason) is cut to this many characters.
_MAX_REASON = 300


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    signal: int | None
    stdout_dropped: int = 0  # bytes of stdout beyond the buffered-output cap (not kept)
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        return bool(self.stdout_dropped or self.stderr_dropped)


class _Capped:
    """Collects chunks up to ``limit`` bytes; counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def __call__(self, chunk: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            part = chunk[:room]
            self.parts.append(part)
            self.kept += len(part)
        self.dropped += max(0, len(chunk) - max(room, 0))

    def data(self) -> bytes:
        return b"".join(self.parts)


class ExecStdin:
    """The open stdin (and terminal) of an interactive exec (:meth:`AgentClient.start_exec`
    with ``interactive``). Every method may be called from any thread while another one
    relays the output (:meth:`AgentClient.wait_exec`): :meth:`write` blocks while
    ``proto.STDIN_WINDOW`` bytes are not acknowledged by the guest yet (the command is not
    reading), so nothing on the way buffers more than that."""

    def __init__(self, client: AgentClient, req_id: int, *, tty: bool) -> None:
        self._client, self.req_id, self.tty = client, req_id, tty
        self._cond = threading.Condition()
        self._inflight = 0
        self._eof = False
        self.ended = False  # the command exited (or its connection is gone)

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send ``data`` to the command's stdin. Raises BrokenPipeError once the command has
        exited, AgentTimeout if the window stays full for ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(data)
        for off in range(0, len(view), proto.STDIN_CHUNK):
            chunk = view[off : off + proto.STDIN_CHUNK]
            with self._cond:
                while not self.ended and self._inflight + len(chunk) > proto.STDIN_WINDOW:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise AgentTimeout("the command does not read its stdin")
                    self._cond.wait(left)
                if self.ended:
                    raise BrokenPipeError("the command has exited")
                if self._eof:
                    raise ValueError("stdin is closed already")
                self._inflight += len(chunk)
            self._client._send_raw(proto.STDIN, proto.encode_target(self.req_id) + bytes(chunk))

    def close(self) -> None:
        """End of stdin (on a tty: the VEOF character, ^D). Idempotent."""
        with self._cond:
            if self._eof or self.ended:
                self._eof = True
                return
            self._eof = True
        with contextlib.suppress(AgentError):
            self._client._send_raw(proto.STDIN_EOF, proto.encode_target(self.req_id))

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size (the command gets SIGWINCH); ignored without a tty."""
        try:
            payload = proto.encode_resize(self.req_id, rows, cols)
        except proto.ProtocolError as exc:
            raise AgentError(str(exc)) from None
        if self.tty and not self.ended:
            with contextlib.suppress(AgentError):
                self._client._send_raw(proto.RESIZE, payload)

    def _acked(self, n: int) -> None:
        with self._cond:
            self._inflight = max(0, self._inflight - n)  # a guest acking more gains nothing
            self._cond.notify_all()

    def _end(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()


def _transient(exc: OSError) -> bool:
    """Errors that go away once the VMM has created its socket or the agent listens."""
    return exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EAGAIN, errno.EPIPE)


def _describe(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return f"{errno.errorcode[exc.errno]} ({exc.strerror})"
    return str(exc) or type(exc).__name__


class AgentClient:
    """A connection to the guest agent.

    Requests are synchronous; every reply carries the request's ``req_id`` and frames
    with other ids (left over from an earlier connection) are ignored.
    """

    def __init__(self, sock: socket.socket, where: str, initial: bytes = b"") -> None:
        self._sock = sock
        self.where = where
        self._reader = proto.FrameReader()
        self._reader.feed(initial)
        self._closed = False
        self._send_lock = threading.Lock()
        self._stdins: dict[int, ExecStdin] = {}

    # ----------------------------------------------------------------- connect
    @classmethod
    def connect_unix(cls, path: Path, timeout: float, *, handshake: bool = True) -> AgentClient:
        """Connect to a QEMU chardev socket (virtio-serial port "agent").

        With ``handshake`` (the default) a ping resynchronises the stream before
        returning; QEMU accepts the connection before the guest agent runs, so the
        ping also waits (up to ``timeout``) for the agent itself.
        """
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(short_path(path))
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise AgentTimeout(f"connecting to agent socket {path} timed out") from exc
            raise AgentError(f"cannot connect to agent socket {path}: {_describe(exc)}",
                             transient=_transient(exc)) from exc
        client = cls(sock, str(path))
        if handshake:
            client._handshake(deadline)
        return client

    @classmethod
    def connect_vsock_uds(
        cls, uds: Path, port: int, timeout: float, *, handshake: bool = True
    ) -> AgentClient:
        """Connect through Firecracker's hybrid vsock: ``CONNECT <port>`` → ``OK <n>``."""
        deadline = time.monotonic() + timeout
        where = f"{uds} (vsock port {port})"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(short_path(uds))
            sock.sendall(f"CONNECT {port}\n".encode())
            line = bytearray()
            while not line.endswith(b"\n"):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(1)  # byte by byte: agent frames may follow the line
                if not chunk:
                    raise AgentError(
                        f"vsock {where}: connection closed during CONNECT "
                        "(is the guest agent listening?)"
                    )
                line += chunk
                if len(line) > 64:
                    raise AgentError(f"vsock {where}: bad CONNECT reply {bytes(line)!r}")
        except TimeoutError as exc:
            sock.close()
            raise AgentTimeout(f"vsock {where}: CONNECT timed out") from exc
        except AgentError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot connect to vsock {where}: {_describe(exc)}",
                             transient=_transient(exc)) from exc
        if not line.startswith(b"OK "):
            sock.close()
            raise AgentError(f"vsock {where}: unexpected CONNECT reply {bytes(line)!r}")
        client = cls(sock, where)
        if handshake:
            client._handshake(deadline)
        return client

    def _handshake(self, deadline: float) -> None:
        try:
            self.ping(timeout=max(deadline - time.monotonic(), 0.001))
        except BaseException:
            self.close()
            raise

    # --------------------------------------------------------------- plumbing
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.close()

    def abort(self) -> None:
        """From any thread: end the connection, so that a reader blocked on it returns with
        an AgentError (the exec mux then kills the connection's commands)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def _send(self, type_: bytes, payload: bytes = b"", *, timeout: float | None = 30.0) -> int:
        if self._closed:
            raise AgentError(f"agent connection {self.where} is closed")
        req_id = secrets.randbits(32)
        data = proto.encode_frame(type_, req_id, payload)
        # another thread may be writing an interactive exec's stdin (_send_raw)
        if not self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise AgentTimeout(f"sending to the agent at {self.where} timed out (busy)")
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(data)
        except TimeoutError as exc:
            self.close()
            raise AgentTimeout(f"sending to the agent at {self.where} timed out") from exc
        except OSError as exc:
            self.close()
            raise AgentError(f"agent connection {self.where} lost: {_describe(exc)}") from exc
        finally:
            self._send_lock.release()
        return req_id

    def _send_raw(self, type_: bytes, payload: bytes, req_id: int | None = None) -> None:
        """Send one frame from any thread, while another may be reading (and changing the
        socket's timeout): ``send`` is retried until all is written, it never fails halfway."""
        data = memoryview(proto.encode_frame(type_, secrets.randbits(32) if req_id is None else req_id,
                                             payload))
        with self._send_lock:
            off = 0
            while off < len(data):
                if self._closed:
                    raise AgentError(f"agent connection {self.where} is closed")
                try:
                    off += self._sock.send(data[off:])
                except (TimeoutError, BlockingIOError, InterruptedError):
                    with contextlib.suppress(OSError, ValueError):
                        select.select((), (self._sock,), (), 1.0)
                except OSError as exc:
                    raise AgentError(f"agent connection {self.where} lost: {_describe(exc)}") from exc

    def stdin_of(self, req_id: int) -> ExecStdin:
        """The stdin of interactive exec ``req_id`` (started on this connection)."""
        return self._stdins[req_id]

    def _recv(self, req_id: int, deadline: float | None, what: str) -> proto.Frame:
        """Next frame with ``req_id`` (other frames are discarded)."""
        while True:
            for frame in self._reader.frames():
                if frame.type == proto.ABORTED:  # from the exec mux: ends every request
                    self.close()
                    raise ExecAborted(_reason(frame.payload))
                if frame.req_id == req_id:
                    return frame
            if deadline is None:
                self._sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentTimeout(f"no answer from the guest agent ({what}) at {self.where}")
                self._sock.settimeout(left)
            try:
                data = self._sock.recv(_RECV_SIZE)
            except TimeoutError:
                continue  # re-check the deadline
            except OSError as exc:
                self.close()
                raise AgentError(
                    f"agent connection {self.where} lost during {what}: {_describe(exc)}"
                ) from exc
            if not data:
                self.close()
                raise AgentError(f"agent connection {self.where} closed during {what}")
            self._reader.feed(data)

    def _request(self, type_: bytes, payload: bytes, expect: bytes, timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        req_id = self._send(type_, payload, timeout=timeout)
        frame = self._recv(req_id, deadline, what)
        if frame.type == proto.ERROR:
            raise AgentError(f"guest agent: {_reason(frame.payload, 'error without a message')}")
        if frame.type != expect:
            raise AgentError(f"guest agent: unexpected {frame.type!r} reply to {what}")
        return frame.payload

    def recv_frame(self, req_id: int, timeout: float, what: str) -> proto.Frame:
        """The next frame for ``req_id`` (others are discarded), within ``timeout`` s."""
        return self._recv(req_id, time.monotonic() + timeout, what)

    def request(self, type_: bytes, payload: bytes, expect: bytes, timeout: float, what: str) -> bytes:
        """One request, one reply of type ``expect`` (its payload is returned)."""
        return self._request(type_, payload, expect, timeout, what)

    # --------------------------------------------------------------- requests
    def ping(self, timeout: float = 5.0) -> None:
        """Round-trip a random token; frames before the answer are discarded."""
        token = secrets.token_bytes(8)
        deadline = time.monotonic() + timeout
        req_id = self._send(proto.PING, token, timeout=timeout)
        while True:
            frame = self._recv(req_id, deadline, "ping")
            if frame.type == proto.PONG and frame.payload == token:
                return

    def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        max_output: int = MAX_BUFFERED_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` in the guest (PATH lookup; default cwd /root, HOME=/root).

        ``env`` adds to / overrides the guest's default environment. With ``timeout``
        the guest kills the command's whole process group after that many seconds
        (``timed_out`` set, exit code 124); without one the host waits as long as the
        command runs. Output is collected (at most ``max_output`` bytes per stream, the
        rest counted as dropped) unless a callback is given for that stream.
        """
        req_id = self.start_exec(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout)
        return self.wait_exec(req_id, argv, timeout=timeout, on_stdout=on_stdout,
                              on_stderr=on_stderr, max_output=max_output)

    def start_exec(
        self,
        argv: list[str],
        *,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        interactive: bool = False,
        tty: bool = False,
        rows: int = 0,
        cols: int = 0,
    ) -> int:
        """Send an exec request; returns its req_id for :meth:`wait_exec`.

        ``interactive`` keeps the command's stdin open after ``stdin``: feed it through
        :meth:`stdin_of` (write, close, resize) while :meth:`wait_exec` relays the output.
        ``tty`` (interactive only) runs it on a PTY of ``rows`` x ``cols`` (0: 24x80),
        whose output (stdout and stderr) comes as stdout."""
        if timeout is not None and timeout <= 0:
            raise AgentError(f"exec timeout must be positive, got {timeout}")
        if tty and not interactive:
            raise AgentError("a tty exec must be interactive")
        timeout_ms = 0 if timeout is None else max(1, round(timeout * 1000))
        try:
            payload = proto.encode_exec(argv, stdin=stdin, env=env, cwd=cwd, timeout_ms=timeout_ms)
            if interactive:
                payload += proto.encode_exec_options(tty=tty, rows=rows, cols=cols)
            if len(payload) > proto.MAX_PAYLOAD:
                raise proto.ProtocolError(
                    f"exec request of {len(payload)} bytes (stdin included) exceeds "
                    f"the {proto.MAX_PAYLOAD >> 20} MiB limit"
                )
        except proto.ProtocolError as exc:
            raise AgentError(str(exc)) from exc
        if not interactive:
            return self._send(proto.EXEC, payload, timeout=None if timeout is None else timeout + 30)
        req_id = secrets.randbits(32)
        self._stdins[req_id] = ExecStdin(self, req_id, tty=tty)  # before any ack can arrive
        try:
            self._send_raw(proto.EXEC_INTERACTIVE, payload, req_id)
        except BaseException:
            self._stdins.pop(req_id)._end()
            raise
        return req_id

    def wait_exec(
        self,
        req_id: int,
        argv: list[str],
        *,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        max_output: int = MAX_BUFFERED_OUTPUT,
    ) -> ExecResult:
        """Relay the output of exec ``req_id`` until it exits. Interrupted (Ctrl-C, an
        exception in a callback), it kills the command in the guest before re-raising."""
        deadline = None if timeout is None else time.monotonic() + timeout + EXEC_TIMEOUT_MARGIN_S
        out, err = _Capped(max_output), _Capped(max_output)
        what = f"exec {argv[0]!r}"
        stdin = self._stdins.get(req_id)
        try:
            while True:
                frame = self._recv(req_id, deadline, what)
                if frame.type == proto.STDIN_ACK and stdin is not None:
                    with contextlib.suppress(proto.ProtocolError):
                        stdin._acked(proto.decode_ack(frame.payload))
                elif frame.type == proto.STDOUT:
                    (on_stdout or out)(frame.payload)
                elif frame.type == proto.STDERR:
                    (on_stderr or err)(frame.payload)
                elif frame.type == proto.EXIT:
                    try:
                        st = proto.decode_exit(frame.payload)
                    except proto.ProtocolError as exc:
                        raise AgentError(f"guest agent: {exc}") from exc
                    return ExecResult(
                        exit_code=st.exit_code,
                        stdout=out.data(),
                        stderr=err.data(),
                        timed_out=st.timed_out,
                        signal=st.signal if st.signaled else None,
                        stdout_dropped=out.dropped,
                        stderr_dropped=err.dropped,
                    )
                elif frame.type == proto.ERROR:
                    raise AgentError(f"guest agent: {_reason(frame.payload, 'error without a message')}")
                else:
                    raise AgentError(f"guest agent: unexpected {frame.type!r} frame during {what}")
        except BaseException:
            self.kill(req_id)
            raise
        finally:
            if stdin is not None:
                self._stdins.pop(req_id, None)
                stdin._end()

    def kill(self, req_id: int) -> None:
        """Best effort: SIGKILL the process group of running exec ``req_id`` (no reply)."""
        if self._closed:
            return
        with contextlib.suppress(AgentError):
            self._send(proto.KILL, proto.encode_target(req_id), timeout=1.0)

    def set_time(self, t: float | None = None, timeout: float = 5.0) -> None:
        """Set the guest's wall clock (default: the host's time now)."""
        self._request(
            proto.SET_TIME,
            proto.encode_time(time.time() if t is None else t),
            proto.TIME_SET,
            timeout,
            "set-time",
        )

    def set_hostname(self, name: str, timeout: float = 5.0) -> None:
        """sethostname(2) in the guest agent itself (no process is started)."""
        self._request(proto.SET_HOSTNAME, name.encode(), proto.HOSTNAME_SET, timeout, "set-hostname")

    def sync(self, timeout: float = 60.0) -> None:
        """sync(2) in the guest: everything written so far reaches the disks."""
        self._request(proto.SYNC, b"", proto.SYNCED, timeout, "sync")

    def poweroff(self, timeout: float = 30.0) -> None:
        """Sync and power the guest off. Returns once the agent acknowledged it
        (or the connection dropped because the VM already went away)."""
        try:
            self._request(proto.POWEROFF, b"", proto.POWERING_OFF, timeout, "poweroff")
        except AgentTimeout:
            raise
        except AgentError:
            if not self._closed:
                raise  # an error reply, not a lost connection
        finally:
            self.close()


def _reason(payload: bytes, default: str = "the exec was aborted") -> str:
    """Text from the guest (or the mux), bounded and made printable."""
    text = payload[: _MAX_REASON * 4].decode(errors="replace")
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:_MAX_REASON] or default


def wait_ready(
    connect: Callable[[], AgentClient],
    deadline_s: float,
    alive: Callable[[], bool] | None = None,
) -> AgentClient:
    """Connect and ping until the agent answers; return the connected client.

    ``deadline_s`` is a duration in seconds from now. ``connect`` should make one
    short attempt (e.g. ``lambda: AgentClient.connect_unix(sock, timeout=1.0)``).
    ``alive`` is polled between attempts; when it returns False we stop with
    AgentError("VMM exited ...").
    """
    last: Exception | None = None
    tries = 0
    for tries in retry.attempts(deadline_s, first=0.02, cap=0.25):  # noqa: B007 (reported below)
        if alive is not None and not alive():
            raise AgentError("VMM exited before the guest agent answered")
        try:
            return connect()
        except AgentError as exc:  # AgentTimeout included
            if not exc.transient:
                raise
            last = exc
    if alive is not None and not alive():
        raise AgentError("VMM exited before the guest agent answered")
    raise AgentTimeout(
        f"guest agent not ready after {deadline_s:.1f}s ({tries} attempts; last error: {last})"
    )
