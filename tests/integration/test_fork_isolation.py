"""Issue 3: standby, restore and fork with copy-on-write isolation — the invariants.

The ten steps run on a loop-mounted XFS with reflink and on ext4 (the root fs here), with
sentinels in guest RAM (/run, tmpfs) and on the guest's disk (/root, overlay disk).
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


def fingerprint(path: Path) -> tuple[int, str]:
    """(inode, SHA-256 of the content).

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
        return os.fstat(fd).st_ino, h.hexdigest()


def snap_files(cli: CLI, name: str) -> dict[str, tuple[int, str]]:
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


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture(scope="module", params=["xfs", "ext4"])
def fs_cli(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CLI]:
    with data_dir_on(request.param, tmp_path_factory.mktemp(f"fork-{request.param}")) as cli:
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
    # 6. restore the fork: it sees the pre-fork sentinels (RAM and disk)
    cli("restore", "f1")
    assert cli.sh("f1", SHOW).split() == ["src-ram", "src-disk"]
    assert cli.sh("f1", "hostname") == "f1"
    # 7. fork-only sentinels; the fork writes its own snapshot
    cli.sh("f1", "echo fork-ram > /run/forkonly && echo fork-disk > /root/forkonly && sync")
    cli("standby", "f1")
    check("f1")
    # 8. source byte-identical; a reflinked fork costs far less disk than its RAM
    assert snap_files(cli, "src") == before
    grown = used_bytes(cli.data_dir) - used0
    fs = cli.json("doctor")["filesystem"]  # type: ignore[index]
    report.append(
        f"{hypervisor}: fork lifecycle (fork, restore, write, standby) on {fs} (reflink={reflink}): "
        f"+{grown / 2**20:.1f} MiB of disk for a {MEM_MIB} MiB guest"
    )
    if reflink:
        assert grown < MEM_MIB * 2**20 * 0.5
    # 9. delete the fork; the source is still identical
    cli("rm", "f1")
    assert snap_files(cli, "src") == before
    # 10. restore the source: its sentinels survived, nothing of the fork leaked in
    cli("restore", "src")
    assert cli.sh("src", SHOW).split() == ["src-ram", "src-disk"]
    assert cli.sh("src", "hostname") == "src"
    cli("rm", "--force", "src")


def test_fork_isolation_ten_steps(fs_cli: CLI, report: list[str]) -> None:
    ten_steps(fs_cli, report)


@pytest.fixture
def base(xfs_cli: CLI) -> Iterator[str]:
    """A standby source with sentinels, on reflink XFS."""
    xfs_cli("run", "base")
    xfs_cli.sh("base", SENTINELS)
    xfs_cli("standby", "base")
    yield "base"
    for inst in xfs_cli.json("ps"):  # type: ignore[union-attr]
        xfs_cli("rm", "--force", inst["name"], check=False)  # type: ignore[index]


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
    finally:
        cli("rm", "--force", "live", "live-f", check=False)


def test_fork_of_fork_after_parent_deleted(xfs_cli: CLI, base: str) -> None:
    cli = xfs_cli
    cli("fork", base, "gen1", "--target-state", "running")
    cli.sh("gen1", "echo g1 > /root/forkonly")
    cli("standby", "gen1")
    cli("fork", "gen1", "gen2")
    cli("rm", "gen1")
    cli("restore", "gen2")
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
    inodes = set()
    for n in names:
        cli.sh(n, f"echo {n} > /run/forkonly")
        inodes.add(cli.json("inspect", n)["dir"])  # type: ignore[index]
    for n in names:
        assert cli.sh(n, SHOW).split() == ["src-ram", "src-disk", n]
    assert len(inodes) == 8
    assert snap_files(cli, base) == before


def test_restore_source_while_forks_run(xfs_cli: CLI, base: str) -> None:
    cli = xfs_cli
    cli("fork", base, "kid", "--target-state", "running")
    cli.sh("kid", "echo kid > /run/forkonly")
    cli("restore", base)
    cli.sh(base, "echo base-again > /run/forkonly")
    assert cli.sh("kid", SHOW).split() == ["src-ram", "src-disk", "kid"]
    assert cli.sh(base, SHOW).split() == ["src-ram", "src-disk", "base-again"]


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
    # the fork is whole or absent
    if "crashed" in names:
        if names["crashed"]["state"] == "standby":
            cli("restore", "crashed")
        assert cli.sh("crashed", SHOW).split() == ["src-ram", "src-disk"]
    if point == "fork:cloned":
        assert "crashed" not in names
