"""The two copy-on-write levers, on a real loop-mounted XFS (and ext4 for the no-op case).

1. Guest RAM without huge-page advice (seccomp filter at VMM spawn): the mem-file mapping of
   a running QEMU has no ``hg`` VmFlag, unless VMFORK_QEMU_THP=1 asks for QEMU's default.
2. A 4 KiB copy-on-write extent size hint on ``guests/``, inherited by every guest dir and file.
3. At restore, the page cache of a mem-file that shares extents is dropped, so large folios
   left by earlier readers do not turn 4 KiB guest writes into 2 MiB copies.

Together they bound what a fork generation (fork, restore, a little work, standby) adds on
disk: measured 1.8 MiB of the fork's mem-file no longer shared with its source, against
~50 MiB with QEMU's defaults (docs/bench). Nothing here is timed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on
from tests.fsutil import loop_fs, skip_unless_loop_fs
from vmfork.forkvm import (
    clone_file,
    clone_tree,
)
from vmfork.fs import (
    cow_extent_size_hint,
    extent_stats,
    has_shared_extents,
    set_cow_extent_size_hint,
)
from vmfork.instances.manager import Manager

MiB = 1 << 20


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    skip_unless_loop_fs("xfs")
    with loop_fs("xfs", 600, tmp_path / "img") as mnt:
        yield mnt


def test_guests_dir_gets_the_hint_and_new_guest_files_inherit_it(xfs: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("VMFORK_COWEXTSIZE", raising=False)
    m = Manager(xfs / "data")
    assert cow_extent_size_hint(m.dd.guests) == 4096
    g = m.dd.guests / ".tmp-abc" / "snapshots"
    g.mkdir(parents=True)
    (g / "memory").write_bytes(b"x" * 8192)
    assert cow_extent_size_hint(g / "memory") == 4096
    # a clone (what a fork does) into guests/ inherits it too, whatever its source had
    src = xfs / "elsewhere"
    src.mkdir()
    (src / "memory").write_bytes(b"y" * 8192)
    assert cow_extent_size_hint(src / "memory") is None
    clone_tree(src, m.dd.guests / ".tmp-def")
    assert cow_extent_size_hint(m.dd.guests / ".tmp-def" / "memory") == 4096


def test_shared_extents_are_seen_on_both_sides_of_a_reflink(xfs: Path):
    (xfs / "a").write_bytes(os.urandom(1 << 20))
    os.sync()
    assert has_shared_extents(xfs / "a") is False
    clone_file(xfs / "a", xfs / "b")
    assert has_shared_extents(xfs / "a") and has_shared_extents(xfs / "b")
    st = extent_stats(xfs / "b")
    assert st.shared_bytes == st.bytes == 1 << 20


def test_hint_can_be_left_to_the_filesystem(xfs: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VMFORK_COWEXTSIZE", "0")
    m = Manager(xfs / "data")
    assert cow_extent_size_hint(m.dd.guests) is None


def test_hint_is_a_no_op_where_the_filesystem_has_none(tmp_path: Path):
    skip_unless_loop_fs("ext4")
    with loop_fs("ext4", 64, tmp_path / "img") as mnt:
        m = Manager(mnt / "data")  # must not fail
        assert cow_extent_size_hint(m.dd.guests) is None
        assert set_cow_extent_size_hint(m.dd.guests, 4096) is False


def _ram_vmflags(pid: int, gdir: str) -> list[str]:
    """VmFlags of QEMU's mapping of ``<gdir>/memory`` (the guest RAM file)."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    in_ram = False
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            in_ram = len(fields) >= 6 and fields[-1] == os.path.join(gdir, "memory")
        elif in_ram and line.startswith("VmFlags:"):
            return fields[1:]
    raise AssertionError(f"no mapping of {gdir}/memory in /proc/{pid}/smaps")


@pytest.fixture(scope="module")
def xfs_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path_factory.mktemp("levers"), size_mb=3000) as cli:
        yield cli


@pytest.mark.vm
@pytest.mark.slow
def test_fork_generation_on_xfs_costs_the_pages_it_dirties(xfs_cli: CLI):
    cli = xfs_cli
    cli("run", "src", "--memory", "256M")
    d = cli.json("inspect", "src")
    assert isinstance(d, dict)
    assert "hg" not in _ram_vmflags(d["pid"], d["dir"])  # no MADV_HUGEPAGE on guest RAM
    cli.sh("src", "echo src > /run/s && sync")
    cli("standby", "src")
    cli("fork", "src", "f1")
    # read the fork's RAM file whole (as a checksum or a backup would): the page cache now
    # holds it in large folios, which the restore must not keep
    f1 = cli.json("inspect", "f1")
    assert isinstance(f1, dict)
    with open(Path(f1["dir"]) / "snapshots" / "snapshot-latest" / "memory", "rb") as f:
        while f.read(8 * MiB):
            pass
    cli("restore", "f1")
    cli.sh("f1", "echo fork > /run/f && sync")
    cli("standby", "f1")
    f1 = cli.json("inspect", "f1")
    assert isinstance(f1, dict)
    mem = Path(f1["dir"]) / "snapshots" / "snapshot-latest" / "memory"
    ext = extent_stats(mem)
    assert ext.shared_bytes > 32 * MiB  # still mostly the source's blocks ...
    assert ext.exclusive_bytes < 8 * MiB, f"{ext.exclusive_bytes / MiB:.1f} MiB of the fork's RAM copied"
    # QEMU's own default, on request: the check above would see it
    cli("restore", "f1", env={"VMFORK_QEMU_THP": "1"})
    f1 = cli.json("inspect", "f1")
    assert isinstance(f1, dict)
    assert "hg" in _ram_vmflags(f1["pid"], f1["dir"])
    cli("rm", "--force", "src", "f1")
