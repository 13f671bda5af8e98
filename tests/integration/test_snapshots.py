"""Named snapshots (issue 12), with real guests on loop XFS (reflink) and ext4.

Guests are shared where a test does not change them: one template per filesystem, one
snapshot of it taken while it runs, forked by the tests that need a guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_crash_recovery import killed
from vmfork.fs import filesystem_type

SENTINEL_1 = "echo ram-one > /run/s; echo disk-one > /root/s; sync"
SENTINEL_2 = "echo ram-two > /run/s; echo disk-two > /root/s; sync"
READ = "cat /run/s /root/s"
AS_OF_1 = "ram-one\ndisk-one"


def snap_json(cli: CLI, name: str) -> dict[str, Any]:
    d = cli.json("snapshot", "inspect", name)
    assert isinstance(d, dict)
    return d


def verified(cli: CLI, name: str) -> dict[str, Any]:
    d = cli.json("snapshot", "verify", name)
    assert isinstance(d, dict) and d["ok"], d
    return d


def leftovers(d: Path) -> list[str]:
    """Unfinished work in a data dir's guests/ or snapshots/ (temp, trash, batch markers)."""
    return [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".trash-", ".import-", ".export-", ".batch-"))]


def names(cli: CLI) -> set[str]:
    return {str(r["name"]) for r in cli.json("ps")}  # type: ignore[union-attr]


def snap_names(cli: CLI) -> set[str]:
    return {str(r["name"]) for r in cli.json("snapshot", "ls")}  # type: ignore[union-attr]


@pytest.fixture(scope="module", params=["xfs", "ext4"])
def fs_cli(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on(request.param, tmp_path_factory.mktemp(f"snap-{request.param}")) as cli:
        yield cli


@pytest.fixture(scope="module")
def xfs_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path_factory.mktemp("snap-xfs")) as cli:
        yield cli


@pytest.fixture(scope="module")
def template(xfs_cli: CLI) -> str:
    """A snapshot ('tpl') of a running guest with the first sentinels; its source is gone."""
    xfs_cli("run", "tpl-src")
    xfs_cli.sh("tpl-src", SENTINEL_1)
    xfs_cli("snapshot", "create", "tpl-src", "tpl")
    xfs_cli("rm", "--force", "tpl-src")
    return "tpl"


# --- outliving the source ----------------------------------------------------------------------
def test_snapshot_outlives_its_source(fs_cli: CLI, report: list[str]) -> None:
    cli = fs_cli
    cli("run", "src")
    cli.sh("src", SENTINEL_1)
    r = cli.json("snapshot", "create", "src", "s1")
    assert isinstance(r, dict) and r["snapshot"]["live"] is True
    pause_ms = r["snapshot"]["pause_ms"]
    report.append(f"snapshot create of a running 256 MiB guest ({filesystem_type(cli.data_dir)}): paused {pause_ms} ms")
    assert cli.state("src") == "running"  # kept running
    cli.sh("src", SENTINEL_2)  # keeps writing after the snapshot
    assert cli.sh("src", READ) == "ram-two\ndisk-two"
    recorded = snap_json(cli, "s1")["files"]
    cli("rm", "--force", "src")
    cli("snapshot", "fork", "s1", "o", "--count", "3", "--target-state", "running")
    for i in (1, 2, 3):
        assert cli.sh(f"o-{i}", READ) == AS_OF_1, f"o-{i}"
        cli.sh(f"o-{i}", f"echo fork-{i} > /run/s; echo fork-{i} > /root/s; sync")
    cli("standby", "o-1")
    cli("restore", "o-1")
    assert cli.sh("o-1", READ) == "fork-1\nfork-1"
    cli("standby", "o-2")
    # The snapshot is byte-for-byte what was recorded, after all the forks ran, wrote and stood by.
    assert snap_json(cli, "s1")["files"] == recorded
    verified(cli, "s1")
    # Removing the snapshot breaks nothing made from it.
    cli("snapshot", "rm", "s1")
    cli("restore", "o-2")
    assert cli.sh("o-2", READ) == "fork-2\nfork-2"
    tree = cli("tree").stdout.decode()
    assert "src (deleted)" in tree and "snapshot s1 (deleted)" in tree, tree
    cli("rm", "--force", "o-1", "o-2", "o-3")


def test_standby_instance_keeps_its_standby(xfs_cli: CLI, template: str) -> None:
    cli = xfs_cli
    cli("snapshot", "fork", template, "sb")
    assert cli.state("sb") == "standby"
    cli("snapshot", "create", "sb", "sb-snap")
    assert cli.state("sb") == "standby"  # its own snapshot-latest untouched
    cli("restore", "sb")
    assert cli.sh("sb", READ) == AS_OF_1
    d = snap_json(cli, "sb-snap")
    assert d["live"] is False and d["parent_name"] == template and d["source_name"] == "sb"
    cli("rm", "--force", "sb")
    cli("snapshot", "rm", "sb-snap")


# --- rollback ---------------------------------------------------------------------------------
def test_rollback_to_an_older_snapshot(xfs_cli: CLI, template: str) -> None:
    cli = xfs_cli
    cli("snapshot", "fork", template, "rb", "--target-state", "running")
    cli("snapshot", "create", "rb", "rb-old")
    cli.sh("rb", SENTINEL_2)
    cli("snapshot", "create", "rb", "rb-new")
    cli.sh("rb", "echo ram-three > /run/s; echo disk-three > /root/s; sync")
    recorded = snap_json(cli, "rb-old")["files"]
    cli("restore", "rb", "--snapshot", "rb-old")
    assert cli.state("rb") == "running"
    assert cli.sh("rb", READ) == AS_OF_1  # the newer state is gone
    cli.sh("rb", "echo after > /run/s; sync")
    cli("restore", "rb", "--snapshot", "rb-new")  # and forward again, from running
    assert cli.sh("rb", READ) == "ram-two\ndisk-two"
    assert snap_json(cli, "rb-old")["files"] == recorded  # the snapshot stays, unchanged
    verified(cli, "rb-old")
    cli("snapshot", "fork", "rb-old", "rb-fork", "--target-state", "running")
    assert cli.sh("rb-fork", READ) == AS_OF_1
    # A snapshot of another instance is refused, naming why.
    cli("run", "other") if "other" not in names(cli) else None
    r = cli("restore", "other", "--snapshot", "rb-old", check=False)
    assert r.returncode != 0 and b"was taken of 'rb'" in r.stderr, r.stderr
    cli("rm", "--force", "rb", "rb-fork", "other")
    cli("snapshot", "rm", "rb-old", "rb-new")


# --- N-way fork -------------------------------------------------------------------------------
def test_sixteen_forks_of_one_snapshot(xfs_cli: CLI, template: str, report: list[str]) -> None:
    cli = xfs_cli
    r = cli.json("snapshot", "fork", template, "n", "--count", "16")
    assert isinstance(r, dict)
    forks = [f["name"] for f in r["forks"]]
    assert forks == [f"n-{i}" for i in range(1, 17)]
    report.append(f"snapshot fork --count 16 to standby (XFS): {r['timings']['total_s'] * 1000:.0f} ms")
    snap_dir = Path(snap_json(cli, template)["dir"])
    inodes = {os.stat(snap_dir / "memory").st_ino}
    for f in r["forks"]:
        mem = Path(f["dir"]) / "snapshots" / "snapshot-latest" / "memory"
        inodes.add(os.stat(mem).st_ino)
    assert len(inodes) == 17  # each fork's mem-file is its own inode, none the snapshot's
    df = cli.json("df")
    assert isinstance(df, dict)
    rows = {row["name"]: row for row in df["items"] if row["name"].startswith("n-")}
    assert len(rows) == 16
    for row in rows.values():  # almost everything shared (reflinks), little their own
        assert row["shared_bytes"] >= 0.95 * row["data_bytes"], row
        assert row["freed_by_rm_bytes"] <= 0.05 * row["data_bytes"], row
    total = df["totals"]
    assert total["physical_bytes"] < total["data_bytes"] / 8  # 17 copies of the data, stored ~once
    for name in forks:  # all restorable, each its own guest
        cli("restore", name)
        assert cli.sh(name, "cat /run/s; hostname") == f"ram-one\n{name}"
        cli("rm", "--force", name)


def test_fork_count_from_an_instance(xfs_cli: CLI, template: str) -> None:
    cli = xfs_cli
    cli("snapshot", "fork", template, "fsrc", "--target-state", "running")
    r = cli.json("fork", "fsrc", "c", "--count", "3", "--from-running", "--target-state", "running")
    assert isinstance(r, dict) and [f["state"] for f in r["forks"]] == ["running"] * 3
    assert cli.state("fsrc") == "running"
    for i in (1, 2, 3):
        assert cli.sh(f"c-{i}", READ) == AS_OF_1
    cli("rm", "--force", "fsrc", "c-1", "c-2", "c-3")


@pytest.mark.parametrize("count", ["0", "-1", "101", "x"])
def test_bad_count_is_refused(xfs_cli: CLI, template: str, count: str) -> None:
    before = names(xfs_cli)
    r = xfs_cli("snapshot", "fork", template, "bad", "--count", count, check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert ("count" in err and len(err.strip().splitlines()) == 1) or "Invalid value" in err, err
    assert names(xfs_cli) == before


# --- export / import --------------------------------------------------------------------------
def test_export_import_round_trip(xfs_cli: CLI, template: str, tmp_path_factory: pytest.TempPathFactory,
                                  report: list[str]) -> None:
    archive = tmp_path_factory.mktemp("archive") / "tpl.tar.zst"
    xfs_cli("snapshot", "export", template, "-o", str(archive), "--with-image")
    assert archive.stat().st_size < 200 << 20  # holes not stored: 2 GiB disk + 256 MiB RAM, sparse
    with data_dir_on("ext4", tmp_path_factory.mktemp("snap-import")) as other:
        # A corrupt archive (one byte) is refused and nothing becomes visible.
        bad = archive.with_name("bad.tar.zst")
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(data)
        r = other("snapshot", "import", str(bad), check=False)
        assert r.returncode != 0, r
        assert snap_names(other) == set()
        assert [p.name for p in (other.data_dir / "snapshots").iterdir()] == []
        # Streams: export to stdout, import from stdin.
        exp = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "--data-dir", str(xfs_cli.data_dir), "-q",
                                "snapshot", "export", template, "-o", "-", "--with-image"], stdout=subprocess.PIPE)
        imp = subprocess.run([sys.executable, "-m", "vmfork.cli", "--data-dir", str(other.data_dir),
                              "snapshot", "import", "-", "--name", "moved", "--json"],
                             stdin=exp.stdout, capture_output=True, timeout=300)
        assert exp.wait(60) == 0 and imp.returncode == 0, imp.stderr
        assert snap_names(other) == {"moved"}
        verified(other, "moved")
        other("snapshot", "fork", "moved", "there", "--target-state", "running")
        assert other.sh("there", READ) == AS_OF_1
        # The same name twice is refused.
        r = other("snapshot", "import", str(archive), "--name", "moved", check=False)
        assert r.returncode != 0 and b"already exists" in r.stderr
        other("rm", "--force", "there")
    report.append(f"export of a 256 MiB snapshot with its image: {archive.stat().st_size >> 20} MiB archive")


def test_import_without_image_is_refused(xfs_cli: CLI, template: str, tmp_path: Path) -> None:
    archive = tmp_path / "noimg.tar.zst"
    xfs_cli("snapshot", "export", template, "-o", str(archive))
    with data_dir_on("ext4", tmp_path / "d") as other:
        r = other("snapshot", "import", str(archive), check=False)
        if b"needs guest image" not in r.stderr:  # same image digest built here: accepted
            assert r.returncode == 0, r.stderr
        else:
            assert snap_names(other) == set()


# --- prune ------------------------------------------------------------------------------------
def test_prune(xfs_cli: CLI, template: str) -> None:
    cli = xfs_cli
    cli("snapshot", "fork", template, "pr")
    for i in range(4):
        cli("snapshot", "create", "pr", f"pr-{i}")
    r = cli.json("snapshot", "prune", "pr", "--keep-last", "2", "--dry-run")
    assert r == {"dry_run": True, "snapshots": ["pr-1", "pr-0"]}
    assert {"pr-0", "pr-1"} <= snap_names(cli)
    r = cli.json("snapshot", "prune", "pr", "--keep-last", "2")
    assert {"pr-0", "pr-1"}.isdisjoint(snap_names(cli)) and {"pr-2", "pr-3"} <= snap_names(cli)
    r = cli.json("snapshot", "prune", "pr", "--older-than", "1d")
    assert r == {"dry_run": False, "snapshots": []}
    bad = cli("snapshot", "prune", "pr", "--older-than", "soon", check=False)
    assert bad.returncode != 0 and b"invalid duration" in bad.stderr
    cli("rm", "pr")
    cli("snapshot", "prune", "pr", "--keep-last", "0")  # its snapshots outlive it; prunable by name
    assert {"pr-2", "pr-3"}.isdisjoint(snap_names(cli))


# --- kills ------------------------------------------------------------------------------------
CREATE_POINTS = ["snapshot:state-written", "snapshot:cloned", "snapshot:files", "snapshot:before-rename"]


@pytest.mark.parametrize("point", CREATE_POINTS)
def test_snapshot_create_killed(xfs_cli: CLI, template: str, point: str) -> None:
    cli = xfs_cli
    if "ks" not in names(cli):
        cli("snapshot", "fork", template, "ks", "--target-state", "running")
    killed(cli, ["snapshot", "create", "ks", "ks-snap"], point=point)
    assert "ks-snap" not in snap_names(cli)  # recovered: nothing partial
    assert leftovers(cli.data_dir / "snapshots") == []
    assert cli.state("ks") == "running"  # the source runs on (resumed if it was paused)
    assert cli.sh("ks", READ) == AS_OF_1
    assert not (cli.data_dir / "guests" / json.loads(cli("inspect", "ks", "--json").stdout)["id"]
                / "snapshots" / ".live-snapshot").exists()


FORK_POINTS = {
    "fork-many:cloned-one": False, "fork-many:synced": False, "fork-many:renamed-one": False,
    "fork-many:created": False, "fork-many:target-one": False, "fork-many:before-commit": False,
    "fork-many:committed": True,
}


@pytest.mark.parametrize("point,all_kept", sorted(FORK_POINTS.items()))
def test_snapshot_fork_count_killed(xfs_cli: CLI, template: str, point: str, all_kept: bool) -> None:
    cli = xfs_cli
    recorded = snap_json(cli, template)["files"]
    killed(cli, ["snapshot", "fork", template, "k", "--count", "3", "--target-state", "running"], point=point)
    made = {n for n in names(cli) if n.startswith("k-")}
    assert made == ({"k-1", "k-2", "k-3"} if all_kept else set()), made
    for n in made:
        assert cli.state(n) in ("running", "standby")
    assert snap_json(cli, template)["files"] == recorded
    assert leftovers(cli.data_dir / "guests") == []
    if made:
        cli("rm", "--force", *sorted(made))


def test_import_killed(xfs_cli: CLI, template: str, tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.zst"
    xfs_cli("snapshot", "export", template, "-o", str(archive))
    killed(xfs_cli, ["snapshot", "import", str(archive), "--name", "imp"], point="import:unpacked")
    assert "imp" not in snap_names(xfs_cli)
    assert leftovers(xfs_cli.data_dir / "snapshots") == []
    xfs_cli("snapshot", "import", str(archive), "--name", "imp")
    verified(xfs_cli, "imp")
    xfs_cli("snapshot", "rm", "imp")


ROLLBACK_POINTS = {"rollback:cloned": "running", "rollback:committed": "standby", "rollback:swapped": "standby"}


@pytest.mark.parametrize("point,outcome", sorted(ROLLBACK_POINTS.items()))
def test_rollback_killed(xfs_cli: CLI, template: str, point: str, outcome: str) -> None:
    """Before the commit point the instance runs on as it was; after it, it is in standby at
    the snapshot. Never half."""
    cli = xfs_cli
    cli("snapshot", "fork", template, "kr", "--target-state", "running")
    cli("snapshot", "create", "kr", "kr-snap")
    cli.sh("kr", SENTINEL_2)
    killed(cli, ["restore", "kr", "--snapshot", "kr-snap"], point=point)
    assert cli.state("kr") == outcome
    if outcome == "standby":
        cli("restore", "kr")
        assert cli.sh("kr", READ) == AS_OF_1
    else:
        assert cli.sh("kr", READ) == "ram-two\ndisk-two"
    verified(cli, "kr-snap")
    cli("rm", "--force", "kr")
    cli("snapshot", "rm", "kr-snap")


def test_a_corrupt_snapshot_is_refused(xfs_cli: CLI, template: str) -> None:
    cli = xfs_cli
    cli("snapshot", "fork", template, "cx")
    cli("snapshot", "create", "cx", "cx-snap")
    d = Path(snap_json(cli, "cx-snap")["dir"])
    with open(d / "state", "r+b") as f:  # one flipped byte in the device state
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    before = names(cli)
    r = cli("snapshot", "fork", "cx-snap", "cy", check=False)
    err = r.stderr.decode()
    assert r.returncode != 0 and "cannot be forked" in err and "state" in err, err
    assert len(err.strip().splitlines()) == 1
    assert names(cli) == before
    r = cli("snapshot", "verify", "cx-snap", check=False)
    assert r.returncode == 1 and b"state        MISMATCH" in r.stdout, r.stdout
    os.truncate(d / "memory", 4096)  # a truncated mem-file: refused by its size alone
    r = cli("restore", "cx", "--snapshot", "cx-snap", check=False)
    assert r.returncode != 0 and b"memory is 4096 bytes" in r.stderr, r.stderr
    assert cli.state("cx") == "standby"  # untouched
    cli("rm", "cx")
    cli("snapshot", "rm", "cx-snap")
