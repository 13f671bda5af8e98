"""Confinement, the parts that need no VM: uid claims, limits, giving a guest's files to its VMM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmfork import confine
from vmfork.confine import cgroups, ids
from vmfork.errors import HypervisorError, InvalidArgument
from vmfork.layout import GuestDir


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    reg = tmp_path / "uids"
    monkeypatch.setenv("VMFORK_UID_REGISTRY", str(reg))
    monkeypatch.setenv("VMFORK_UID_RANGE", "1700000000-1700000002")
    return reg


def _instance(data: Path, iid: str) -> None:
    (data / "guests" / iid).mkdir(parents=True)


def test_uids_are_unique_per_instance_across_data_dirs_and_reclaimed_when_stale(registry: Path, tmp_path: Path):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    _instance(d1, "aaaa")
    _instance(d1, "bbbb")
    _instance(d2, "aaaa")  # same id, another data dir: another instance
    u1 = ids.allocate(d1, "aaaa")
    assert ids.allocate(d1, "aaaa") == u1  # its claim, again
    u2 = ids.allocate(d1, "bbbb")
    u3 = ids.allocate(d2, "aaaa")
    assert len({u1, u2, u3}) == 3
    assert json.loads((registry / str(u3)).read_text()) == {"data_dir": str(d2.resolve()), "id": "aaaa"}
    _instance(d2, "cccc")
    with pytest.raises(Exception, match="no free uid"):
        ids.allocate(d2, "cccc")
    ids.free(d1, "bbbb")
    assert ids.owner_of(u2) is None
    assert ids.allocate(d2, "cccc") == u2
    # the data dir of u1 disappears (a deleted test dir): its claim is stale and taken over
    (d1 / "guests" / "aaaa").rename(d1 / "guests" / "gone")
    _instance(d2, "dddd")
    assert ids.allocate(d2, "dddd") == u1


def test_uid_range_is_validated(monkeypatch: pytest.MonkeyPatch):
    for bad in ("12", "5-1", "0-100", "abc-def", "1000-4294967295"):
        monkeypatch.setenv("VMFORK_UID_RANGE", bad)
        with pytest.raises(InvalidArgument, match="VMFORK_UID_RANGE"):
            ids.uid_range()
    monkeypatch.delenv("VMFORK_UID_RANGE")
    assert ids.uid_range() == ids.DEFAULT_RANGE


def test_limits_default_and_validation():
    lim = confine.default_limits(256, "tcg")
    assert lim.memory_bytes == (256 + confine.OVERHEAD_MIB["tcg"]) << 20 and lim.pids == confine.PIDS_LIMIT
    lim = confine.default_limits(256, "kvm", memory_limit_mib=100, pids=50, cpus=0.5)
    assert (lim.memory_bytes, lim.pids, lim.cpus) == (100 << 20, 50, 0.5)
    assert cgroups.Limits.from_json(lim.to_json()) == lim
    for kw, word in (({"cpus": 0.0}, "--cpus"), ({"pids": 1}, "--pids-limit"),
                     ({"memory_limit_mib": 2}, "--memory-limit"), ({"io_weight": 20000}, "--io-weight")):
        args: dict[str, object] = {"memory_limit_mib": None, "pids": None, "cpus": None, "io_weight": None} | kw
        with pytest.raises(InvalidArgument, match=word):
            confine.validate_limits(**args)  # type: ignore[arg-type]


def test_group_names_are_per_data_dir(tmp_path: Path):
    a = cgroups.group_name(tmp_path / "a", "x1")
    b = cgroups.group_name(tmp_path / "b", "x1")
    assert a != b and a.endswith(".x1") and a.startswith(cgroups.data_dir_prefix(tmp_path / "a"))


def _plan(uid: int, writable: tuple[str, ...] = ()) -> confine.Plan:
    return confine.Plan(uid=uid, gid=uid, group="g", limits=confine.default_limits(64, "tcg"), data_dir="/",
                        ro_dirs=(), devices=(), groups=(), writable=writable)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_prepare_gives_only_this_guests_files_and_refuses_links(tmp_path: Path):
    g = GuestDir(tmp_path / "guest")
    g.ensure_dirs()
    g.disk.write_bytes(b"d")
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    confine.prepare_guest(g, _plan(1700000005), "qemu")
    for f in (g.disk, g.memory, g.console_log):
        st = f.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1700000005, 1700000005, 0o600), f
    st = g.path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 1700000005, 0o710)
    # a symlink where a guest file should be is not followed
    g.console_log.unlink()
    g.console_log.symlink_to(outside)
    with pytest.raises(OSError):
        confine.prepare_guest(g, _plan(1700000005), "qemu")
    assert outside.stat().st_uid == 0
    # a guest file that is another name of some other file is never re-owned
    g.console_log.unlink()
    os.link(outside, g.console_log)
    with pytest.raises(HypervisorError, match="2 links"):
        confine.prepare_guest(g, _plan(1700000005), "qemu")
    assert outside.stat().st_uid == 0
    # Firecracker's dirs are given whole, symlinks inside are skipped, not followed
    g.console_log.unlink()
    (g.run / "fc.sock.link").symlink_to(outside)
    confine.prepare_guest(g, _plan(1700000006, ("run", "snapshots")), "firecracker")
    assert g.run.stat().st_uid == 1700000006 and outside.stat().st_uid == 0


def test_no_plan_no_confinement(tmp_path: Path):
    g = GuestDir(tmp_path / "guest")
    g.ensure_dirs()
    assert confine.load_plan(g) is None
    assert confine.qemu_sandbox_args(g) == []
    assert confine.starter(g, "qemu", "/usr/bin/true", None) is None
    (g.run / confine.PLAN).write_text("{broken")
    with pytest.raises(HypervisorError, match="unreadable confinement plan"):
        confine.load_plan(g)


def test_confine_mode(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VMFORK_CONFINE", "0")
    assert not confine.enabled()
    monkeypatch.setenv("VMFORK_CONFINE", "yes")
    with pytest.raises(InvalidArgument, match="VMFORK_CONFINE"):
        confine.enabled()
