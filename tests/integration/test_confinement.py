"""Issue 9: every VMM confined -- checked on real QEMU processes, from the host's side and
from inside the VMM's own credentials and mount namespace (``nsenter`` + ``setpriv``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI

pytestmark = [pytest.mark.vm]


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("confinement needs vmfork to run as root")
    for tool in ("nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed")


def _inspect(cli: CLI, name: str) -> dict[str, Any]:
    d = cli.json("inspect", name)
    assert isinstance(d, dict)
    return d


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _cgroup_dirs(pid: int) -> dict[str, Path]:
    """controller -> the cgroup dir of ``pid`` (v1 and v2)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":
            out["unified"] = Path("/sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir()
                                  else "/sys/fs/cgroup") / path.lstrip("/")
        for c in ctrls.split(","):
            if c in ("memory", "pids", "cpu"):
                out[c] = Path("/sys/fs/cgroup") / c / path.lstrip("/")
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # pure v2
        v2 = out["unified"]
        out = {"memory": v2, "pids": v2, "cpu": v2}
    return out


def _as_vmm(pid: int, script: str, *, own_ns: bool = True, cgroup_procs: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``sh -c script`` with the VMM's uid/gid, no groups, no_new_privs, and (``own_ns``)
    in its mount and network namespaces; optionally first joined to one of its cgroups."""
    st = _status(pid)
    uid, gid = st["Uid"].split()[0], st["Gid"].split()[0]
    inner = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
             "--inh-caps=-all", "--", "sh", "-c", script]
    argv = (["nsenter", "-t", str(pid), "-m", "-n", "--", *inner] if own_ns else inner)
    if cgroup_procs is not None:
        argv = ["sh", "-c", f'echo $$ > {cgroup_procs} && exec "$@"', "sh", *argv]
    return subprocess.run(argv, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def pair(built: CLI):
    _needs_root()
    built("run", "conf-a", "--memory", "256M")
    built("run", "conf-b", "--memory", "256M")
    yield "conf-a", "conf-b"
    built("rm", "--force", "conf-a", "conf-b", check=False)


def test_vmm_runs_unprivileged_sandboxed_in_own_namespaces_and_cgroup(built: CLI, pair: tuple[str, str]):
    a, b = (_inspect(built, n) for n in pair)
    st = _status(a["pid"])
    uid_a, gid_a = (int(x) for x in (st["Uid"].split()[0], st["Gid"].split()[0]))
    assert set(st["Uid"].split()) == {str(uid_a)} and uid_a != 0
    assert set(st["Gid"].split()) == {str(gid_a)} and gid_a != 0
    assert st["Groups"] == ""
    assert st["CapEff"] == st["CapPrm"] == "0000000000000000"
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # QEMU's -sandbox plus vmfork's madvise filter
    assert b"-sandbox" in Path(f"/proc/{a['pid']}/cmdline").read_bytes().split(b"\0")
    for ns in ("mnt", "net", "ipc"):
        assert os.readlink(f"/proc/{a['pid']}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.readlink(f"/proc/{a['pid']}/ns/mnt") != os.readlink(f"/proc/{b['pid']}/ns/mnt")
    # the recorded pid is QEMU itself, its cwd the guest dir as the host sees it (recovery relies on both)
    assert os.path.basename(os.readlink(f"/proc/{a['pid']}/exe")).startswith("qemu-system")
    assert os.readlink(f"/proc/{a['pid']}/cwd") == str(Path(a["dir"]).resolve())
    # its own uid and cgroup, not b's
    assert _status(b["pid"])["Uid"].split()[0] != str(uid_a)
    assert a["confinement"]["uid"] == uid_a
    cg = _cgroup_dirs(a["pid"])
    assert cg["memory"] != _cgroup_dirs(b["pid"])["memory"]
    limit_file = "memory.max" if (cg["memory"] / "memory.max").exists() else "memory.limit_in_bytes"
    want_mem = (256 + 384) << 20  # guest RAM + the TCG/KVM overhead documented in the README
    if a["accel"] == "kvm":
        want_mem = (256 + 128) << 20
    assert int((cg["memory"] / limit_file).read_text()) == want_mem
    assert int((cg["pids"] / "pids.max").read_text()) == 256
    assert 1 <= int((cg["pids"] / "pids.current").read_text()) <= 256
    usage = a["confinement"]["cgroup"]
    assert usage["memory_limit_bytes"] == want_mem and usage["pids_limit"] == 256
    assert usage["memory_bytes"] > 0 and usage["pids"] >= 1
    # files the VMM opens are its own, 0600; the guest dir is not writable by it
    for f in ("memory", "disk.raw", "logs/console.log"):
        s = (Path(a["dir"]) / f).stat()
        assert (s.st_uid, s.st_gid, s.st_mode & 0o777) == (uid_a, gid_a, 0o600), f
    d = Path(a["dir"]).stat()
    assert (d.st_uid, d.st_gid, d.st_mode & 0o777) == (0, gid_a, 0o710)


def test_vmm_credentials_cannot_open_other_instances_or_host_secrets(built: CLI, pair: tuple[str, str]):
    a, b = (_inspect(built, n) for n in pair)
    own = [Path(a["dir"]) / "memory", Path(a["dir"]) / "disk.raw"]
    other = [Path(b["dir"]) / "memory", Path(b["dir"]) / "disk.raw"]
    probe = " ; ".join(f"if head -c1 {p} >/dev/null; then echo OPENED {p}; else echo DENIED {p}; fi"
                       for p in [*own, *other, Path("/etc/shadow")])
    # inside the VMM's namespaces and credentials: its own files open (the probe works) ...
    r = _as_vmm(a["pid"], probe)
    text = r.stdout.decode()
    for p in own:
        assert f"OPENED {p}" in text, r
    # ... the other instance's files and /etc/shadow do not (they are not even in its view)
    for p in [*other, Path("/etc/shadow")]:
        assert f"DENIED {p}" in text, text
    r = _as_vmm(a["pid"], "ls / ; ls /dev; ls " + str(Path(b["dir"]).parent))
    listing = r.stdout.decode().split()
    assert "etc" not in listing or "shadow" not in r.stdout.decode()
    assert Path(b["dir"]).name not in listing  # no other guest dir in its view
    assert "sda" not in listing and "kmsg" not in listing and "mem" not in listing
    # with the same credentials in the host's namespace, permissions alone keep them out too
    r = _as_vmm(a["pid"], probe, own_ns=False)
    text = r.stdout.decode()
    for p in [*other, Path("/etc/shadow")]:
        assert f"DENIED {p}" in text, text
    # the network namespace holds nothing but a loopback that is down
    r = _as_vmm(a["pid"], "cat /proc/self/net/dev")
    ifaces = [ln.split(":")[0].strip() for ln in r.stdout.decode().splitlines()[2:]]
    assert ifaces == ["lo"], r


def test_fork_gets_its_own_credentials_and_never_touches_the_source(built: CLI):
    _needs_root()
    built("run", "conf-src", "--memory", "256M")
    try:
        src = _inspect(built, "conf-src")
        src_uid = _status(src["pid"])["Uid"].split()[0]
        built("standby", "conf-src")
        snap = Path(src["dir"]) / "snapshots" / "snapshot-latest"
        watched = [snap / "memory", snap / "state", Path(src["dir"]) / "disk.raw", Path(src["dir"])]
        before = {p: (p.stat().st_ino, p.stat().st_uid, p.stat().st_gid, p.stat().st_mode) for p in watched}
        built("fork", "conf-src", "conf-fork", "--target-state", "running")
        fork = _inspect(built, "conf-fork")
        st = _status(fork["pid"])
        fork_uid = int(st["Uid"].split()[0])
        assert str(fork_uid) != src_uid and fork_uid != 0
        assert fork["confinement"]["uid"] == fork_uid != src["confinement"]["uid"]
        for f in ("memory", "disk.raw"):
            s = (Path(fork["dir"]) / f).stat()
            assert (s.st_uid, s.st_gid) == (fork_uid, fork_uid), f
            assert s.st_ino not in {v[0] for v in before.values()}
        assert _cgroup_dirs(fork["pid"])["memory"].name.endswith(fork["id"])
        after = {p: (p.stat().st_ino, p.stat().st_uid, p.stat().st_gid, p.stat().st_mode) for p in watched}
        assert after == before  # not one chown or chmod on the source's files
        # the fork's VMM cannot open its source's snapshot, from its own view or the host's
        for own_ns in (True, False):
            r = _as_vmm(fork["pid"], f"head -c1 {snap / 'memory'} >/dev/null && echo OPENED", own_ns=own_ns)
            assert b"OPENED" not in r.stdout
        built("restore", "conf-src")
        again = _inspect(built, "conf-src")
        assert _status(again["pid"])["Uid"].split()[0] == src_uid  # a source keeps its uid
    finally:
        built("rm", "--force", "conf-src", "conf-fork", check=False)


def test_rm_frees_the_uid_and_the_cgroup_and_recovery_removes_leftovers(built: CLI):
    _needs_root()
    from vmfork.confine import cgroups, ids

    built("run", "conf-rm", "--memory", "128M")
    d = _inspect(built, "conf-rm")
    cg = _cgroup_dirs(d["pid"])["memory"]
    uid = d["confinement"]["uid"]
    assert cg.is_dir() and ids.owner_of(uid) is not None
    built("rm", "--force", "conf-rm")
    assert not cg.exists()
    assert ids.owner_of(uid) is None
    # a cgroup left by a crash (no instance of that id in this data dir) goes at the next command
    h, _ = cgroups.detect()
    assert h is not None
    name = cgroups.group_name(built.data_dir, "zzzzzzzzzzzz")
    paths = h.paths(name)
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    r = built("ps")
    assert b"removed the leftover cgroup" in r.stderr
    assert not any(p.exists() for p in paths.values())


def test_pids_and_cpu_limits(built: CLI):
    _needs_root()
    built("run", "conf-pids", "--memory", "128M", "--pids-limit", "40", "--cpus", "0.5")
    try:
        d = _inspect(built, "conf-pids")
        cg = _cgroup_dirs(d["pid"])
        assert int((cg["pids"] / "pids.max").read_text()) == 40
        if (cg["cpu"] / "cpu.max").exists():
            assert (cg["cpu"] / "cpu.max").read_text().split() == ["50000", "100000"]
        else:
            assert int((cg["cpu"] / "cpu.cfs_quota_us").read_text()) == 50000
            assert int((cg["cpu"] / "cpu.cfs_period_us").read_text()) == 100000
        assert d["confinement"]["cgroup"]["cpus"] == 0.5
        threads_before = int((cg["pids"] / "pids.current").read_text())
        # A guest forking without end: its own kernel stops it (here a pids cgroup inside
        # the guest), the VMM gains no host process from it.
        bomb = ("mkdir -p /sys/fs/cgroup && (grep -q cgroup2 /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup);"
                " echo +pids > /sys/fs/cgroup/cgroup.subtree_control;"
                " mkdir -p /sys/fs/cgroup/bomb && echo 30 > /sys/fs/cgroup/bomb/pids.max;"
                " sh -c 'echo $$ > /sys/fs/cgroup/bomb/cgroup.procs; i=0;"
                " while [ $i -lt 100 ]; do sleep 20 & i=$((i+1)); echo $i > /tmp/n; done' 2>/tmp/bomb.err;"
                " echo started=$(cat /tmp/n); head -c 300 /tmp/bomb.err;"
                " kill $(cat /sys/fs/cgroup/bomb/cgroup.procs) 2>/dev/null; true")
        r = built("exec", "conf-pids", "--", "sh", "-c", bomb, check=False)
        out = r.stdout.decode()
        assert "started=" in out, r
        assert int(out.split("started=")[1].split()[0]) < 100, out  # forks failed inside the guest
        assert "fork" in out.lower(), out
        assert built.sh("conf-pids", "echo alive") == "alive"
        assert int((cg["pids"] / "pids.current").read_text()) <= max(threads_before + 4, 8)
        # Anything in the VMM's cgroup (a compromised VMM) cannot make more than 40 tasks on the host.
        events = cg["pids"] / "pids.events"
        refused_before = int(events.read_text().split()[1])
        r = _as_vmm(d["pid"], "for i in $(seq 60); do sleep 3 & done", cgroup_procs=cg["pids"] / "cgroup.procs")
        assert "fork" in r.stderr.decode().lower(), r
        assert int(events.read_text().split()[1]) > refused_before  # the limit said no
        assert built.sh("conf-pids", "echo still") == "still"
    finally:
        built("rm", "--force", "conf-pids", check=False)


def test_memory_limit_kills_the_vmm_and_is_reported(built: CLI):
    _needs_root()
    built("run", "conf-oom", "--memory", "256M", "--memory-limit", "1G")
    try:
        built("standby", "conf-oom")
        d = _inspect(built, "conf-oom")
        meta = Path(d["dir"]) / "instance.json"
        m = json.loads(meta.read_text())
        # Artificially low: less than QEMU's own (anonymous) memory. The guest's RAM is a file
        # mapping whose pages the cgroup can reclaim (a standby saves the device state alone),
        # so a limit only above QEMU's own needs (24 MiB) thrashes instead of killing.
        m["limits"] = {"memory_limit_mib": 8}
        meta.write_text(json.dumps(m))
        r = built("restore", "conf-oom", check=False)
        msgs = r.stderr.decode()
        if r.returncode == 0:  # it fits while paused and loading; running the guest does not
            for _ in range(5):
                r = built("exec", "conf-oom", "--", "sh", "-c",
                          "dd if=/dev/urandom of=/dev/null bs=1M count=64; ls -R / >/dev/null", check=False)
                msgs += r.stderr.decode()
                if r.returncode != 0 and built.state("conf-oom") != "running":
                    break
        assert "memory limit" in msgs, msgs
        d = _inspect(built, "conf-oom")
        assert d["state"] != "running"
        assert d["last_exit"] and "memory limit" in d["last_exit"]
        assert d["confinement"]["cgroup"]["oom_kills"] >= 1
        rows = built.json("ps")
        assert isinstance(rows, list)
        assert "memory limit" in next(x for x in rows if x["name"] == "conf-oom")["last_exit"]
        assert b"(memory limit)" in built("ps", env={"COLUMNS": "200"}).stdout
    finally:
        built("rm", "--force", "conf-oom", check=False)


def test_bad_limits_are_refused_with_one_line(built: CLI):
    for args, word in ((["--cpus", "0"], "--cpus"), (["--pids-limit", "2"], "--pids-limit"),
                       (["--memory-limit", "1M"], "--memory-limit"), (["--memory-limit", "lots"], "memory limit"),
                       (["--io-weight", "0"], "--io-weight")):
        r = built("run", "conf-bad", *args, check=False)
        assert r.returncode == 2, (args, r)
        assert word in r.stderr.decode() and len(r.stderr.decode().strip().splitlines()) == 1
    assert "conf-bad" not in built("ps").stdout.decode()


def test_vmm_starts_with_the_data_dir_under_the_cwd(built: CLI) -> None:
    """QEMU named by a bare name on PATH: its dir used to be resolved against the cwd and bound
    into the VMM's root after the image dir, hiding it when the data dir lay under the cwd
    (``rootfs.ext4: Permission denied``)."""
    _needs_root()
    cmd = [sys.executable, "-m", "vmfork.cli", "--data-dir", str(built.data_dir), "-q"]
    r = subprocess.run([*cmd, "run", "cwd1", "--json"], cwd=built.data_dir.parent, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    try:
        assert json.loads(r.stdout)["state"] == "running"
        assert _inspect(built, "cwd1")["state"] == "running"
    finally:
        built("rm", "-f", "cwd1")


def test_vmm_named_through_a_symlinked_dir(built: CLI, tmp_path: Path) -> None:
    """QEMU given by a path with a symlink on the way (a worktree's ``.tools`` linked to the
    main checkout's): only the real dir used to be bound into the VMM's root, so exec of the
    given path failed there ("setsid: failed to execute ...: No such file")."""
    _needs_root()
    from vmfork.hypervisor import qemu_bin

    real = shutil.which(qemu_bin.default_binary())
    assert real
    link = tmp_path / "qemu-link"
    link.symlink_to(os.path.dirname(os.path.realpath(real)))
    given = link / os.path.basename(real)
    r = built("run", "symq1", "--json", check=False, env={qemu_bin.ENV_BINARY: str(given)})
    try:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        info = _inspect(built, "symq1")
        assert info["state"] == "running" and info["confinement"]["confined"]
        assert built.sh("symq1", "echo up") == "up"
    finally:
        built("rm", "-f", "symq1")
