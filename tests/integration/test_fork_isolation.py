"""Issue 3: standby, restore and fork with copy-on-write isolation — the invariants.

The ten steps run on a loop-mounted XFS with reflink and on a loop-mounted ext4 (no
reflink: sparse copies), with sentinels in guest RAM (/run, tmpfs) and on the guest's disk
(/root, overlay disk). Every fork is checked to share no file (``(st_dev, st_ino)``) with
its source, in standby and while both run; each one restores from its own snapshot and
sees its own sentinels; disk and RAM diverge while source and fork both run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on, kill_all_vmms, vm_unavailable_reason
from tests.fsutil import loop_fs, loop_fs_unavailable_reason

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MEM_MIB = 256
SENTINELS = "echo src-ram > /run/sentinel && echo src-disk > /root/sentinel && sync"
SHOW = "cat /run/sentinel /root/sentinel; cat /run/forkonly /root/forkonly 2>/dev/null; true"
# Reads the disk through the guest's virtio disk (its page cache dropped), not from its cache.
SHOW_LIVE = "sync && echo 3 > /proc/sys/vm/drop_caches && cat /run/live /root/live"

FileId = tuple[int, int]


def fingerprint(path: Path) -> tuple[FileId, str]:
    """((st_dev, st_ino), SHA-256 of the content).

    Exact for content but independent of the file's extent layout (a filesystem may turn
    delayed allocations or zeroes into holes and back): it hashes every non-zero 4 KiB block
    with its offset, reading only the data extents (SEEK_DATA/SEEK_HOLE).
    """
    zero = bytes(4096)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            pos = data - data % 4096
            f.seek(pos)
            while pos < hole:
                chunk = f.read(min(hole - pos + 4095, 8 << 20) // 4096 * 4096 or 4096)
                if not chunk:
                    break
                for i in range(0, len(chunk), 4096):
                    block = chunk[i : i + 4096]
                    if block != zero[: len(block)]:
                        h.update((pos + i).to_bytes(8, "little"))
                        h.update(block)
                pos += len(chunk)
            off = max(hole, pos)
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino), h.hexdigest()


def snap_files(cli: CLI, name: str) -> dict[str, tuple[FileId, str]]:
    d = cli.json("inspect", name)
    assert isinstance(d, dict)
    g = Path(d["dir"])
    snap = g / "snapshots" / "snapshot-latest"
    return {
        rel: fingerprint(p)
        for rel, p in (
            ("memory", snap / "memory"),
            ("state", snap / "state"),
            ("disk", g / "disk.raw"),
        )
    }


def file_ids(cli: CLI, name: str) -> dict[FileId, str]:
    """``(st_dev, st_ino)`` of every file in the instance's directory (a running VMM may
    create or remove a file meanwhile: what vanishes is left out)."""
    d = cli.json("inspect", name)
    assert isinstance(d, dict)
    root = Path(d["dir"])
    ids: dict[FileId, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            ids[(st.st_dev, st.st_ino)] = str(p.relative_to(root))
    return ids


def assert_no_shared_file(cli: CLI, *names: str) -> None:
    """No two of these instances share a file: a fork's mem-file (live or in its snapshot),
    disk and state are never its source's inodes, whatever state each is in."""
    seen: dict[FileId, str] = {}
    for n in names:
        ids = file_ids(cli, n)
        assert {"memory", "disk.raw"} & {Path(r).name for r in ids.values()}, (n, ids)
        for fid, rel in ids.items():
            assert fid not in seen, f"{n}/{rel} is the same file as {seen[fid]}"
        seen |= {fid: f"{n}/{rel}" for fid, rel in ids.items()}


def diverge_while_both_run(cli: CLI, a: str, b: str) -> None:
    """Source and fork both running: each writes its own RAM and disk content at the same
    paths; each reads back its own, the disk through its virtual disk."""
    assert cli.state(a) == cli.state(b) == "running"
    assert_no_shared_file(cli, a, b)
    for n in (a, b):
        cli.sh(n, f"echo {n}-live-ram > /run/live && echo {n}-live-disk > /root/live && sync")
    for n in (a, b):
        assert cli.sh(n, SHOW_LIVE).split() == [f"{n}-live-ram", f"{n}-live-disk"]


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture(scope="module", params=["xfs", "ext4"])
def fs_cli(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CLI]:
    with data_dir_on(request.param, tmp_path_factory.mktemp(f"fork-{request.param}")) as cli:
        assert cli.json("doctor")["filesystem"] == request.param  # type: ignore[index]
        yield cli


@pytest.fixture(scope="module")
def xfs_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path_factory.mktemp("fork-xfs")) as cli:
        yield cli


def ten_steps(cli: CLI, report: list[str], hypervisor: str = "qemu",
              after_standby: Callable[[str], None] | None = None) -> None:
    """The ten invariant steps; ``after_standby(name)`` adds backend-specific checks."""
    reflink = bool(cli.json("doctor")["reflink"])  # type: ignore[index]
    check = after_standby or (lambda _name: None)
    # 1. boot a source; 2. source-only sentinels; 3. standby
    cli("run", "src", "--memory", f"{MEM_MIB}M", "--hypervisor", hypervisor)
    assert cli.json("inspect", "src")["hypervisor"] == hypervisor  # type: ignore[index]
    cli.sh("src", SENTINELS)
    cli("standby", "src")
    assert cli.state("src") == "standby"
    check("src")
    # 4. fingerprint snapshot-latest/memory (inode + SHA-256), plus its state and disk
    before = snap_files(cli, "src")
    used0 = used_bytes(cli.data_dir)
    # 5. fork: a different mem-file inode; the source unchanged
    fork = cli.json("fork", "src", "f1")
    assert isinstance(fork, dict) and fork["state"] == "standby" and fork["parent"] == "src"
    forked = snap_files(cli, "f1")
    assert forked["memory"][0] != before["memory"][0]
    assert forked["memory"][1] == before["memory"][1]  # same content, other file
    assert snap_files(cli, "src") == before
    assert_no_shared_file(cli, "src", "f1")
    # 6. restore the fork: it sees the pre-fork sentinels (RAM and disk)
    cli("restore", "f1")
    assert_no_shared_file(cli, "src", "f1")  # the running fork's live RAM file too
    assert cli.sh("f1", SHOW).split() == ["src-ram", "src-disk"]
    assert cli.sh("f1", "hostname") == "f1"
    # 7. fork-only sentinels; the fork writes its own snapshot, and restores from it
    cli.sh("f1", "echo fork-ram > /run/forkonly && echo fork-disk > /root/forkonly && sync")
    cli("standby", "f1")
    check("f1")
    assert_no_shared_file(cli, "src", "f1")
    assert snap_files(cli, "src") == before
    grown = used_bytes(cli.data_dir) - used0
    cli("restore", "f1")
    assert cli.sh("f1", SHOW).split() == ["src-ram", "src-disk", "fork-ram", "fork-disk"]
    # 8. source byte-identical; a reflinked fork costs far less disk than its RAM
    assert snap_files(cli, "src") == before
    fs = cli.json("doctor")["filesystem"]  # type: ignore[index]
    report.append(
        f"{hypervisor}: fork lifecycle (fork, restore, write, standby) on {fs} (reflink={reflink}): "
        f"+{grown / 2**20:.1f} MiB of disk for a {MEM_MIB} MiB guest"
    )
    if reflink:
        assert grown < MEM_MIB * 2**20 * 0.5
    # 9. restore the source while the fork runs: nothing of the fork leaked in; then both
    #    write their RAM and disk and each keeps its own
    cli("restore", "src")
    assert cli.sh("src", SHOW).split() == ["src-ram", "src-disk"]
    assert cli.sh("src", "hostname") == "src"
    diverge_while_both_run(cli, "src", "f1")
    # 10. delete the fork: the source's new snapshot stays identical, and restores whole
    cli("standby", "src")
    check("src")
    before = snap_files(cli, "src")
    cli("rm", "--force", "f1")
    assert snap_files(cli, "src") == before
    cli("restore", "src")
    assert cli.sh("src", SHOW + "; " + SHOW_LIVE).split() == [
        "src-ram", "src-disk", "src-live-ram", "src-live-disk"]
    cli("rm", "--force", "src")


def test_fork_isolation_ten_steps(fs_cli: CLI, report: list[str]) -> None:
    ten_steps(fs_cli, report)


@pytest.fixture(scope="module")
def golden(xfs_cli: CLI) -> str:
    """One booted guest with the sentinels, in standby: every ``base`` is a fork of it."""
    xfs_cli("run", "golden")
    xfs_cli.sh("golden", SENTINELS)
    xfs_cli("standby", "golden")
    return "golden"


@pytest.fixture
def base(xfs_cli: CLI, golden: str) -> Iterator[str]:
    """A standby source with sentinels, on reflink XFS, for this test only: a fork of the
    module's ``golden`` guest (the same RAM and disk, in milliseconds instead of a boot)."""
    xfs_cli("fork", golden, "base")
    yield "base"
    for inst in xfs_cli.json("ps"):  # type: ignore[union-attr]
        if inst["name"] != golden:  # type: ignore[index]
            xfs_cli("rm", "--force", inst["name"], check=False)  # type: ignore[index]
    assert xfs_cli.state(golden) == "standby"


def test_fork_from_running(xfs_cli: CLI) -> None:
    cli = xfs_cli
    cli("run", "live")
    try:
        cli.sh("live", SENTINELS)
        r = cli("fork", "live", "live-f", check=False)
        assert r.returncode == 5 and b"--from-running" in r.stderr
        fork = cli.json("fork", "live", "live-f", "--from-running")
        assert isinstance(fork, dict) and fork["state"] == "running"
        assert cli.state("live") == "running"
        for n in ("live", "live-f"):
            assert cli.sh(n, SHOW).split() == ["src-ram", "src-disk"]
        cli.sh("live-f", "echo forked > /run/forkonly")
        cli.sh("live", "echo source-after > /run/sentinel")
        assert cli.sh("live", SHOW).split() == ["source-after", "src-disk"]
        assert cli.sh("live-f", SHOW).split() == ["src-ram", "src-disk", "forked"]
        diverge_while_both_run(cli, "live", "live-f")
    finally:
        cli("rm", "--force", "live", "live-f", check=False)


def test_fork_of_fork_after_parent_deleted(xfs_cli: CLI, base: str) -> None:
    cli = xfs_cli
    cli("fork", base, "gen1", "--target-state", "running")
    cli.sh("gen1", "echo g1 > /root/forkonly")
    cli("standby", "gen1")
    cli("fork", "gen1", "gen2")
    assert_no_shared_file(cli, base, "gen1", "gen2")
    cli("rm", "gen1")
    cli("restore", "gen2")
    assert_no_shared_file(cli, base, "gen2")
    assert cli.sh("gen2", SHOW).split() == ["src-ram", "src-disk", "g1"]
    d = cli.json("inspect", "gen2")
    assert isinstance(d, dict)
    assert d["parent"] == "gen1 (deleted)"  # not shown as if it still existed
    assert d["parent_id"] and d["parent_id"] not in {i["id"] for i in cli.json("ps")}  # type: ignore[index]


def test_parallel_forks_of_one_snapshot(xfs_cli: CLI, base: str) -> None:
    cli = xfs_cli
    before = snap_files(cli, base)
    names = [f"par-{i}" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(
            ex.map(lambda n: cli("fork", base, n, "--target-state", "running", check=False), names)
        )
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    # no two of the nine share a file: each running fork's live RAM file and disk is its own
    assert_no_shared_file(cli, base, *names)
    for n in names:
        cli.sh(n, f"echo {n} > /run/forkonly && echo {n} > /root/forkonly && sync")
    for n in names:
        assert cli.sh(n, SHOW + " && echo 3 > /proc/sys/vm/drop_caches && cat /root/forkonly").split() == [
            "src-ram", "src-disk", n, n, n]
    assert snap_files(cli, base) == before


def test_restore_source_while_forks_run(xfs_cli: CLI, base: str) -> None:
    cli = xfs_cli
    cli("fork", base, "kid", "--target-state", "running")
    cli.sh("kid", "echo kid > /run/forkonly")
    cli("restore", base)
    cli.sh(base, "echo base-again > /run/forkonly")
    assert cli.sh("kid", SHOW).split() == ["src-ram", "src-disk", "kid"]
    assert cli.sh(base, SHOW).split() == ["src-ram", "src-disk", "base-again"]
    diverge_while_both_run(cli, base, "kid")


def test_fork_onto_full_filesystem_fails_cleanly(tmp_path: Path) -> None:
    reason = vm_unavailable_reason() or loop_fs_unavailable_reason("ext4")
    if reason:
        pytest.skip(reason)
    with loop_fs("ext4", 900, tmp_path) as mnt:
        cli = CLI(mnt / "data")
        try:
            cli("image", "build")
            cli("run", "full-src")
            cli.sh("full-src", SENTINELS + " && head -c 60000000 /dev/urandom > /run/fill")
            cli("standby", "full-src")
            before = snap_files(cli, "full-src")
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # leave less room than the fork's data needs
                os.posix_fallocate(f.fileno(), 0, max(free - (20 << 20), 0))
            guests_before = sorted(p.name for p in (cli.data_dir / "guests").iterdir())
            r = cli("fork", "full-src", "nospace", check=False)
            assert r.returncode != 0
            err = r.stderr.decode()
            assert "no space left" in err.lower() and "Traceback" not in err
            assert sorted(p.name for p in (cli.data_dir / "guests").iterdir()) == guests_before
            assert snap_files(cli, "full-src") == before
            filler.unlink()
            cli("restore", "full-src")
            assert cli.sh("full-src", SHOW).split() == ["src-ram", "src-disk"]
        finally:
            kill_all_vmms(cli.data_dir)


def _qemu_pids_in(data_dir: Path) -> set[int]:
    guests = str((data_dir / "guests").resolve())
    pids = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/cwd").startswith(guests) and "qemu" in os.readlink(
                    f"/proc/{p}/exe"
                ):
                    pids.add(int(p))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize(
    "point,args",
    [
        ("fork:cloned", ["fork", "base", "crashed"]),
        ("fork:before-rename", ["fork", "base", "crashed"]),
        ("fork:created", ["fork", "base", "crashed", "--target-state", "running"]),
        ("restore:consuming", ["fork", "base", "crashed", "--target-state", "running"]),
        ("standby:vmm-stopped", ["fork", "base", "crashed", "--from-running"]),
        ("fork:source-standby", ["fork", "base", "crashed", "--from-running"]),
    ],
)
def test_sigkill_mid_operation_never_harms_source(
    xfs_cli: CLI, base: str, point: str, args: list[str]
) -> None:
    cli = xfs_cli
    if "--from-running" in args:
        cli("restore", base)
    else:
        before = snap_files(cli, base)
    r = cli(*args, check=False, env={"VMFORK_CRASHPOINT": point})
    assert r.returncode == -9, (point, r.returncode, r.stderr)
    # the next command recovers: no half fork, no orphan VMM
    cli("ps")
    guests = cli.data_dir / "guests"
    assert not [p for p in guests.iterdir() if p.name.startswith(".")]
    names = {i["name"]: i for i in cli.json("ps")}  # type: ignore[union-attr, index]
    recorded = {i["pid"] for i in names.values() if i["pid"]}
    assert _qemu_pids_in(cli.data_dir) == recorded
    # the source is whole: untouched snapshot, or restorable with its sentinels
    if "--from-running" not in args:
        assert snap_files(cli, base) == before
    if names[base]["state"] == "standby":
        cli("restore", base)
    assert names[base]["state"] in ("standby", "running")
    assert cli.sh(base, SHOW).split() == ["src-ram", "src-disk"]
    # the fork is whole or absent, and shares no file with its source
    if "crashed" in names:
        assert_no_shared_file(cli, base, "crashed")
        if names["crashed"]["state"] == "standby":
            cli("restore", "crashed")
        assert cli.sh("crashed", SHOW).split() == ["src-ram", "src-disk"]
    if point == "fork:cloned":
        assert "crashed" not in names
