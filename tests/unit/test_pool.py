"""The warm pool's slot records (issue 16): what makes a slot, what makes it stale, and that
no instance view takes a slot for an instance (no VM needed: real files in tmp dirs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vmfork.instances import view
from vmfork.instances.manager import Manager
from vmfork.pool import READY, SLOT, STARTING, Slot, cids, problem, slot_dirs, snapshot_key

INSTANCE = {
    "id": "abcdefabcdef", "name": "src", "hypervisor": "qemu", "accel": "tcg", "memory_mib": 128,
    "vcpus": 1, "image_digest": "sha256:x", "created_at": "2026-12-01T00:00:00.000+00:00",
    "mac": "52:54:00:00:00:01", "cid": 3,
}


def _slot(guests: Path, iid: str, *, state: str = READY, cid: int = 4, source: str = "abcdefabcdef") -> Slot:
    d = guests / iid
    (d / "run").mkdir(parents=True)
    s = Slot(iid=iid, dir=d, source_id=source, source_name="src", key={"taken_at": "t"}, cid=cid,
             mac="52:54:00:00:00:02", uid=None, network=None, state=state, created_at="now")
    (d / SLOT).write_text(json.dumps(s.to_json()))
    return s


def _snapshot(d: Path, taken_at: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"taken_at": taken_at}))
    (d / "state").write_bytes(b"state")
    (d / "memory").write_bytes(b"\0" * 4096)
    return d


def test_a_slot_round_trips_and_a_broken_marker_is_no_slot(tmp_path: Path) -> None:
    s = _slot(tmp_path, "slot00000001")
    assert Slot.load(s.dir) == s
    (s.dir / SLOT).write_text("{not json")
    assert Slot.load(s.dir) is None
    assert problem(None, tmp_path) == "unreadable slot marker"


def test_the_snapshot_key_changes_with_a_new_snapshot(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path / "snapshot-latest", "2026-12-07T10:00:00.000+00:00")
    key = snapshot_key(snap)
    assert key and snapshot_key(snap) == key
    time.sleep(0.01)
    (snap / "state").unlink()
    (snap / "state").write_bytes(b"state")  # a new standby writes a new state file
    assert snapshot_key(snap) != key
    key = snapshot_key(snap)
    (snap / "config.json").write_text(json.dumps({"taken_at": "2026-12-07T10:00:01.000+00:00"}))
    assert snapshot_key(snap) != key
    assert snapshot_key(tmp_path / "gone") == {}


def test_a_slot_is_not_an_instance(tmp_path: Path) -> None:
    m = Manager(tmp_path / "data")
    src = m.dd.guests / str(INSTANCE["id"])
    src.mkdir()
    (src / "instance.json").write_text(json.dumps(INSTANCE))
    s = _slot(m.dd.guests, "slot00000001", cid=4)
    assert [i.name for i in m.instances()] == ["src"]
    assert slot_dirs(m.dd.guests) == [s.dir]
    assert cids(m.dd.guests) == {4}
    assert m._free_cid() == 5  # the slot's CID is taken (3: the source's)


def test_what_recovery_removes(tmp_path: Path) -> None:
    guests = tmp_path / "guests"
    (guests / "abcdefabcdef").mkdir(parents=True)
    starting = _slot(guests, "slot00000001", state=STARTING)
    assert problem(starting, guests) == "unfinished"
    orphan = _slot(guests, "slot00000002", source="gonegonegone")
    assert problem(orphan, guests) == "its source is gone"
    dead = _slot(guests, "slot00000003")
    (dead.dir / "run" / "vmm.json").write_text(json.dumps({"pid": 2 ** 22 + 1, "start": 1}))
    assert problem(dead, guests) == "its VMM is gone"
    claimed = _slot(guests, "slot00000004")
    (claimed.dir / "instance.json").write_text("{}")
    assert problem(claimed, guests) == "unfinished claim"
    assert view.needs_recovery(tmp_path)
