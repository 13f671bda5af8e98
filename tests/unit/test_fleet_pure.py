"""The fleet's parts that need no cluster: placement, and the chunk stream (real threads)."""

from __future__ import annotations

import io
import sys
import threading
from typing import Any

import pytest

from vmfork.errors import WrongState
from vmfork.fleet import stream
from vmfork.fleet.placement import HoldersFirst, HostView, Request

GiB = 1 << 30


def host(name: str, instances: int = 0, snaps: tuple[str, ...] = (), mem: int = 16 * GiB,
         disk: int = 100 * GiB) -> HostView:
    return HostView(name, instances, frozenset(snaps), mem, disk)


def names(n: int) -> tuple[str, ...]:
    return tuple(f"f-{i}" for i in range(1, n + 1))


def test_holders_first_then_replicas_spread_evenly() -> None:
    hosts = [host("a", snaps=("s",)), host("b"), host("c")]
    plan = HoldersFirst().place(Request("s", names(6), 128, per_host=2), hosts)
    assert {h: len(ns) for h, ns in plan.assign.items()} == {"a": 2, "b": 2, "c": 2}
    assert plan.replicate == {"b": "a", "c": "a"}
    assert plan.unplaced == {}


def test_no_replication_while_holders_have_room() -> None:
    hosts = [host("a", snaps=("s",)), host("b", snaps=("s",)), host("c")]
    plan = HoldersFirst().place(Request("s", names(4), 128, per_host=2), hosts)
    assert plan.replicate == {}
    assert sorted(plan.assign) == ["a", "b"]


def test_replications_spread_over_holders_and_room_counts_existing_instances() -> None:
    hosts = [host("a", 1, ("s",)), host("b", 0, ("s",)), host("c"), host("d")]
    plan = HoldersFirst().place(Request("s", names(5), 128, per_host=1), hosts)
    assert plan.replicate == {"c": "a", "d": "b"}  # a full host still sends
    assert plan.assign == {"b": ["f-1"], "c": ["f-2"], "d": ["f-3"]}  # a is full: 1 instance, limit 1
    assert set(plan.unplaced) == {"f-4", "f-5"}


def test_memory_and_disk_bound_the_room() -> None:
    hosts = [host("a", snaps=("s",), mem=300 << 20), host("b", disk=200 << 20)]
    plan = HoldersFirst().place(Request("s", names(4), 128), hosts)
    assert plan.assign == {"a": ["f-1", "f-3"], "b": ["f-2"]}  # 300 MiB: 2 forks; 200 MiB of disk: 1
    assert set(plan.unplaced) == {"f-4"} and "room" in plan.unplaced["f-4"]


def test_no_holder_names_every_fork() -> None:
    plan = HoldersFirst().place(Request("s", names(2), 128), [host("a")])
    assert plan.assign == {} and set(plan.unplaced) == {"f-1", "f-2"}
    assert "no live host holds snapshot 's'" in plan.unplaced["f-1"]


def _export_of(data: bytes, piece: int = 777) -> Any:
    def run(out: Any) -> dict[str, Any]:
        for i in range(0, len(data), piece):
            out.write(data[i:i + piece])
        out.flush()
        return {"bytes": len(data)}
    return run


def test_stream_roundtrip_in_bounded_chunks() -> None:
    data = bytes(range(256)) * (3 * stream.CHUNK // 256 + 1001)
    s = stream.ExportStream(_export_of(data, 1 << 20))
    sizes: list[int] = []

    def fetch() -> bytes:
        c = s.read()
        sizes.append(len(c))
        return c

    r = stream.ChunkReader(fetch)
    out = io.BytesIO()
    while chunk := r.read(1 << 20):
        out.write(chunk)
    assert out.getvalue() == data and r.received == len(data)
    assert max(sizes) <= stream.CHUNK and sizes[-1] == 0
    assert s.result == {"bytes": len(data)}


def test_stream_hands_the_export_error_to_the_reader() -> None:
    def run(out: Any) -> dict[str, Any]:
        out.write(b"x" * 10)
        raise WrongState("snapshot 'z' cannot be exported: memory is missing")

    s = stream.ExportStream(run)
    with pytest.raises(WrongState, match="memory is missing"):
        while s.read():
            pass


def test_closed_stream_ends_its_writer() -> None:
    """A reader that goes away (close) must not leave the export thread blocked on a full queue."""
    gate = threading.Event()

    def run(out: Any) -> dict[str, Any]:
        gate.set()
        for _ in range(100):
            out.write(b"y" * stream.CHUNK)
        return {}

    s = stream.ExportStream(run)
    gate.wait(5)
    s.read()
    s.close()
    s.thread.join(10)
    assert not s.thread.is_alive()
    assert s.result == {}  # it ran to its end (its output dropped): its lock and tools are released


def test_chunk_reader_names_a_broken_transport() -> None:
    calls = iter([b"abc", ConnectionResetError("peer gone")])

    def fetch() -> bytes:
        x = next(calls)
        if isinstance(x, BaseException):
            raise x
        return x

    r = stream.ChunkReader(fetch)
    with pytest.raises(WrongState, match="broke: ConnectionResetError: peer gone"):
        r.read(10)
    assert r.error == "ConnectionResetError: peer gone"


def test_cli_does_not_import_ray() -> None:
    import subprocess

    code = "import sys, vmfork.cli; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
