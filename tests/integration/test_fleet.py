"""A fleet of three vmfork hosts on a real Ray cluster (issue 15).

One module-scoped ``ray.cluster_utils.Cluster`` of three nodes on loopback; each node is a
host with its own data dir on its own loop filesystem (a: XFS, b: XFS, c: ext4) and the
custom resource ``vmfork_host_<host>`` that pins its agent there. Guests are tiny (128 MiB)
and few. The tests run in order: replication, a host dying mid-fork, its return.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmfork
from tests.conftest import CLI, kill_all_vmms, vm_unavailable_reason
from tests.fsutil import loop_fs, loop_fs_unavailable_reason

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(1500)]

SENTINEL = "echo fleet-ram > /run/s; echo fleet-disk > /root/s; sync"
READ = "cat /run/s /root/s"
HOSTS = {"a": "xfs", "b": "xfs", "c": "ext4"}
OBJECT_STORE = 100 << 20


def node_args(host: str) -> dict[str, Any]:
    # num_cpus 0: the agents need none (they are num_cpus=0 actors), and Ray prestarts no idle
    # worker per CPU (a Python process each: too much for 2 loaded cores).
    return {"node_ip_address": "127.0.0.1", "num_cpus": 0, "object_store_memory": OBJECT_STORE,
            "resources": {f"vmfork_host_{host}": 1}}


def started(start: Any) -> Any:
    """``start()`` (a Ray node), tried again when its raylet misses Ray's fixed 30 s to register
    (it does under the load of parallel TCG guests on 2 cores)."""
    for attempt in range(5):
        try:
            return start()
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 4:
                raise
            print(f"[fleet] a Ray node missed its startup window, trying again: {e}")
    raise AssertionError("unreachable")


class Env:
    def __init__(self, cluster: Any, nodes: dict[str, Any], dirs: dict[str, Path], fleet: Any) -> None:
        self.cluster, self.nodes, self.dirs, self.fleet = cluster, nodes, dirs, fleet
        self.address: str = cluster.address
        self.state: dict[str, Any] = {}

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        return CLI(self.dirs["a"])("fleet", "--address", self.address, *args, check=check, timeout=timeout)

    def ps(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in self.fleet.ps()}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    for kind in set(HOSTS.values()):
        reason = loop_fs_unavailable_reason(kind)
        if reason:
            pytest.skip(f"{kind} loop filesystem unavailable: {reason}")
    # Read by Ray at import: without it the driver dials the machine's interface address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray  # noqa: F401
        from ray.cluster_utils import Cluster
    except ImportError as e:
        pytest.skip(f"ray is not installed ({e}): pip install 'vmfork[fleet]'")
    src = str(Path(vmfork.__file__).parent.parent)  # Ray's workers import this vmfork
    os.environ["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    # Three Ray nodes and their guests share 2 cores with other tests: give boots and
    # restores more time than the defaults (the agents inherit this environment).
    os.environ.setdefault("VMFORK_BOOT_TIMEOUT", "300")
    os.environ.setdefault("VMFORK_RESTORE_TIMEOUT", "180")
    base = tmp_path_factory.mktemp("fleet")
    with contextlib.ExitStack() as stack:
        dirs = {h: stack.enter_context(loop_fs(kind, 6000, base)) / "data" for h, kind in HOSTS.items()}
        for d in dirs.values():
            stack.callback(kill_all_vmms, d)
        CLI(dirs["a"])("image", "build")
        cluster = Cluster()
        stack.callback(cluster.shutdown)
        started(lambda: cluster.add_node(**node_args("a"), include_dashboard=False))
        nodes = {"a": cluster.head_node, "b": started(lambda: cluster.add_node(**node_args("b"))),
                 "c": started(lambda: cluster.add_node(**node_args("c")))}
        from vmfork.fleet import Fleet

        fleet = Fleet(cluster.address)
        stack.callback(fleet.close)
        for h in HOSTS:
            fleet.join(h, dirs[h])
        yield Env(cluster, nodes, dirs, fleet)


def sh(env: Env, name: str, script: str) -> str:
    r = env.fleet.exec(name, ["sh", "-c", script])
    assert r["exit_code"] == 0, r
    return str(r["stdout"].decode().strip())


def snapshot_digests(env: Env, snap: str) -> dict[str, dict[str, str]]:
    out = {}
    for s in env.fleet.states():
        for x in (s.report or {}).get("snapshots", []):
            if x["name"] == snap:
                out[s.name] = x["digests"]
    return out


def test_replication_places_two_forks_per_host(env: Env, report: list[str]) -> None:
    """A snapshot on host a only; 6 forks with at most 2 instances per host: it is streamed
    to b and c (identical digests there) and every fork sees its sentinels."""
    a = CLI(env.dirs["a"])
    a("run", "base-src", "--memory", "128M")
    a("exec", "base-src", "--", "sh", "-c", SENTINEL)
    a("snapshot", "create", "base-src", "base")
    a("rm", "--force", "base-src")
    assert set(snapshot_digests(env, "base")) == {"a"}

    r = env.cli("fork", "base", "f", "--count", "6", "--per-host", "2", "--json")
    import json

    res = json.loads(r.stdout)
    assert res["failed"] == {}, res["failed"]
    assert Counter(f["host"] for f in res["forks"]) == {"a": 2, "b": 2, "c": 2}
    assert sorted((x["source"], x["target"]) for x in res["replicated"]) == [("a", "b"), ("a", "c")]
    assert all(not x.get("error") for x in res["replicated"])
    digests = snapshot_digests(env, "base")
    assert set(digests) == {"a", "b", "c"}
    assert digests["a"] == digests["b"] == digests["c"]
    for f in res["forks"]:
        assert f["state"] == "running"
        assert sh(env, f["name"], READ) == "fleet-ram\nfleet-disk", f["name"]
    ps = env.ps()
    assert {n: ps[n]["host"] for n in ps} == {f["name"]: f["host"] for f in res["forks"]}
    for x in res["replicated"]:
        report.append(f"fleet: replicated 128 MiB snapshot {x['source']} -> {x['target']}: "
                      f"{int(x['bytes']) >> 20} MiB on the wire in {x['seconds']:.2f}s")
    report.append(f"fleet: fork --count 6 over 3 hosts (2 replications): {res['timings']}")
    env.state["forks"] = {f["name"]: f["host"] for f in res["forks"]}


def _snapshot_of_files(data_dir: Path, image_digest: str) -> str:
    """A named snapshot committed from files made here (real store, real digests and
    manifest; its content is not a guest's): what a stream test needs, in seconds."""
    from vmfork.instances import integrity
    from vmfork.snapshots.store import Snapshot, Store

    st = Store(data_dir / "snapshots", data_dir / "locks").ensure()
    sid = st.new_id()
    with st.building(sid) as tmp:
        with open(tmp / "memory", "wb") as f:
            f.truncate(64 << 20)
            f.seek(1 << 20)
            f.write(os.urandom(24 << 20))
        (tmp / "state").write_bytes(os.urandom(100_000))
        (tmp / "config.json").write_text("{}")
        with open(tmp / "disk.raw", "wb") as f:
            f.truncate(64 << 20)
            f.write(os.urandom(1 << 20))
        integrity.write_manifest(tmp, 64 << 20)
        st.commit(tmp, Snapshot(id=sid, name="cut", created_at="x", source_id="s", source_name="s",
                                hypervisor="qemu", memory_mib=64, vcpus=1, accel="tcg", image_digest=image_digest))
    return sid


def test_cut_stream_leaves_no_partial_snapshot(env: Env, tmp_path: Path) -> None:
    """A stream cut mid-way (after 3 chunks) leaves no snapshot and no temp dir on the target;
    an export its reader closed ends and lets go of the snapshot; the stream whole arrives
    with the source's digests. Real export and import (tar, zstd, digests) between two host
    agents in this process; only the transport is left out."""
    from vmfork.errors import WrongState
    from vmfork.fleet.agent import local_agent
    from vmfork.images import list_images
    from vmfork.locking import try_lock

    image = list_images(env.dirs["a"] / "images")[0]
    src_dir = tmp_path / "src"
    target = tmp_path / "target"
    with local_agent("src", src_dir) as src, local_agent("dst", target) as dst:
        sid = _snapshot_of_files(src_dir, image.digest)
        subprocess.run(["cp", "-a", str(image.dir), str(src_dir / "images")], check=True)
        expect = {"name": "cut", "digests": next(x["digests"] for x in src.report()["snapshots"])}
        stream = src.export_open("cut", True)
        chunks = [0]

        def fetch() -> bytes:
            chunks[0] += 1
            if chunks[0] == 4:
                raise ConnectionResetError("the source host went away")
            return src.export_read(stream)

        with pytest.raises(WrongState, match=r"broke after \d+ MiB: ConnectionResetError: .*nothing was kept"):
            dst.import_stream(fetch, "t1", expect)
        src.export_close(stream)
        assert dst.report()["snapshots"] == [] and dst.leftovers() == []
        assert [p.name for p in (target / "snapshots").iterdir()] == []
        lock = src_dir / "locks" / f"snap-{sid}.lock"
        for _ in range(240):  # the closed export runs to its end unread, then unlocks
            fd = try_lock(lock)
            if fd is not None:
                os.close(fd)
                break
            time.sleep(0.5)
        else:
            raise AssertionError("a closed export still holds its snapshot's lock after 120 s")
        stream = src.export_open("cut", True)
        got = dst.import_stream(lambda: src.export_read(stream), "t2", expect)
        assert got["digests"] == expect["digests"]
        assert [x["name"] for x in dst.report()["snapshots"]] == ["cut"]


def test_host_dies_mid_fork(env: Env) -> None:
    """Kill host b's node while forks are in flight: the forks placed on b are named as
    failed, the others run; 'fleet ps' reports b's instances as lost."""
    killed: list[str] = []

    def progress(msg: str) -> None:
        if msg.startswith("forking:") and not killed:
            env.cluster.remove_node(env.nodes["b"])
            killed.append(msg)

    env.fleet.progress = progress
    try:
        res = env.fleet.fork("base", "g", count=3, per_host=3)
    finally:
        env.fleet.progress = lambda _m: None
    assert killed
    assert res.plan == {"a": ["g-1"], "b": ["g-2"], "c": ["g-3"]}
    assert set(res.failed) == {"g-2"} and "'b'" in res.failed["g-2"], res.failed
    assert sorted((f["name"], f["host"]) for f in res.forks) == [("g-1", "a"), ("g-3", "c")]
    for n in ("g-1", "g-3"):
        assert sh(env, n, READ) == "fleet-ram\nfleet-disk"
    import json

    rows = {r["name"]: r for r in json.loads(env.cli("ps", "--json").stdout)}
    on_b = sorted(n for n, h in env.state["forks"].items() if h == "b")
    assert len(on_b) == 2
    for n in on_b:
        assert rows[n]["state"] == "lost" and rows[n]["host"] == "b", rows[n]
    for n, h in env.state["forks"].items():
        if h != "b":
            assert rows[n]["state"] == "running", rows[n]
    hosts = {h["host"]: h for h in json.loads(env.cli("hosts", "--json").stdout)}
    assert not hosts["b"]["up"] and hosts["a"]["up"] and hosts["c"]["up"]
    with pytest.raises(Exception, match="down"):
        env.fleet.exec(on_b[0], ["true"])


def test_host_returns_and_reconciles(env: Env, report: list[str]) -> None:
    """Start b's node again: its agent comes back on the same data dir and its surviving
    instances reappear in 'fleet ps' (no longer lost)."""
    on_b = sorted(n for n, h in env.state["forks"].items() if h == "b")
    env.nodes["b"] = started(lambda: env.cluster.add_node(**node_args("b")))
    deadline = time.monotonic() + 180
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        rows = env.ps()
        if all(rows.get(n, {}).get("state") not in (None, "lost") for n in on_b):
            break
        time.sleep(2)
    for n in on_b:
        assert rows[n]["host"] == "b" and rows[n]["state"] != "lost", rows.get(n)
    report.append("fleet: after b returned, its forks are " + ", ".join(f"{n} {rows[n]['state']}" for n in on_b)
                  + ("; the fork cut mid-way on b: " + (rows["g-2"]["state"] if "g-2" in rows else "rolled back")))
    for n in on_b:
        if rows[n]["state"] == "running":
            assert sh(env, n, READ) == "fleet-ram\nfleet-disk"
    assert "b" in {h["host"] for h in env.fleet.hosts() if h["up"]}


def test_figures_replication_and_placement(env: Env, report: list[str], tmp_path: Path) -> None:
    """Figures (printed, not asserted on time): streaming a 256 MiB snapshot to another host
    vs ``cp`` of its files to that host's filesystem; fleet fork vs local fork (to standby)."""
    a = CLI(env.dirs["a"])
    a("run", "big-src", "--memory", "256M")
    a("exec", "big-src", "--", "sh", "-c", "head -c 160M /dev/urandom > /run/fill; " + SENTINEL)
    a("snapshot", "create", "big-src", "big")
    a("rm", "--force", "big-src")
    snap = next(x for x in env.fleet.states()[0].report["snapshots"] if x["name"] == "big")  # type: ignore[index]
    r = env.fleet.replicate("big", 2)
    assert r["failed"] == {} and len(r["copies"]) == 1
    copy = r["copies"][0]
    assert copy["digests"] == snap["digests"]
    target_dir = env.dirs[copy["target"]].parent / "cp-big"
    src_dir = env.dirs["a"] / "snapshots" / snap["id"]
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", "--sparse=always", str(src_dir), str(target_dir)], check=True)
    subprocess.run(["sync", "-f", str(target_dir)], check=True)
    cp_s = time.monotonic() - t0
    report.append(f"fleet: 256 MiB snapshot ({int(snap['bytes']) >> 20} MiB of files, 160 MiB of random RAM) "
                  f"a -> {copy['target']}: {copy['seconds']:.2f}s streamed ({int(copy['bytes']) >> 20} MiB on the "
                  f"wire, digests checked), cp of its files to that filesystem {cp_s:.2f}s")

    from vmfork.instances import Manager
    from vmfork.instances.snapshot_ops import fork_snapshot

    t0 = time.monotonic()
    res = env.fleet.fork("base", "lat-fleet", count=1, per_host=10, target_state="standby")
    fleet_s = time.monotonic() - t0
    assert res.failed == {}
    host = res.forks[0]["host"]
    t0 = time.monotonic()
    fork_snapshot(Manager(env.dirs[host]), "base", "lat-local", target_state="standby")
    local_s = time.monotonic() - t0
    report.append(f"fleet: fork to standby via the fleet {fleet_s * 1000:.0f} ms "
                  f"(asking 3 hosts {res.timings['plan_s'] * 1000:.0f} ms, the fork on {host} "
                  f"{res.timings['fork_s'] * 1000:.0f} ms) vs the same fork on that host in-process "
                  f"{local_s * 1000:.0f} ms")
