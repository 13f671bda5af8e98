"""Issue 16, second standby: a QEMU standby saves the device state alone and writes back
about what the guest dirtied.

Real guests on a loop XFS, with QEMU 10 confined and QEMU 7.2 unconfined (the set-ups of
``test_shared_ram``). Checked: every standby's snapshot is of type ``devices`` (no RAM in
``state``); the first standby after a cold boot drops the mem-file's page cache (its large
folios), a restored guest's standby does not; after the restore, 1 MiB written by the guest
leaves a few MiB of the mem-file dirty, not the ~13-15 MiB of the boot's large folios; and
the guest's memory survives standby/restore cycles of that kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.integration.test_shared_ram import info, run, sh, xfs  # noqa: F401 - the fixture
from vmfork.bench.probes import cache_stat

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20


def page_cache(path: Path) -> tuple[float, float]:
    """(cached, dirty) MiB of ``path``'s page cache."""
    st = cache_stat(path)
    if st is None:
        pytest.skip("cachestat(2) is not available (Linux < 6.5): the page cache cannot be read")
    return st[0] / MiB, st[1] / MiB


def md5(cli: CLI, name: str, path: str) -> str:
    return sh(cli, name, f"md5sum {path} | cut -d' ' -f1")


def test_standby_saves_devices_and_writes_back_what_the_guest_dirtied(xfs: CLI) -> None:  # noqa: F811
    cli = xfs
    run(cli, "run", "g", "--memory", "256")
    gdir = Path(str(info(cli, "g")["dir"]))
    snap = gdir / "snapshots/snapshot-latest"
    a = sh(cli, "g", "head -c 2097152 /dev/urandom > /dev/shm/a; md5sum /dev/shm/a | cut -d' ' -f1")

    run(cli, "standby", "g")
    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["snapshot_type"] == "devices" and cfg["template"] == ""
    assert (snap / "state").stat().st_size < MiB, "the device state carries RAM"
    cached, _ = page_cache(snap / "memory")
    assert cached < 1, f"the cold boot's page cache of the mem-file was kept ({cached:.1f} MiB)"

    run(cli, "restore", "g")
    assert md5(cli, "g", "/dev/shm/a") == a
    b = sh(cli, "g", "mkdir -p /tmp/d && mount -t tmpfs -o size=5m d /tmp/d && "
                     "head -c 1048576 /dev/urandom > /tmp/d/b && sync && md5sum /tmp/d/b | cut -d' ' -f1")
    _, dirty = page_cache(gdir / "memory")
    assert dirty < 8, f"1 MiB written by the guest left {dirty:.1f} MiB of its mem-file dirty"

    run(cli, "standby", "g")
    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["snapshot_type"] == "devices"
    cached, dirty = page_cache(snap / "memory")
    assert dirty == 0  # durable
    assert cached > 4, f"a restored guest's standby dropped the page cache ({cached:.1f} MiB left)"

    for _ in range(2):  # restored from a device-state snapshot of a restored guest, twice
        run(cli, "restore", "g")
        assert md5(cli, "g", "/dev/shm/a /tmp/d/b") == f"{a}\n{b}"
        run(cli, "standby", "g")
    run(cli, "rm", "--force", "g")
