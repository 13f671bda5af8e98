"""The host agent: one per host, the owner of that host's vmfork data dir in a fleet.

It wraps a local ``Manager`` (the only owner of instance state, as on a single host) and
answers in plain data (dicts, lists, bytes) so that any transport can carry it. It knows
nothing of Ray: ``vmfork.fleet.ray_adapter`` makes it a Ray actor pinned to its node.
What a host holds is what its data dir holds: ``report`` derives it every time.

Several calls may run at once (the transport's threads); the Manager's file locks order
them as they order several ``vmfork`` commands on one host.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmfork import util
from vmfork.errors import NotFound, VmforkError, WrongState
from vmfork.fleet.stream import ChunkReader, ExportStream

#: Output of an exec sent back to the fleet client, per stream (the rest is counted as dropped).
MAX_EXEC_OUTPUT = 4 << 20


def _mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class HostAgent:
    def __init__(self, name: str, data_dir: Path, progress: Callable[[str], None] | None = None) -> None:
        util.validate_name(name, "host name")
        self.name = name
        self.data_dir = Path(data_dir)
        self._progress = progress or (lambda _m: None)
        self._exports: dict[str, ExportStream] = {}
        self._transfers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.started = time.time()
        self.recovered = self.manager().recover()  # what a crash (or a killed node) left

    def manager(self) -> Any:
        from vmfork.instances import Manager

        os.umask(0o077)
        return Manager(self.data_dir, self._progress)

    # --- what this host holds ----------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        from vmfork.fs import filesystem_type, free_bytes
        from vmfork.images import list_images
        from vmfork.instances.snapshot_ops import store

        mgr = self.manager()
        instances = []
        for i in mgr.instances():
            d = mgr.describe(i)
            instances.append({k: d.get(k) for k in ("id", "name", "state", "problem", "memory_mib", "vcpus",
                                                    "hypervisor", "pid", "parent", "created_at")})
        snaps = [{"name": s.name, "id": s.id, "memory_mib": s.memory_mib, "image_digest": s.image_digest,
                  "hypervisor": s.hypervisor, "bytes": s.logical_bytes,
                  "digests": {f: v.get("digest") for f, v in s.files.items()}}
                 for s in store(mgr).all() if s.format == 1]
        return {
            "host": self.name, "data_dir": str(self.data_dir), "reported_at": time.time(),
            "cpus": os.cpu_count() or 1, "mem_available": _mem_available(),
            "disk_free": free_bytes(self.data_dir), "fs": filesystem_type(self.data_dir),
            "instances": instances, "snapshots": snaps,
            "images": [i.digest for i in list_images(mgr.dd.images)],
        }

    # --- instances ---------------------------------------------------------------------------
    def fork(self, snap: str, name: str, target_state: str = "running") -> dict[str, Any]:
        from vmfork.instances.snapshot_ops import fork_snapshot

        mgr = self.manager()
        forks, t = fork_snapshot(mgr, snap, name, target_state=target_state)
        return dict(mgr.describe(forks[0])) | {"host": self.name, "timings": t}

    def exec(self, name: str, argv: list[str], stdin: bytes = b"", timeout: float | None = None) -> dict[str, Any]:
        r = self.manager().exec(name, argv, stdin=stdin, timeout=timeout, max_output=MAX_EXEC_OUTPUT)
        return {"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "timed_out": r.timed_out,
                "signal": r.signal, "stdout_dropped": r.stdout_dropped, "stderr_dropped": r.stderr_dropped}

    def standby(self, name: str) -> dict[str, Any]:
        return dict(self.manager().standby(name))

    def restore(self, name: str) -> dict[str, Any]:
        return dict(self.manager().restore(name))

    def rm(self, name: str, force: bool = False) -> None:
        self.manager().rm(name, force=force)

    # --- replication: the sending side ---------------------------------------------------------
    def export_open(self, snap: str, with_image: bool) -> str:
        """Start exporting snapshot ``snap`` (with its guest image if asked); returns the
        stream's id for ``export_read``."""
        from vmfork.instances.snapshot_ops import store
        from vmfork.snapshots.archive import export

        self._reap()
        mgr = self.manager()
        st = store(mgr)
        s = st.find(snap)
        image_dir = mgr.image(s.image_digest).dir if with_image else None
        sid = util.new_id()
        self._exports[sid] = ExportStream(lambda out: export(st, s, out, image_dir=image_dir,
                                                             progress=self._progress, level=1))
        return sid

    def export_read(self, sid: str) -> bytes:
        stream = self._exports.get(sid)
        if stream is None:
            raise NotFound(f"export stream {sid} not found on host '{self.name}' (closed or timed out)")
        chunk = stream.read()
        if not chunk:
            self._exports.pop(sid, None)
        return chunk

    def export_close(self, sid: str) -> None:
        stream = self._exports.pop(sid, None)
        if stream is not None:
            stream.close()

    def exports(self) -> list[dict[str, Any]]:
        """The export streams open on this host (for diagnosis)."""
        return [{"id": sid, "sent": s.sent, "running": s.thread.is_alive(), "closed": s.closed.is_set(),
                 "idle_s": round(time.monotonic() - s.touched, 1)} for sid, s in list(self._exports.items())]

    def _reap(self) -> None:
        for sid, s in list(self._exports.items()):
            if s.idle():
                self.export_close(sid)

    # --- replication: the receiving side -------------------------------------------------------
    def import_stream(self, fetch: Callable[[], bytes], tid: str, expect: dict[str, Any]) -> dict[str, Any]:
        """Import a snapshot archive read chunk by chunk with ``fetch``; ``expect`` is the
        source's report of the snapshot (name, digests), checked once it is in. A failed or
        cut stream leaves nothing (the archive import builds apart and renames last)."""
        from vmfork.hypervisor import get_hypervisor
        from vmfork.instances.snapshot_ops import store
        from vmfork.snapshots.archive import import_

        def hv_problem(h: str) -> str | None:
            try:
                return get_hypervisor(h).available()
            except Exception as e:
                return str(e)

        mgr = self.manager()
        reader = ChunkReader(fetch)
        info = self._transfers[tid] = {"snapshot": expect["name"], "bytes": 0, "done": False, "error": None}
        t0 = time.monotonic()

        def progress(msg: str) -> None:
            info["bytes"] = reader.received
            self._progress(msg)

        try:
            snap, t = import_(store(mgr), reader, name=None, images=mgr.dd.images,  # type: ignore[arg-type]
                              hypervisor_problem=hv_problem, progress=progress)
            got = {f: v.get("digest") for f, v in snap.files.items()}
            if snap.name != expect["name"] or got != expect["digests"]:
                store(mgr).rm(snap.id)
                raise WrongState(f"snapshot '{expect['name']}' arrived on '{self.name}' with other digests "
                                 "than its source's: removed")
        except BaseException as e:
            info["error"] = str(e)
            if reader.error is not None and isinstance(e, VmforkError):  # the tools only saw the cut
                raise WrongState(f"the stream of snapshot '{expect['name']}' to host '{self.name}' broke "
                                 f"after {reader.received >> 20} MiB: {reader.error}; nothing was kept") from None
            raise
        finally:
            info["done"] = True
            info["bytes"] = reader.received
        return {"host": self.name, "name": snap.name, "id": snap.id, "bytes": reader.received,
                "seconds": round(time.monotonic() - t0, 3), "digests": got} | {"timings": t}

    def transfer(self, tid: str) -> dict[str, Any] | None:
        return self._transfers.get(tid)

    # --- checks used by tests and the CLI -----------------------------------------------------
    def leftovers(self) -> list[str]:
        """Unfinished snapshot dirs (``.tmp-``, ``.import-``) in this host's store."""
        root = self.data_dir / "snapshots"
        return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".import-"))) \
            if root.is_dir() else []


@contextlib.contextmanager
def local_agent(name: str, data_dir: Path) -> Iterator[HostAgent]:
    """A host agent in this process (no transport): for tools and tests on one machine."""
    agent = HostAgent(name, data_dir)
    try:
        yield agent
    finally:
        for sid in list(agent._exports):
            agent.export_close(sid)


__all__ = ["HostAgent", "local_agent"]
