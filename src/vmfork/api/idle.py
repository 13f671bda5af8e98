"""Auto-standby: an instance created with ``auto_standby: IDLE`` is put in standby by the
server after IDLE seconds without activity (no exec or file transfer through the server),
and an exec or file transfer on it while it is in standby restores it first (wake on use).

The settings live in ``<data-dir>/api/auto-standby.json`` ({instance id: seconds}), so a
restarted server keeps them; an instance that is gone drops out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
            if iid in self.settings() and await blocking(st, lambda: st.mgr.status(inst).state) == "standby":
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

    def _due(self, st: State) -> list[str]:
        now = time.monotonic()
        due = []
        live = {i.id: i for i in st.mgr.instances()}
        for iid, idle_s in self.settings().items():
            if iid not in live:
                self.set(iid, None)
                continue
            with self._lock:
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
                    # busy, gone, or changed state meanwhile: suppressed, tried again later
                    with contextlib.suppress(Exception), st.metrics.timed("standby"):
                        await blocking(st, st.mgr.standby, iid)
            except Exception:  # never let the monitor die
                continue

    def describe(self) -> dict[str, Any]:
        return {"settings": self.settings(), "wakes": len(self.wakes)}
