"""Issue 8: guest RAM, disks, snapshots, sockets and logs are the owner's only.

A real guest, run, forked and put in standby by the real CLI under umask 002 (where the
group could reach the QMP and agent sockets: a root shell in the guest). Then:
- every directory under the data dir is 0700 and no file has a group or other bit;
- an unprivileged user (``setpriv --reuid=65534``, with the files' group and without it)
  cannot open them: not through the data dir, and not even when every directory of the
  data dir is opened up (0755), so the files' own modes hold too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, kill_all_vmms, vm_unavailable_reason

pytestmark = [pytest.mark.vm]

# Run as the unprivileged user: try to open each path (connect for a socket), print errnos.
PROBE = """
import json, os, socket, stat, sys
out = {}
for p in sys.argv[1:]:
    try:
        if stat.S_ISSOCK(os.stat(p).st_mode):
            s = socket.socket(socket.AF_UNIX)
            s.connect(p)
            s.close()
        else:
            os.close(os.open(p, os.O_RDONLY))
        out[p] = 0
    except OSError as e:
        out[p] = e.errno
print(json.dumps(out))
"""


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def as_nobody(paths: list[Path], gid: int) -> dict[str, int]:
    """errno of opening each path as uid 65534 with primary group ``gid`` (0: opened)."""
    py = next((p for p in ("/usr/bin/python3", "/bin/python3") if os.access(p, os.X_OK)), None)
    if py is None:
        pytest.skip("no system python3 that another user can run")
    r = subprocess.run(
        ["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", py, "-c", PROBE,
         *map(str, paths)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return {k: int(v) for k, v in json.loads(r.stdout).items()}


def modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in (*dirs, *files):
            p = Path(dirpath, n)
            with contextlib.suppress(FileNotFoundError):
                out[str(p.relative_to(root))] = p.lstat().st_mode
    return out


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every user can traverse (like a home dir), so that only vmfork's own
    modes keep others out (pytest's tmp dirs are 0700 themselves)."""
    base = Path(tempfile.mkdtemp(prefix="vmfork-perm-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        kill_all_vmms(base / "data")
        shutil.rmtree(base, ignore_errors=True)


def test_data_dir_is_private_under_umask_002(open_base: Path) -> None:
    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to try the files as another user")
    cli = CLI(open_base / "data")
    with umask(0o002):
        cli("image", "build")
        cli("run", "priv")
        cli.sh("priv", "echo secret > /run/secret && echo secret > /root/secret && sync")
        cli("fork", "priv", "priv-fork", "--from-running", "--target-state", "standby")
        cli("fork", "priv-fork", "priv-kid", "--target-state", "running")
        d = {n: Path(cli.json("inspect", n)["dir"]) for n in ("priv", "priv-fork", "priv-kid")}  # type: ignore[index]
    root = cli.data_dir
    # what the guests hold: live RAM, disks, snapshot, sockets, logs, metadata, locks
    secrets = [
        d["priv"] / "memory", d["priv"] / "disk.raw", d["priv"] / "run" / "qmp.sock",
        d["priv"] / "run" / "agent.sock", d["priv"] / "logs" / "console.log",
        d["priv"] / "logs" / "vmm.log", d["priv"] / "instance.json", d["priv"] / "run" / "vmm.json",
        d["priv-fork"] / "snapshots" / "snapshot-latest" / "memory",
        d["priv-fork"] / "snapshots" / "snapshot-latest" / "state",
        d["priv-fork"] / "snapshots" / "snapshot-latest" / "config.json",
        d["priv-fork"] / "disk.raw",
        d["priv-kid"] / "memory", d["priv-kid"] / "disk.raw", d["priv-kid"] / "run" / "agent.sock",
    ]
    for p in secrets:
        assert p.exists(), p
    # another user, in the files' group or not, opens none of them ...
    for gid in (0, 65534):
        assert as_nobody(secrets, gid) == {str(p): errno.EACCES for p in secrets}
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    found = modes(root)
    guests_and_locks = {k: m for k, m in found.items() if not k.startswith("images")}
    assert any(k.endswith(".lock") for k in guests_and_locks)
    # a confined VMM's guest dir (and its logs/, run/) is 0710 root:<that VMM's own gid>: only it
    # may pass through (see the README's Security model); every other directory is 0700
    vmm_gid = {p.name: (cli.json("inspect", n).get("confinement") or {}).get("gid")  # type: ignore[union-attr]
               for n, p in d.items()}
    for rel, mode in guests_and_locks.items():
        if stat.S_ISDIR(mode):
            parts = rel.split("/")
            own_gid = vmm_gid.get(parts[1]) if len(parts) >= 2 and parts[0] == "guests" else None
            if stat.S_IMODE(mode) == 0o710 and own_gid and len(parts) <= 3 and parts[2:] in ([], ["logs"], ["run"]):
                assert (root / rel).stat().st_gid == own_gid, f"{rel} is 0710 for another group"
                continue
            assert stat.S_IMODE(mode) == 0o700, f"{rel} is {oct(stat.S_IMODE(mode))}"
        else:
            assert mode & 0o077 == 0, f"{rel} is {oct(stat.S_IMODE(mode))}: others can reach it"
    for rel in ("guests", "images", "locks"):
        assert stat.S_IMODE(found[rel]) == 0o700
    # ... and not even once every directory is opened up: the files' own modes hold
    dirs = [root] + [root / k for k, m in found.items() if stat.S_ISDIR(m)]
    try:
        for p in dirs:
            os.chmod(p, 0o755)
        for gid in (0, 65534):
            assert as_nobody(secrets, gid) == {str(p): errno.EACCES for p in secrets}
    finally:
        for p in dirs:
            os.chmod(p, 0o700)
    assert cli.sh("priv-kid", "cat /run/secret /root/secret").split() == ["secret", "secret"]
    cli("rm", "--force", "priv", "priv-fork", "priv-kid")
