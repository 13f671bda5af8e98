"""Admission control's arithmetic on real files and filesystems, and the watchdog process
without a VM (a real process stands in for the VMM; no QMP is needed for what is tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork import retry
from vmfork.errors import NoSpace
from vmfork.fs import free_bytes
from vmfork.procs import ProcRef
from vmfork.space import watchdog
from vmfork.space.admission import Claim, check, ram_claim
from vmfork.space.watermarks import high_water, low_water

MiB = 1 << 20


def test_claim_of_fresh_ram_is_all_of_it(tmp_path: Path) -> None:
    assert ram_claim("a", 256 * MiB, None).claim_bytes == 256 * MiB
    assert ram_claim("a", 256 * MiB, tmp_path / "no-memory-yet").claim_bytes == 256 * MiB


def test_claim_subtracts_the_blocks_the_file_owns(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    with open(mem, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(10 * MiB))  # 10 MiB written at the start, the rest a hole
    c = ram_claim("a", 64 * MiB, mem)
    assert c.claim_bytes == 54 * MiB


def test_claim_of_a_reflinked_clone_is_all_of_it(tmp_path: Path) -> None:
    """Shared extents are claimable: writing them copies. Both files of a clone claim all."""
    from tests.fsutil import loop_fs, loop_fs_unavailable_reason

    reason = loop_fs_unavailable_reason("xfs")
    if reason:
        pytest.skip(reason)
    from vmfork.forkvm import clone_file

    with loop_fs("xfs", 300, tmp_path) as mnt:
        src = mnt / "memory"
        with open(src, "wb") as f:
            f.truncate(64 * MiB)
            f.write(os.urandom(10 * MiB))
            os.fsync(f.fileno())
        assert ram_claim("src", 64 * MiB, src).claim_bytes == 54 * MiB
        clone_file(src, mnt / "fork-memory")
        assert ram_claim("fork", 64 * MiB, mnt / "fork-memory").claim_bytes == 64 * MiB
        assert ram_claim("src", 64 * MiB, src).claim_bytes == 64 * MiB


def test_check_refuses_naming_free_space_and_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORK_SPACE_LOW_WATER", "64M")
    free = free_bytes(tmp_path)
    huge = Claim("big", free, free)
    with pytest.raises(NoSpace) as e:
        check("'big'", [huge], [], tmp_path)
    msg = str(e.value)
    assert msg.startswith("not enough space for 'big': ") and "guest RAM" in msg and "--overcommit" in msg
    assert "\n" not in msg
    check("'big'", [huge], [], tmp_path, overcommit=True)  # the escape hatch
    small = Claim("small", 64 * MiB, 64 * MiB)
    check("'small'", [small], [], tmp_path)
    # other running guests count: enough for this one alone, not with them
    others = [Claim("r1", 2 * free, free - 96 * MiB)]
    with pytest.raises(NoSpace, match="1 running guest on this filesystem can claim"):
        check("'small'", [small], others, tmp_path)


def test_watermarks_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFORK_SPACE_LOW_WATER", raising=False)
    monkeypatch.delenv("VMFORK_SPACE_HIGH_WATER", raising=False)
    assert (low_water(), high_water()) == (64 * MiB, 128 * MiB)
    monkeypatch.setenv("VMFORK_SPACE_LOW_WATER", "100M")
    assert (low_water(), high_water()) == (100 * MiB, 200 * MiB)
    monkeypatch.setenv("VMFORK_SPACE_HIGH_WATER", "1G")
    assert high_water() == 1 << 30
    monkeypatch.setenv("VMFORK_SPACE_LOW_WATER", "lots")
    with pytest.raises(Exception, match="invalid VMFORK_SPACE_LOW_WATER"):
        low_water()


def test_tick_shrinks_near_the_mark() -> None:
    w = watchdog.Watchdog(Path("/nonexistent"))
    far, near = w.interval(w.low + (4 << 30)), w.interval(w.low + 5 * MiB)
    assert far == watchdog.MAX_TICK
    assert near == watchdog.MIN_TICK
    assert watchdog.MIN_TICK < w.interval(w.low + 300 * MiB) < watchdog.MAX_TICK


# --- the watchdog process ---------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "data"
    for d in ("guests", "locks", "images"):
        (root / d).mkdir(parents=True)
    yield root
    if watchdog.running(root) is not None:  # no watchdog may outlive its test
        pytest.fail("a watchdog is still running")


def fake_vmm(root: Path, name: str) -> subprocess.Popen[bytes]:
    """A real process recorded as a guest's VMM (run/vmm.json), with a console log."""
    g = root / "guests" / name
    (g / "run").mkdir(parents=True)
    (g / "logs").mkdir()
    p = subprocess.Popen(["sleep", "60"])
    ref = ProcRef.of(p.pid)
    (g / "run" / "vmm.json").write_text(json.dumps({"pid": ref.pid, "start": ref.start, "hypervisor": "qemu"}))
    (g / "instance.json").write_text(json.dumps({"name": name}))
    return p


def test_one_watchdog_per_data_dir_gone_with_the_last_vmm(data_dir: Path) -> None:
    vmm = fake_vmm(data_dir, "g1")
    try:
        assert watchdog.ensure(data_dir)
        assert any(watchdog.running(data_dir) is not None for _ in retry.attempts(10))
        assert not watchdog.ensure(data_dir)  # one is enough
        # it caps console logs: 3 MiB written at once is cut to the newest 512 KiB
        console = data_dir / "guests" / "g1" / "logs" / "console.log"
        console.write_bytes(b"old\n" * (512 << 10) + b"newest\n")
        assert any(console.stat().st_size <= 1 << 20 for _ in retry.attempts(10, cap=0.2))
        assert console.read_bytes().endswith(b"newest\n")
    finally:
        vmm.kill()
        vmm.wait()
    assert any(watchdog.running(data_dir) is None for _ in retry.attempts(10, cap=0.2))
    log = (data_dir / watchdog.LOG).read_text()
    assert "started" in log and "cut the oldest" in log and "exiting" in log


def test_watchdog_without_vmm_exits_at_once(data_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vmfork.space.watchdog", str(data_dir)], timeout=30)
    assert r.returncode == 0
    assert "exiting" in (data_dir / watchdog.LOG).read_text()


def test_switched_off_for_tests(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORK_WATCHDOG", "0")
    assert not watchdog.ensure(data_dir)
