"""Issue 16: a warm pool of pre-started VMMs (``vmfork pool``) wired into fork-to-running.

On a real QEMU and a loop XFS: a fork made from a slot has its own mem-file and disk inodes
(never its source's or the template's), its writes do not reach its source, its memory is
its source's snapshot; source and two pooled forks run side by side with their own
hostnames; a slot made for an older snapshot is never used; ``rm`` of a source drains its
slots; a command killed while it fills or claims is recovered by the next one with nothing
left (no VMM, no slot, no lock, no lease).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_crash_recovery import killed
from tests.integration.test_fork_isolation import _qemu_pids_in, fingerprint

pytestmark = [pytest.mark.vm]

MEM = "128M"
RANDOM_KILLS = int(os.environ.get("VMFORK_TEST_RANDOM_KILLS", "8"))


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path_factory.mktemp("pool"), size_mb=4000) as c:
        c("run", "src", "--memory", MEM)
        c.sh("src", "echo ram > /run/sentinel && echo disk > /root/sentinel && sync")
        c("standby", "src")
        yield c


def _pool(cli: CLI) -> list[dict[str, Any]]:
    return cli.json("pool", "ls")  # type: ignore[return-value]


def _inspect(cli: CLI, name: str) -> dict[str, Any]:
    return cli.json("inspect", name)  # type: ignore[return-value]


def _fork(cli: CLI, src: str, name: str) -> dict[str, Any]:
    d: dict[str, Any] = cli.json("fork", src, name, "--target-state", "running")
    return d


def _clean(cli: CLI) -> None:
    """Nothing left over: no dot dir, no lock of nothing, only recorded VMMs, no lease."""
    rows: list[dict[str, Any]] = cli.json("ps")  # type: ignore[assignment]
    guests = cli.data_dir / "guests"
    assert not [p.name for p in guests.iterdir() if p.name.startswith(".")]
    slots = {r["id"] for r in _pool(cli)}
    ids = {r["id"] for r in rows} | slots
    assert {p.name for p in guests.iterdir()} == ids
    locks = {f.name for f in (cli.data_dir / "locks").iterdir()} - {"global.lock", "watchdog.lock", "network.lock"}
    assert locks <= {f"{i}.lock" for i in ids}, locks
    slot_pids = {r["pid"] for r in _pool(cli)}
    assert _qemu_pids_in(cli.data_dir) == {r["pid"] for r in rows if r["pid"]} | slot_pids
    leases = cli.data_dir / "network" / "leases"
    assert not [f for f in leases.iterdir() if f.name.removesuffix(".json") not in ids] if leases.is_dir() else True


def _files(d: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for f in ("memory", "disk.raw"):
        st = os.stat(d / f)
        out[f] = (st.st_dev, st.st_ino)
    return out


def test_pooled_forks_are_isolated_and_run_beside_their_source(cli: CLI) -> None:
    src = _inspect(cli, "src")
    src_dir = Path(src["dir"])
    snap = src_dir / "snapshots" / "snapshot-latest"
    before = {f: fingerprint(snap / f) for f in ("memory", "state")} | {"disk": fingerprint(src_dir / "disk.raw")}

    cli("pool", "fill", "src", "--size", "2")
    slots = _pool(cli)
    assert [s["state"] for s in slots] == ["ready", "ready"], slots
    assert all(s["pid"] and s["pss_mib"] and s["pss_mib"] > 1 for s in slots), slots
    assert [r["name"] for r in cli.json("ps")] == ["src"]  # type: ignore[union-attr, index]
    human = cli("pool", "ls").stdout.decode()
    assert all(s["id"] in human for s in slots) and human.count("ready") == 2, human
    assert "slot" not in cli("ps").stdout.decode()
    _clean(cli)

    forks = [_fork(cli, "src", n) for n in ("p1", "p2")]
    assert [f["timings"]["clone_method"] for f in forks] == ["pool", "pool"]
    assert {f["id"] for f in forks} == {s["id"] for s in slots}  # the slots became the forks
    assert _pool(cli) == []
    theirs = {snap / "memory", src_dir / "disk.raw", *(src_dir / "templates").iterdir()}
    src_inodes = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in theirs}
    for f in forks:
        mine = _files(Path(f["dir"]))
        assert not set(mine.values()) & src_inodes, (mine, src_inodes)
        assert f["state"] == "running"
        assert cli.sh(f["name"], "cat /run/sentinel /root/sentinel").split() == ["ram", "disk"]
    # a fork's writes (RAM, disk) stay its own
    cli.sh("p1", "echo p1 > /run/sentinel && echo p1 > /root/sentinel && sync")
    assert cli.sh("p2", "cat /run/sentinel /root/sentinel").split() == ["ram", "disk"]
    after = {f: fingerprint(snap / f) for f in ("memory", "state")} | {"disk": fingerprint(src_dir / "disk.raw")}
    assert after == before
    # a pooled fork is an instance like any other: standby, restore, fork of it
    cli("standby", "p1")
    cli("fork", "p1", "p1-child", "--target-state", "running")
    cli("restore", "p1")
    for n in ("p1", "p1-child"):
        assert cli.sh(n, "cat /run/sentinel /root/sentinel").split() == ["p1", "p1"]
    cli("rm", "--force", "p1-child")
    # side by side with the source, each with its own hostname
    cli("restore", "src")
    for n in ("src", "p1", "p2"):
        assert cli.sh(n, "hostname").strip() == n
    assert cli.sh("src", "cat /run/sentinel /root/sentinel").split() == ["ram", "disk"]
    _clean(cli)
    # no slot left: the next fork goes the usual way
    cli("standby", "src")
    assert _fork(cli, "src", "p3")["timings"]["clone_method"] != "pool"
    cli("rm", "--force", "p1", "p2", "p3")
    _clean(cli)


def test_a_slot_made_for_an_older_snapshot_is_never_used(cli: CLI) -> None:
    cli("pool", "fill", "src", "--size", "1")
    assert [s["state"] for s in _pool(cli)] == ["ready"]
    cli("restore", "src")
    cli.sh("src", "echo new > /run/sentinel")
    cli("standby", "src")  # a new snapshot: the slot is stale
    assert [s["state"] for s in _pool(cli)] == ["stale"]
    f = _fork(cli, "src", "s1")
    assert f["timings"]["clone_method"] != "pool"
    assert cli.sh("s1", "cat /run/sentinel").strip() == "new"
    assert _pool(cli) == []
    # fill replaces a stale slot
    cli("pool", "fill", "src", "--size", "1")
    cli("restore", "src")
    cli("standby", "src")
    cli("pool", "fill", "src", "--size", "1")
    assert [s["state"] for s in _pool(cli)] == ["ready"]
    f = _fork(cli, "src", "s2")
    assert f["timings"]["clone_method"] == "pool"
    assert cli.sh("s2", "cat /run/sentinel").strip() == "new"
    cli("rm", "--force", "s1", "s2")
    _clean(cli)


def test_a_kept_pool_is_refilled_after_each_claim(cli: CLI) -> None:
    cli("pool", "fill", "src", "--size", "1", "--keep")
    first = [s["id"] for s in _pool(cli)]
    setting = cli.data_dir / "pool" / f"{_inspect(cli, 'src')['id']}.json"
    assert setting.is_file()
    f = _fork(cli, "src", "r1")
    assert f["timings"]["clone_method"] == "pool" and f["id"] == first[0]
    again = _pool(cli)
    assert [s["state"] for s in again] == ["ready"] and again[0]["id"] != first[0]  # refilled
    assert _fork(cli, "src", "r2")["timings"]["clone_method"] == "pool"
    assert len(_pool(cli)) == 1
    cli("pool", "drain", "src")  # ends it
    assert _pool(cli) == [] and not setting.exists()
    assert _fork(cli, "src", "r3")["timings"]["clone_method"] != "pool"
    assert _pool(cli) == []
    cli("rm", "--force", "r1", "r2", "r3")
    _clean(cli)


def test_vmfork_serve_takes_slots_and_refills_in_the_background(cli: CLI) -> None:
    from tests.integration.test_api import start_server, stop_server

    cli("pool", "fill", "src", "--size", "1", "--keep")
    first = _pool(cli)[0]["id"]
    server = start_server(cli.data_dir)
    try:
        with server.raw() as http:
            r = http.post("/instances/src/fork", json={"name": "api1", "target_state": "running"})
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["timings"]["clone_method"] == "pool" and body["instances"][0]["id"] == first
            deadline = time.monotonic() + 60
            while not [s for s in _pool(cli) if s["state"] == "ready" and s["id"] != first]:
                assert time.monotonic() < deadline, _pool(cli)
                time.sleep(0.2)
    finally:
        assert stop_server(server) == 0
    assert cli.sh("api1", "hostname").strip() == "api1"
    cli("pool", "drain", "src")
    cli("rm", "--force", "api1")
    _clean(cli)


@pytest.mark.parametrize("point", ["pool:slot-renamed", "pool:slot-started"])
def test_a_killed_fill_is_recovered(cli: CLI, point: str) -> None:
    killed(cli, ["pool", "fill", "src", "--size", "1"], point=point)
    _clean(cli)  # the next command removed the unfinished slot and its VMM
    assert _pool(cli) == []


@pytest.mark.parametrize("point", ["pool:metadata-written", "pool:claimed", "pool:loaded", "fork:target-reached"])
def test_a_killed_claim_is_recovered(cli: CLI, point: str) -> None:
    cli("pool", "fill", "src", "--size", "1")
    killed(cli, ["fork", "src", "k1", "--target-state", "running"], point=point)
    _clean(cli)  # the fork is rolled back, its VMM killed
    names = [r["name"] for r in cli.json("ps")]  # type: ignore[union-attr, index]
    assert "k1" not in names
    assert cli.state("src") == "standby"
    assert _pool(cli) == []  # a claim cut short consumes its slot
    cli("pool", "drain", "src")
    assert _pool(cli) == []


def test_a_slot_whose_vmm_died_is_removed(cli: CLI) -> None:
    cli("pool", "fill", "src", "--size", "2")
    dead, alive = _pool(cli)
    os.kill(dead["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{dead['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [s["id"] for s in _pool(cli)] == [alive["id"]]  # the next command recovered
    assert _fork(cli, "src", "d1")["id"] == alive["id"]
    cli("rm", "--force", "d1")
    _clean(cli)


@pytest.mark.parametrize("args", [["pool", "fill", "src", "--size", "1"],
                                  ["fork", "src", "rk", "--target-state", "running"]])
def test_random_kills_leave_nothing(cli: CLI, args: list[str]) -> None:
    """SIGKILL at random moments (between the crashpoints too: a VMM spawned, not recorded)."""
    rng = random.Random(16)
    for _ in range(RANDOM_KILLS):
        if args[0] == "fork":
            cli("pool", "fill", "src", "--size", "1")
        killed(cli, args, after=rng.uniform(0.2, 2.5))
        _clean(cli)
        assert cli.state("src") == "standby"
        if cli("inspect", "rk", check=False).returncode == 0:
            assert cli.state("rk") == "running"
            cli("rm", "--force", "rk")
        cli("pool", "drain", "src")
    _clean(cli)


def test_rm_of_a_source_drains_its_pool(cli: CLI) -> None:
    cli("fork", "src", "src2")
    cli("pool", "fill", "src2", "--size", "2", "--keep")
    assert len(_pool(cli)) == 2
    setting = cli.data_dir / "pool" / f"{_inspect(cli, 'src2')['id']}.json"
    assert setting.is_file()
    cli("rm", "src2")
    assert _pool(cli) == [] and not setting.exists()
    _clean(cli)


def test_bad_input_is_refused_and_leaves_nothing(cli: CLI) -> None:
    for args, said in ((["fill", "nope", "--size", "1"], "instance 'nope' not found"),
                       (["fill", "src", "--size", "99"], "invalid pool size '99'"),
                       (["drain", "nope"], "no pool for 'nope'")):
        r = cli("pool", *args, check=False)
        assert r.returncode != 0 and said in r.stderr.decode(), r.stderr
    cli("restore", "src")
    r = cli("pool", "fill", "src", "--size", "1", check=False)
    assert r.returncode != 0 and "is running" in r.stderr.decode()
    cli("standby", "src")
    _clean(cli)
    assert _pool(cli) == []
