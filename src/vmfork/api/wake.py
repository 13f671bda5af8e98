"""Wake on traffic: a listener that owns the host ports of an instance in standby.

The first connection to one of those ports calls ``wake`` (which restores the instance and
returns the address its guest answers on); connections that arrive meanwhile wait, and
are served in the order they came; each is spliced to the guest's port. The client sees
a slow connect, never a refusal. Once the instance is awake its own forwarding takes the
ports back (the owner closes the listener); connections spliced already go on.

This part needs no network of vmfork's own: ``wake`` says where the guest is. The server
wires it to the networking feature's published ports (``vmfork.network.published`` /
``set_forwarding``) where that feature is present.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vmfork import retry

CHUNK = 1 << 16
# How long a just-woken guest gets to accept a connection on its port (its NIC and the
# neighbour entries of its link come back with it; the first tries may be unreachable).
CONNECT_S = 20.0


@dataclass(frozen=True)
class Port:
    host_ip: str  # "" = every local address
    host_port: int
    guest_port: int


@dataclass
class WakeStats:
    woken_at: float | None = None
    wake_s: float | None = None  # how long ``wake`` took
    served: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class WakeListener:
    def __init__(self, ports: list[Port], wake: Callable[[], Awaitable[str]]) -> None:
        self.ports = ports
        self._wake = wake
        self._lock = asyncio.Lock()  # FIFO: connections are served in the order they came
        self._target: str | None = None
        self._servers: list[asyncio.Server] = []
        self._splices: set[asyncio.Task[None]] = set()
        self.stats = WakeStats()
        self.awake = asyncio.Event()

    async def start(self) -> None:
        try:
            for p in self.ports:
                srv = await asyncio.start_server(
                    lambda r, w, gp=p.guest_port: self._on_conn(r, w, gp),  # type: ignore[misc]
                    host=p.host_ip or None, port=p.host_port, reuse_address=True, backlog=512)
                self._servers.append(srv)
        except BaseException:
            await self.close()
            raise

    def bound_ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self._servers if s.sockets]

    async def close(self) -> None:
        """Stop listening (spliced connections go on)."""
        for s in self._servers:
            s.close()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        self._servers = []

    async def drain(self) -> None:
        """Wait for the spliced connections to end."""
        if self._splices:
            await asyncio.gather(*self._splices, return_exceptions=True)

    async def wake_now(self) -> None:
        """Wake without a connection (an exec through the API): the same single wake."""
        async with self._lock:
            if self._target is None:
                t0 = time.monotonic()
                self._target = await self._wake()
                self.stats.wake_s = time.monotonic() - t0
                self.stats.woken_at = time.time()
                self.awake.set()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest_port: int) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._splices.add(task)
        try:
            async with self._lock:
                if self._target is None:
                    t0 = time.monotonic()
                    try:
                        self._target = await self._wake()
                    except Exception as e:
                        self.stats.failed += 1
                        self.stats.errors.append(str(e)[:300])
                        print(f"vmfork serve: wake failed: {str(e)[:300]!r}", file=sys.stderr, flush=True)
                        writer.close()
                        return
                    self.stats.wake_s = time.monotonic() - t0
                    self.stats.woken_at = time.time()
                    self.awake.set()
                try:
                    sock = await asyncio.to_thread(_connect, self._target, guest_port)
                    g_reader, g_writer = await asyncio.open_connection(sock=sock)
                except OSError as e:
                    self.stats.failed += 1
                    self.stats.errors.append(f"connect {self._target}:{guest_port}: {e}")
                    print(f"vmfork serve: wake: {self.stats.errors[-1]!r}", file=sys.stderr, flush=True)
                    writer.close()
                    return
            self.stats.served += 1
            try:
                await asyncio.gather(_pipe(reader, g_writer), _pipe(g_reader, writer))
            finally:
                for w in (writer, g_writer):
                    w.close()
        finally:
            if task is not None:
                self._splices.discard(task)


def _connect(host: str, port: int) -> socket.socket:
    last: OSError | None = None
    for _ in retry.attempts(CONNECT_S, first=0.05, cap=0.5):
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError as e:
            last = e
            continue
        sock.setblocking(False)
        return sock
    assert last is not None
    raise last


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``dst`` (the other direction goes on)."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()
