"""Auto-standby: an instance created with ``auto_standby: IDLE`` is put in standby by the
server after IDLE seconds without activity (no exec or file transfer through the server),
and an exec or file transfer on it while it is in standby restores it first (wake on use).

The settings live in ``<data-dir>/api/auto-standby.json`` ({instance id: seconds}), so a
restarted server keeps them; an instance that is gone drops out.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork import util

if TYPE_CHECKING:
    from vmfork.api.app import State

CHECK_S = 1.0


class AutoStandby:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "api" / "auto-standby.json"
        self._lock = threading.Lock()
        self.last: dict[str, float] = {}  # instance id -> monotonic time of its last activity
        self.busy: dict[str, int] = {}  # instance id -> activities in flight
        self.wakes: list[float] = []  # seconds of each wake on use (restore before the work)
        self.listeners: dict[str, Any] = {}  # instance id -> its WakeListener while in standby
        self._traffic: dict[str, int] = {}  # instance id -> bytes through its veth, last seen
        self._tasks: set[asyncio.Task[None]] = set()

    def settings(self) -> dict[str, float]:
        try:
            d = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): float(v) for k, v in d.items()} if isinstance(d, dict) else {}

    def set(self, iid: str, idle_s: float | None) -> None:
        with self._lock:
            d = self.settings()
            if idle_s is None:
                d.pop(iid, None)
            else:
                d[iid] = idle_s
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            util.atomic_write_json(self.path, d)
            self.last[iid] = time.monotonic()

    @contextlib.asynccontextmanager
    async def activity(self, st: State, ref: str) -> AsyncIterator[None]:
        """Around an exec or file transfer: the instance is not put in standby meanwhile, and
        one in standby with auto-standby is restored first."""
        from vmfork.api.app import blocking

        inst = await blocking(st, st.mgr.find, ref)
        iid = inst.id
        with self._lock:
            self.busy[iid] = self.busy.get(iid, 0) + 1
            self.last[iid] = time.monotonic()
        try:
            if iid in self.listeners:
                await self.listeners[iid].wake_now()
            elif iid in self.settings() and await blocking(st, lambda: st.mgr.status(inst).state) == "standby":
                t0 = time.monotonic()
                with contextlib.suppress(Exception):  # a concurrent wake won: exec says if it is not running
                    with st.metrics.timed("restore"):
                        await blocking(st, st.mgr.restore, iid)
                    self.wakes.append(time.monotonic() - t0)
            yield
        finally:
            with self._lock:
                self.busy[iid] -= 1
                self.last[iid] = time.monotonic()

    @staticmethod
    def network() -> Any | None:
        """The networking feature (vmfork.network)."""
        try:
            return importlib.import_module("vmfork.network")
        except ImportError:
            return None

    def _saw_traffic(self, st: State, iid: str) -> bool:
        """Whether bytes went through the instance's veth since the last look."""
        net = self.network()
        if net is None:
            return False
        lease = net.leases.read(st.data_dir, iid)
        if lease is None:
            return False
        total = 0
        for what in ("rx_bytes", "tx_bytes"):
            with contextlib.suppress(OSError, ValueError):
                total += int(Path(f"/sys/class/net/{lease.veth}/statistics/{what}").read_text())
        seen, self._traffic[iid] = self._traffic.get(iid), total
        return seen is not None and seen != total

    def _due(self, st: State) -> list[str]:
        now = time.monotonic()
        due = []
        live = {i.id: i for i in st.mgr.instances()}
        for iid, idle_s in self.settings().items():
            if iid not in live:
                self.set(iid, None)
                continue
            if self._saw_traffic(st, iid):
                self.last[iid] = now
            with self._lock:
                # A listener still holds its ports: in standby, or being woken (its restore
                # may already show it running; a standby queued behind that restore would put
                # it straight back to sleep under the connections being woken for it).
                if iid in self.listeners:
                    continue
                if self.busy.get(iid, 0) or now - self.last.setdefault(iid, now) < idle_s:
                    continue
            if st.mgr.status(live[iid]).state == "running":
                due.append(iid)
        return due

    async def run(self, st: State) -> None:
        """The monitor: every CHECK_S, idle instances go to standby."""
        from vmfork.api.app import blocking

        while True:
            await asyncio.sleep(CHECK_S)
            try:
                for iid in await blocking(st, self._due, st):
                    try:  # busy, gone, or changed state meanwhile: tried again later
                        await self._sleep(st, iid)
                    except Exception as e:
                        _log(f"auto-standby of {iid}: {e}")
            except Exception as e:  # never let the monitor die
                _log(f"auto-standby monitor: {e!r}")

    async def _sleep(self, st: State, iid: str) -> None:
        """Standby of an idle instance. Its published TCP ports are taken by a wake listener
        first, while it still runs: a connection arriving meanwhile is held until the standby
        has settled, then wakes it (never a refusal, never a guest that is going away)."""
        from vmfork.api.app import blocking

        settled = asyncio.Event()
        await self._listen(st, iid, settled)
        try:
            with st.metrics.timed("standby"):
                await blocking(st, st.mgr.standby, iid)
        except BaseException:
            await self.release(st, iid)  # it runs on: its own forwarding takes the ports back
            raise
        finally:
            settled.set()

    async def _listen(self, st: State, iid: str, settled: asyncio.Event) -> None:
        """The server takes the instance's published TCP ports; the first connection restores
        it (wake on traffic), once ``settled`` (its standby is over)."""
        from vmfork.api.app import blocking
        from vmfork.api.wake import Port, WakeListener

        net = self.network()
        if net is None:
            return
        ports = [Port(p.host_ip, p.host_port, p.guest_port)
                 for p in await blocking(st, net.published, st.data_dir, iid) if p.proto == "tcp"]
        if not ports:
            return

        async def wake() -> str:
            await settled.wait()
            t0 = time.monotonic()
            if st.mgr.status(await blocking(st, st.mgr.find, iid)).state == "standby":
                with st.metrics.timed("restore"):
                    await blocking(st, st.mgr.restore, iid)
            self.wakes.append(time.monotonic() - t0)
            with self._lock:
                self.last[iid] = time.monotonic()
            lease = net.leases.read(st.data_dir, iid)
            return str(lease.ip)

        lst = WakeListener(ports, wake)
        await lst.start()  # bound first: the ports are never without a taker
        try:
            await blocking(st, net.set_forwarding, st.data_dir, iid, False)  # now new connections reach it
        except BaseException:
            await lst.close()
            raise
        self.listeners[iid] = lst

        async def hand_back() -> None:  # awake: its own forwarding takes the ports back
            await lst.awake.wait()
            await lst.close()
            if self.listeners.get(iid) is lst:  # not released meanwhile
                self.listeners.pop(iid, None)
                await blocking(st, net.set_forwarding, st.data_dir, iid, True)

        task = asyncio.ensure_future(hand_back())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def release(self, st: State, ref: str) -> None:
        """Before a restore or removal through the API: the listener (if any) lets go."""
        from vmfork.api.app import blocking

        iid: str | None = ref if ref in self.listeners else None
        if iid is None and self.listeners:
            with contextlib.suppress(Exception):
                iid = (await blocking(st, st.mgr.find, ref)).id
        lst = self.listeners.pop(iid, None) if iid else None
        if lst is not None:
            await lst.close()
            net = self.network()
            if net is not None:
                with contextlib.suppress(Exception):
                    await blocking(st, net.set_forwarding, st.data_dir, iid, True)

    def describe(self) -> dict[str, Any]:
        return {"settings": self.settings(), "wakes": len(self.wakes)}


def _log(msg: str) -> None:
    print(f"vmfork serve: {util.one_line(msg)}", file=sys.stderr, flush=True)
