"""Issue 16: forks run from one shared, read-only template mem-file (``hypervisor.shared_ram``).

Real QEMU guests on a loop XFS with reflink, in two set-ups:
- ``qemu10-confined``: QEMU 10 (``.tools/qemu``, ``make setup``), VMMs confined (the default
  as root): the template is opened ``readonly=on,rom=off`` and bound read-only into the VMM's
  root, its own uid cannot write it;
- ``qemu7-unconfined``: Debian's QEMU 7.2 (``qemu-system-x86_64`` on PATH), VMMs unconfined
  (7.2 opens the template read-write even to map it private; confined, its forks keep their
  own clones).
Checked: the forks map the template private and share its pages; no write of a fork
reaches it; the source restored and written while its forks run changes nothing in them;
a fork's standby writes its own pages into its own file (never the template's inode) and
its restore sees its source's state and its own writes. And a fork of a named snapshot maps
the snapshot's mem-file, which its writes leave intact (``snapshot verify``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_fork_isolation import fingerprint

pytestmark = [pytest.mark.vm, pytest.mark.slow]

BLOB = "/dev/shm/blob"


def _setup_env(setup: str) -> dict[str, str]:
    """The environment of one set-up, or skip (reason printed) where it cannot run here."""
    from vmfork.hypervisor import qemu_bin

    if setup == "qemu10-confined":
        if os.geteuid() != 0:
            pytest.skip("confinement needs vmfork to run as root")
        b = qemu_bin.tools_binary()
        if b is None:
            pytest.skip(f"QEMU 10 is not installed in {qemu_bin.TOOLS_QEMU} (make setup fetches it)")
        assert qemu_bin.readonly_ram(b), qemu_bin.version(b)
        return {"VMFORK_CONFINE": "1", "VMFORK_QEMU_BIN": b}
    b7 = shutil.which(qemu_bin.BINARY)
    if b7 is None:
        pytest.skip("qemu-system-x86_64 is not on PATH")
    return {"VMFORK_CONFINE": "0", "VMFORK_QEMU_BIN": b7}


ENV: dict[str, str] = {}


@pytest.fixture(params=["qemu10-confined", "qemu7-unconfined"])
def xfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CLI]:
    env = _setup_env(request.param)
    ENV.clear()
    ENV.update(env)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # data_dir_on builds the image with it too
    try:
        with data_dir_on("xfs", tmp_path) as cli:
            yield cli
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(cli: CLI, *args: str) -> str:
    return cli(*args, env=ENV).stdout.decode().strip()


def as_vmm(pid: int, script: str) -> str:
    """``sh -c script`` with the VMM's uid/gid, in its mount namespace (what it can see)."""
    uid = gid = ""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = line.split()[1]
        elif line.startswith("Gid:"):
            gid = line.split()[1]
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", "setpriv", f"--reuid={uid}", f"--regid={gid}",
                        "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--", "sh", "-c", script],
                       capture_output=True, timeout=60)
    return r.stdout.decode() + r.stderr.decode()


def check_confined_view(pid: int, template: Path) -> None:
    """A confined fork's VMM runs under its own uid, opened the template read-only, sees it
    read-only (bound) and can read but not write it."""
    if ENV.get("VMFORK_CONFINE") != "1":
        return
    assert Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0] != "0"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(f"mem-path={template},share=off,readonly=on,rom=off".encode() in a for a in argv), argv
    assert as_vmm(pid, f"head -c 4096 {template} | wc -c").strip() == "4096"
    out = as_vmm(pid, f"echo x >> {template} && echo WROTE")
    assert "WROTE" not in out and ("Permission denied" in out or "Read-only" in out), out
    out = as_vmm(pid, f"ls -A {template.parent}")
    assert out.split() == [template.name], out  # only its template in view, nothing else of its source


def sh(cli: CLI, name: str, script: str) -> str:
    return run(cli, "exec", name, "--", "sh", "-c", script)


def info(cli: CLI, name: str) -> dict[str, object]:
    d = json.loads(run(cli, "inspect", name, "--json"))
    assert isinstance(d, dict)
    return d


def template_mapping(pid: int) -> tuple[Path, int, int] | None:
    """(template path, Rss kB, Pss kB) of the VMM's private mapping of a template."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        f = line.split(maxsplit=5)
        if len(f) == 6 and ("/templates/" in f[5] or "/snapshots/" in f[5]) and f[1] == "rw-p":
            fields = {x.split(":")[0]: x.split()[1] for x in lines[i + 1:i + 24] if ":" in x and x.split()[-1] == "kB"}
            return Path(f[5].removesuffix(" (deleted)")), int(fields["Rss"]), int(fields["Pss"])
    return None


def test_forks_share_the_template_and_never_write_it(xfs: CLI) -> None:
    cli = xfs
    run(cli, "run", "src", "--memory", "256")
    blob_md5 = sh(cli, "src", f"head -c 33554432 /dev/urandom > {BLOB}; md5sum {BLOB} | cut -d' ' -f1")
    run(cli, "standby", "src")
    for name in ("a", "b"):
        run(cli, "fork", "src", name)
        run(cli, "restore", name)
        assert sh(cli, name, f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5  # warmed: reads its source's state

    maps = {n: template_mapping(int(str(info(cli, n)["pid"]))) for n in ("a", "b")}
    assert maps["a"] is not None and maps["b"] is not None, f"forks do not map a template: {maps}"
    template = maps["a"][0]
    assert maps["b"][0] == template
    src_mem = Path(str(info(cli, "src")["dir"])) / "snapshots/snapshot-latest/memory"
    assert template.stat().st_ino != src_mem.stat().st_ino
    _, rss, pss = maps["b"]
    assert pss < rss * 0.75, f"the template's pages are not shared: Rss {rss} kB, Pss {pss} kB"
    check_confined_view(int(str(info(cli, "b")["pid"])), template)
    before = fingerprint(template)

    mine_md5 = sh(cli, "a", "head -c 16777216 /dev/urandom > /dev/shm/mine; md5sum /dev/shm/mine | cut -d' ' -f1")
    # The source resumes over its own snapshot and rewrites its state while its forks run.
    run(cli, "restore", "src")
    new_md5 = sh(cli, "src", f"head -c 33554432 /dev/urandom > {BLOB}; md5sum {BLOB} | cut -d' ' -f1")
    assert new_md5 != blob_md5
    for name in ("a", "b"):
        assert sh(cli, name, f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5, f"{name} saw its source's later writes"
    assert sh(cli, "b", "cat /dev/shm/mine 2>/dev/null | wc -c") == "0"  # a's writes are a's own
    assert fingerprint(template) == before

    # Standby of a fork: its own pages into its own clone, never the template.
    run(cli, "standby", "a")
    snap = Path(str(info(cli, "a")["dir"])) / "snapshots/snapshot-latest"
    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["snapshot_type"] == "devices" and cfg["template"] == ""
    own = (snap / "memory").stat()
    assert (own.st_dev, own.st_ino) != (template.stat().st_dev, template.stat().st_ino)
    assert fingerprint(template) == before
    for _ in range(2):  # restored from the device-state snapshot, and again from the next one
        run(cli, "restore", "a")
        assert sh(cli, "a", f"md5sum {BLOB} /dev/shm/mine | cut -d' ' -f1") == f"{blob_md5}\n{mine_md5}"
        run(cli, "standby", "a")
    assert fingerprint(template) == before
    assert sh(cli, "b", f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5


def test_forks_of_a_named_snapshot_map_it_and_never_write_it(xfs: CLI) -> None:
    cli = xfs
    run(cli, "run", "src", "--memory", "256")
    blob_md5 = sh(cli, "src", f"head -c 16777216 /dev/urandom > {BLOB}; md5sum {BLOB} | cut -d' ' -f1")
    run(cli, "snapshot", "create", "src", "snap")
    run(cli, "rm", "--force", "src")
    run(cli, "snapshot", "fork", "snap", "f", "--count", "2", "--target-state", "running")
    snap_mem = Path(str(json.loads(run(cli, "snapshot", "inspect", "snap", "--json"))["dir"])) / "memory"
    before = fingerprint(snap_mem)
    for name in ("f-1", "f-2"):
        pid = int(str(info(cli, name)["pid"]))
        m = template_mapping(pid)
        assert m is not None and m[0] == snap_mem, m
        check_confined_view(pid, snap_mem)
        assert sh(cli, name, f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5
        sh(cli, name, f"head -c 8388608 /dev/urandom > {BLOB}; sync")  # each rewrites the state
    run(cli, "standby", "f-1")
    own = (Path(str(info(cli, "f-1")["dir"])) / "snapshots/snapshot-latest/memory").stat()
    assert (own.st_dev, own.st_ino) != (snap_mem.stat().st_dev, snap_mem.stat().st_ino)
    assert fingerprint(snap_mem) == before
    run(cli, "snapshot", "verify", "snap")  # every digest of the snapshot still matches
    run(cli, "restore", "f-1")
    assert sh(cli, "f-1", f"md5sum {BLOB} | cut -d' ' -f1") != blob_md5  # its own write, kept
