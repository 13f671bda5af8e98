"""The exec mux: one small process per running instance that holds the instance's one
guest agent connection and serves any number of host clients on ``run/exec.sock``.

The agent channel accepts one host connection (QEMU's chardev socket; Firecracker's
vsock, where the agent serves the newest connection only), while the agent itself runs
up to 32 commands at once on it, keyed by request id. The mux gives each client
request a fresh upstream id and routes the replies back, so concurrent ``vmfork exec``
commands share the one connection:

- a client is greeted with ``MUX_HELLO`` once accepted; a connection closed before the
  greeting was never seen by the mux (it was exiting), so the client may start another;
- a client that goes away (killed, interrupted) has its running commands killed in the
  guest (``KILL``);
- ``KILL``, ``STDIN``, ``STDIN_EOF`` and ``RESIZE`` from a client name one of its own
  execs: the mux rewrites the target to the upstream id (others' execs are unreachable);
  ``STDIN`` flow control is end to end (the guest's ``STDIN_ACK`` is routed back like
  output), so the mux buffers at most ``UP_HIGH`` before it stops reading clients;
- a client that reads slowly has its commands' output held in the guest (``HOLD``, then
  ``GO``), so the mux buffers about ``CLIENT_HIGH`` per client and no client stalls the
  others;
- ``SHUTDOWN`` (sent by the manager before it takes the VMM down) ends every exec: each
  client gets ``ABORTED`` with the reason, every command is killed in the guest, the
  kills are awaited up to the time the request names, then the mux answers
  ``SHUTDOWN_DONE`` and exits;
- when the agent connection closes (the VMM exited), every client gets ``ABORTED``;
- after ``--idle`` seconds without any client it exits (the next exec starts another).

Started by :mod:`vmfork.guest.muxctl` with the agent connection and the listening socket
already open (``--agent-fd``, ``--listen-fd``). It imports nothing but the standard
library and the protocol module: run it as ``python -I -S`` (see ``muxctl``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from vmfork.guest import protocol as proto

CLIENT_HIGH = 1 << 20  # a client's unsent output above this: hold its commands' output
CLIENT_LOW = 256 << 10  # ...below this again: let it flow
CLIENT_MAX = 64 << 20  # never reached with a current agent (it stops within ~1 MiB)
UP_HIGH = 4 << 20  # unsent requests to the agent above this: stop reading clients
FLUSH_AT_EXIT_S = 2.0
_RECV = 1 << 16
_WAIT = struct.Struct(">I")
# client frames that name one of the client's own execs first in their payload
_TARGETED = frozenset({proto.KILL, proto.STDIN, proto.STDIN_EOF, proto.RESIZE})

STOPPED_REASON = "the exec mux was stopped"
LOST_REASON = "the guest agent connection was closed (did the VMM exit?)"


@dataclass(eq=False)
class Client:
    sock: socket.socket
    reader: proto.FrameReader = field(default_factory=proto.FrameReader)
    out: bytearray = field(default_factory=bytearray)
    routes: dict[int, int] = field(default_factory=dict)  # client req_id -> upstream req_id
    held: bool = False  # its commands' output is held in the guest
    closing: bool = False  # aborted: close once ``out`` is sent, read nothing more
    events: int = 0  # what it is registered for


@dataclass
class Route:
    client: Client
    client_id: int
    is_exec: bool


def encode_shutdown(reason: str, wait_s: float) -> bytes:
    """Payload of SHUTDOWN: u32 ms to wait for the killed commands to exit, then the reason."""
    return _WAIT.pack(max(0, min(int(wait_s * 1000), 600_000))) + reason.encode()


def decode_shutdown(payload: bytes) -> tuple[str, float]:
    if len(payload) < _WAIT.size:
        return payload.decode(errors="replace"), 0.0
    (ms,) = _WAIT.unpack_from(payload)
    return payload[_WAIT.size :].decode(errors="replace"), ms / 1000


class Mux:
    def __init__(self, upstream: socket.socket, listener: socket.socket, idle_s: float) -> None:
        self.sel = selectors.DefaultSelector()
        self.up = upstream
        self.up.setblocking(False)
        self.up_reader = proto.FrameReader()
        self.up_out = bytearray()
        self.up_events = 0
        self.listener: socket.socket | None = listener
        self.listener.setblocking(False)
        self.idle_s = idle_s
        self.clients: list[Client] = []
        self.routes: dict[int, Route] = {}
        self._next = int.from_bytes(os.urandom(4), "big")
        self.last_activity = time.monotonic()
        self.done: str | None = None  # why the mux exits
        # shutdown in progress: who asked (and its req_id), the commands being killed, until when
        self.shutdown_by: tuple[Client, int] | None = None
        self.killing: set[int] = set()
        self.kill_deadline = 0.0
        self.shutting = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stop_requested = False
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self.sel.register(self.up, selectors.EVENT_READ, self._on_up)
        self.up_events = selectors.EVENT_READ
        self.served = 0

    # ------------------------------------------------------------------ ids, frames
    def _new_id(self) -> int:
        while True:
            self._next = (self._next + 1) & 0xFFFFFFFF
            if self._next and self._next not in self.routes:
                return self._next

    def _to_agent(self, type_: bytes, req_id: int, payload: bytes = b"") -> None:
        self.up_out += proto.encode_frame(type_, req_id, payload)

    def _to_agent_target(self, type_: bytes, target: int) -> None:
        self._to_agent(type_, self._new_id(), proto.encode_target(target))

    @staticmethod
    def _to_client(c: Client, type_: bytes, req_id: int, payload: bytes = b"") -> None:
        c.out += proto.encode_frame(type_, req_id, payload)

    # ------------------------------------------------------------------ clients
    def _on_accept(self, _ev: int) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                print(f"vmfork-mux: accept: {e}", file=sys.stderr)
                return
            sock.setblocking(False)
            c = Client(sock)
            self._to_client(c, proto.MUX_HELLO, 0, b"vmfork-mux 1")
            self.clients.append(c)
            self.sel.register(sock, selectors.EVENT_READ, lambda ev, c=c: self._on_client(c, ev))
            c.events = selectors.EVENT_READ
            self.served += 1

    def _on_client(self, c: Client, ev: int) -> None:
        if ev & selectors.EVENT_WRITE:
            self._flush_client(c)
            if c.sock.fileno() < 0:
                return
        if ev & selectors.EVENT_READ and not c.closing:
            try:
                data = c.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_client(c)
                return
            c.reader.feed(data)
            for frame in c.reader.frames():
                self._from_client(c, frame)
                if c.closing or c.sock.fileno() < 0:
                    break

    def _from_client(self, c: Client, f: proto.Frame) -> None:
        if f.type == proto.SHUTDOWN:
            reason, wait_s = decode_shutdown(f.payload)
            self._begin_shutdown(reason, wait_s, (c, f.req_id))
            return
        if self.shutting:
            return
        if f.type in _TARGETED:  # a client acts on its own commands only
            try:
                up = c.routes.get(proto.payload_target(f.payload))
                payload = proto.retarget(f.payload, up) if up is not None else b""
            except proto.ProtocolError:
                up = None
            if up is not None:
                self._to_agent(f.type, self._new_id(), payload)
            return
        if f.type in (proto.HOLD, proto.GO, proto.MUX_HELLO, proto.SHUTDOWN_DONE, proto.ABORTED):
            self._to_client(c, proto.ERROR, f.req_id,
                            f"the exec mux does not accept {f.type!r} from a client".encode())
            return
        if f.req_id in c.routes:
            self._to_client(c, proto.ERROR, f.req_id, b"request id already in use on this connection")
            return
        up = self._new_id()
        is_exec = f.type in (proto.EXEC, proto.EXEC_INTERACTIVE)
        self.routes[up] = Route(c, f.req_id, is_exec)
        c.routes[f.req_id] = up
        self._to_agent(f.type, up, f.payload)
        if c.held and is_exec:
            self._to_agent_target(proto.HOLD, up)

    def _drop_client(self, c: Client, *, kill: bool = True) -> None:
        """Forget a client; its running commands are killed in the guest."""
        for up in c.routes.values():
            route = self.routes.pop(up, None)
            if route is not None and route.is_exec and kill:
                self._to_agent_target(proto.KILL, up)
        c.routes.clear()
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()
        with contextlib.suppress(ValueError):
            self.clients.remove(c)
        self.last_activity = time.monotonic()

    def _flush_client(self, c: Client) -> None:
        if c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_client(c)
                return
            del c.out[:n]
        if c.held and len(c.out) < CLIENT_LOW:
            c.held = False
            for up in c.routes.values():
                route = self.routes.get(up)
                if route is not None and route.is_exec:
                    self._to_agent_target(proto.GO, up)
        if c.closing and not c.out:
            self._drop_client(c, kill=False)

    def _hold(self, c: Client) -> None:
        c.held = True
        for up in c.routes.values():
            route = self.routes.get(up)
            if route is not None and route.is_exec:
                self._to_agent_target(proto.HOLD, up)

    # ------------------------------------------------------------------ agent side
    def _on_up(self, ev: int) -> None:
        if ev & selectors.EVENT_WRITE and self.up_out:
            try:
                n = self.up.send(self.up_out)
                del self.up_out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._lost()
                return
        if ev & selectors.EVENT_READ:
            try:
                data = self.up.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self.up_reader.feed(data)
            for f in self.up_reader.frames():
                self._from_agent(f)

    def _from_agent(self, f: proto.Frame) -> None:
        final = f.type in proto.FINAL
        if final:
            self.killing.discard(f.req_id)  # its client may be gone already
        route = self.routes.get(f.req_id)
        if route is None:
            return  # a reply to KILL/HOLD/GO from an older agent, or of a client gone
        if final:
            del self.routes[f.req_id]
            route.client.routes.pop(route.client_id, None)
        c = route.client
        if c.closing:
            return
        self._to_client(c, f.type, route.client_id, f.payload)
        if len(c.out) > CLIENT_MAX:
            print(f"vmfork-mux: a client fell {len(c.out)} bytes behind; dropped", file=sys.stderr)
            self._drop_client(c)
        elif len(c.out) > CLIENT_HIGH and not c.held:
            self._hold(c)

    def _lost(self) -> None:
        if self.done:
            return
        self._abort_all(LOST_REASON)
        self.routes.clear()
        self.killing.clear()
        if self.shutdown_by is not None:  # the VMM went first: nothing left to wait for
            self._finish_shutdown()
        self.done = "agent connection closed"

    # ------------------------------------------------------------------ shutdown
    def _abort_all(self, reason: str, *, spare: Client | None = None) -> None:
        for c in list(self.clients):
            if c is spare or c.closing:
                continue
            self._to_client(c, proto.ABORTED, 0, reason.encode())
            c.closing = True

    def _close_listener(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _begin_shutdown(self, reason: str, wait_s: float, by: tuple[Client, int] | None) -> None:
        if self.shutting:
            if by is not None and self.shutdown_by is None:
                self.shutdown_by = by
            return
        self.shutting = True
        self.shutdown_by = by
        self._close_listener()
        self._abort_all(reason, spare=by[0] if by else None)
        for up, route in self.routes.items():
            if route.is_exec:
                self._to_agent_target(proto.KILL, up)
                self.killing.add(up)
        self.kill_deadline = time.monotonic() + wait_s

    def _finish_shutdown(self) -> None:
        if self.shutdown_by is not None:
            c, rid = self.shutdown_by
            self.shutdown_by = None
            if c.sock.fileno() >= 0:
                self._to_client(c, proto.SHUTDOWN_DONE, rid)
                c.closing = True

    def _on_wake(self, _ev: int) -> None:
        with contextlib.suppress(OSError):
            self.wake_r.recv(64)
        if self.stop_requested:
            self._begin_shutdown(STOPPED_REASON, 0.0, None)

    # ------------------------------------------------------------------ loop
    def _interest(self) -> None:
        up_ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.up_out else 0)
        if up_ev != self.up_events:
            self.sel.modify(self.up, up_ev, self._on_up)
            self.up_events = up_ev
        read_clients = len(self.up_out) < UP_HIGH
        for c in self.clients:
            ev = (selectors.EVENT_READ if read_clients and not c.closing else 0) | (
                selectors.EVENT_WRITE if c.out else 0
            )
            if ev != c.events:
                if ev:
                    if c.events:
                        self.sel.modify(c.sock, ev, lambda e, c=c: self._on_client(c, e))
                    else:
                        self.sel.register(c.sock, ev, lambda e, c=c: self._on_client(c, e))
                else:
                    self.sel.unregister(c.sock)
                c.events = ev

    def _step_shutdown(self, now: float) -> None:
        if self.shutting and self.shutdown_by is not None and (not self.killing or now >= self.kill_deadline):
            self._finish_shutdown()
        if self.shutting and self.shutdown_by is None and not self.done:
            self.done = "shut down"

    def run(self) -> str:
        while not self.done:
            now = time.monotonic()
            self._step_shutdown(now)
            if self.done:
                break
            if not self.clients and not self.routes and not self.shutting:
                idle_left = self.last_activity + self.idle_s - now
                if idle_left <= 0:
                    self._close_listener()  # clients still in the backlog get no hello: they retry
                    self.done = "idle"
                    break
                timeout: float | None = idle_left
            else:
                timeout = max(0.0, self.kill_deadline - now) if self.shutting and self.killing else None
            self._interest()
            for key, ev in self.sel.select(timeout):
                key.data(ev)
        self._flush_at_exit()
        return self.done

    def _flush_at_exit(self) -> None:
        """Send what is queued (aborts, the shutdown answer) for a bounded time."""
        self._close_listener()
        deadline = time.monotonic() + FLUSH_AT_EXIT_S
        pending = [c for c in self.clients if c.out]
        for c in self.clients:
            if not c.out:
                c.sock.close()
        while pending and time.monotonic() < deadline:
            for c in list(pending):
                try:
                    c.sock.setblocking(True)
                    c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                    n = c.sock.send(c.out)
                    del c.out[:n]
                except OSError:
                    c.out.clear()
                if not c.out:
                    c.sock.close()
                    pending.remove(c)
        for c in pending:
            c.sock.close()
        if self.up_out:  # the kills of a shutdown, if not sent yet
            with contextlib.suppress(OSError):
                self.up.setblocking(True)
                self.up.settimeout(0.5)
                self.up.sendall(self.up_out)
        self.up.close()


def _same_file(path: str, ident: tuple[int, int] | None) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return ident is not None and (st.st_dev, st.st_ino) == ident


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts: dict[str, str] = {}
    while args:
        key = args.pop(0)
        if key not in ("--agent-fd", "--listen-fd", "--idle", "--sock", "--record") or not args:
            print(f"vmfork-mux: bad argument {key!r}", file=sys.stderr)
            return 2
        opts[key] = args.pop(0)
    upstream = socket.socket(fileno=int(opts["--agent-fd"]))
    listener = socket.socket(fileno=int(opts["--listen-fd"]))
    sock_path = opts.get("--sock", "")
    record = opts.get("--record", "")
    try:
        st = os.lstat(sock_path) if sock_path else None
        ident = (st.st_dev, st.st_ino) if st else None
    except OSError:
        ident = None
    mux = Mux(upstream, listener, float(opts.get("--idle", "60")))

    def on_term(_sig: int, _frame: object) -> None:
        mux.stop_requested = True
        with contextlib.suppress(OSError):
            mux.wake_w.send(b"t")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    t0 = time.monotonic()
    print(f"vmfork-mux: pid {os.getpid()} serving", file=sys.stderr, flush=True)
    try:
        why = mux.run()
    except Exception as e:  # a bug: say it, and let every client know
        print(f"vmfork-mux: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        mux._abort_all(f"the exec mux failed: {type(e).__name__}")
        mux._flush_at_exit()
        why = "internal error"
    # leave run/ clean, unless a newer mux took over the paths already
    if _same_file(sock_path, ident):
        with contextlib.suppress(OSError):
            os.unlink(sock_path)
    if record:
        import json

        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            with open(record) as f:
                mine = json.load(f).get("pid") == os.getpid()
            if mine:
                os.unlink(record)
    print(f"vmfork-mux: pid {os.getpid()} exits ({why}) after {time.monotonic() - t0:.1f}s, "
          f"{mux.served} connections", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
