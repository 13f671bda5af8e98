"""What vmfork creates in a data dir is the owner's only, whatever the caller's umask (the
library path: tests/integration/test_permissions.py covers the CLI with a real guest)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmfork.hypervisor.base import spawn_vmm
from vmfork.layout import GuestDir
from vmfork.locking import file_lock
from vmfork.paths import DataDir


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_created_under_umask_002_are_private(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        dd = DataDir(tmp_path / "data").ensure()
        g = GuestDir(dd.guests / "x")
        g.ensure_dirs()
        with file_lock(dd.locks / "x.lock", what="x"):
            pass
        # a stand-in VMM: a real process that creates a file, as QEMU creates its RAM file
        proc = spawn_vmm(g, ["sh", "-c", ": > memory; umask > run/umask"], "test")
        assert proc.wait_exit(10)
    finally:
        os.umask(old)
    assert (g.run / "umask").read_text().strip() == "0077"
    for d in (dd.root, dd.guests, dd.images, dd.locks, g.path, g.run, g.logs, g.snapshots):
        assert mode(d) == 0o700, d
    for f in (dd.locks / "x.lock", g.vmm_log, g.vmm_json, g.memory):
        assert mode(f) == 0o600, f
