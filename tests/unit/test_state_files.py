"""Issue 8: locks that may be removed, broken instance metadata, snapshot integrity."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from vmfork.errors import Busy
from vmfork.instances import integrity
from vmfork.instances.model import Instance
from vmfork.locking import file_lock, try_lock

GOOD = {
    "id": "abcdefabcdef", "name": "web-1", "hypervisor": "qemu", "accel": "tcg", "memory_mib": 128,
    "vcpus": 1, "image_digest": "sha256:x", "created_at": "2026-12-01T00:00:00.000+00:00",
    "mac": "52:54:00:00:00:01", "cid": 3,
}


# --- locks ----------------------------------------------------------------------------------
def test_removed_lock_file_is_not_held_twice(tmp_path: Path) -> None:
    """A waiter that got the lock of a file its holder removed must not hold it beside a
    newcomer on the new file: it notices and locks the new file instead."""
    path = tmp_path / "x.lock"
    holder_done = threading.Event()
    order: list[str] = []
    with file_lock(path, what="x", remove=True):
        def waiter() -> None:
            with file_lock(path, what="x", timeout=10):
                order.append("waiter")
                # while the waiter holds the lock, nobody else may take it
                assert try_lock(path) is None
            holder_done.set()

        t = threading.Thread(target=waiter)
        t.start()
        order.append("holder")
    t.join(10)
    assert holder_done.is_set() and order == ["holder", "waiter"]


def test_lock_file_removed_with_remove_and_busy_names_what(tmp_path: Path) -> None:
    path = tmp_path / "y.lock"
    with file_lock(path, what="instance 'y'"), pytest.raises(Busy, match="instance 'y' is busy"), \
            file_lock(path, what="instance 'y'", timeout=0):
        pass
    assert path.exists()
    with file_lock(path, what="y", remove=True):
        pass
    assert not path.exists()
    assert try_lock(path) is None  # no file, no lock (without create)


# --- instance metadata ------------------------------------------------------------------------
def _write(d: Path, text: str | bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "instance.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return d


def test_valid_metadata_loads(tmp_path: Path) -> None:
    inst = Instance.load(_write(tmp_path / GOOD["id"], json.dumps(GOOD)))  # type: ignore[operator]
    assert inst.problem is None and inst.name == "web-1" and inst.pending is None


@pytest.mark.parametrize("text,why", [
    ("{not json", "invalid"),
    ("[]", "not a JSON object"),
    (json.dumps(GOOD | {"memory_mib": "128"}), "'memory_mib' is str"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "cid"}), "'cid' is missing"),
    (json.dumps(GOOD | {"id": "ffffffffffff"}), "directory"),
])
def test_broken_metadata_keeps_id_and_name(tmp_path: Path, text: str, why: str) -> None:
    inst = Instance.load(_write(tmp_path / str(GOOD["id"]), text))
    assert inst.problem and why in inst.problem
    assert inst.id == GOOD["id"]
    # the name stays known (and so reserved) wherever the text still holds it
    assert inst.name == ("web-1" if '"name": "web-1"' in text else GOOD["id"])


def test_unreadable_metadata(tmp_path: Path) -> None:
    d = tmp_path / "abcdefabcdef"
    d.mkdir()
    inst = Instance.load(d)
    assert inst.problem and "cannot be read" in inst.problem
    assert inst.name == "abcdefabcdef"
    assert "problem" not in inst.to_json()


# --- snapshot integrity -----------------------------------------------------------------------
MEM = 1 << 20


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    s = tmp_path / "snap"
    s.mkdir()
    with open(s / "memory", "wb") as f:
        f.truncate(MEM)
    (s / "state").write_bytes(os.urandom(5000))
    (s / "config.json").write_text('{"memory_mib": 1}')
    integrity.write_manifest(s, MEM)
    return s


def test_intact_snapshot(snap: Path) -> None:
    assert integrity.problem(snap, MEM) is None
    assert integrity.quick_problem(snap, MEM) is None


def test_truncated_memory(snap: Path) -> None:
    os.truncate(snap / "memory", MEM // 2)
    for check in (integrity.quick_problem, integrity.problem):
        p = check(snap, MEM)
        assert p and "memory file holds 524288 bytes" in p and "1 MiB" in p and len(p) < 200


def test_flipped_state_byte(snap: Path) -> None:
    data = bytearray((snap / "state").read_bytes())
    data[1234] ^= 0x40
    (snap / "state").write_bytes(data)
    assert integrity.quick_problem(snap, MEM) is None  # sizes alike: only the digest tells
    p = integrity.problem(snap, MEM)
    assert p and "state does not match the digest" in p


def test_missing_config(snap: Path) -> None:
    (snap / "config.json").unlink()
    p = integrity.quick_problem(snap, MEM)
    assert p == "snapshot is incomplete: config.json missing"


def test_snapshot_without_manifest_is_checked_by_size(snap: Path) -> None:
    (snap / integrity.MANIFEST).unlink()
    assert integrity.problem(snap, MEM) is None
    assert integrity.problem(snap, 2 * MEM) is not None


# --- the VM config saved with a snapshot -------------------------------------------------------
def test_vm_config_reads_the_untyped_extra_of_earlier_versions() -> None:
    from vmfork.hypervisor.base import VMConfig

    old = {"hypervisor": "firecracker", "memory_mib": 256, "vcpus": 1, "accel": "kvm", "image_digest": "d",
           "cmdline": "c", "vmm_version": "1.12.1",
           "extra": {"id": "abcdefabcdef", "fc_snapshot_version": "5.0.0", "fc_snapshot_type": "Diff"}}
    cfg = VMConfig.from_json(old | {"taken_at": "ignored"})
    assert (cfg.id, cfg.snapshot_version, cfg.snapshot_type) == ("abcdefabcdef", "5.0.0", "Diff")
    assert VMConfig.from_json(cfg.to_json()) == cfg
    assert "extra" not in cfg.to_json()


# --- an operation queued behind rm re-reads its instance once it holds the lock ----------------
def _fake_standby(root: Path, iid: str, name: str) -> None:
    """A standby instance on disk as vmfork writes one (no VMM needed to look at it)."""
    d = root / "guests" / iid
    snap = d / "snapshots" / "snapshot-latest"
    snap.mkdir(parents=True)
    (d / "instance.json").write_text(json.dumps(GOOD | {"id": iid, "name": name, "memory_mib": 1}))
    with open(snap / "memory", "wb") as f:
        f.truncate(1 << 20)
    (snap / "state").write_bytes(b"state")
    (snap / "config.json").write_text("{}")
    integrity.write_manifest(snap, 1 << 20)


@pytest.mark.parametrize("op", ["start", "fork", "restore", "rm"])
def test_operation_behind_rm_says_removed_and_recreates_nothing(tmp_path: Path, op: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from vmfork.errors import NotFound
    from vmfork.instances import Manager

    m = Manager(tmp_path / "data")
    _fake_standby(m.dd.root, "abcdefabcdef", "src")
    stale = m.find("src")  # what the queued command found before it waited for the lock
    m.rm("src")  # ... meanwhile the instance was removed
    monkeypatch.setattr(m, "find", lambda ref: stale)
    call = {"start": lambda: m.start("src"), "fork": lambda: m.fork("src", "kid"),
            "restore": lambda: m.restore("src"), "rm": lambda: m.rm("src")}[op]
    with pytest.raises(NotFound, match=r"instance 'src' not found \(it was removed meanwhile\)"):
        call()
    assert list((m.dd.root / "guests").iterdir()) == []  # no run/ or half fork recreated
    assert list(m.dd.locks.iterdir()) == []  # and no lock file left behind
