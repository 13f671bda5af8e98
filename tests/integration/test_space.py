"""Issue 8, item 2: a full filesystem must not silently kill running guests.

Real guests on a 1 GiB loop XFS: admission control refuses what the filesystem cannot
hold; the watchdog pauses a guest that fills its RAM (writing into its tmpfs /run grows its
RAM file) before ENOSPC can kill it, and resumes it when space is freed; a guest that does
die of it (watchdog pausing off, --overcommit) is named so; ``run`` on a full filesystem
says "no space". Plus the console log cap, with a guest that floods its console.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on, kill_all_vmms
from vmfork import retry
from vmfork.logfile import CONSOLE_LOG_MAX
from vmfork.space.admission import ram_claim

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
LOW_WATER = 64 * MiB  # the default


@pytest.fixture
def xfs1g(tmp_path: Path) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path, size_mb=1024) as cli:
        try:
            yield cli
        finally:
            kill_all_vmms(cli.data_dir)
            for f in cli.data_dir.parent.glob("filler*"):
                f.unlink()


def free(cli: CLI) -> int:
    st = os.statvfs(cli.data_dir)
    return st.f_bavail * st.f_frsize


def fill_to(cli: CLI, left: int, name: str = "filler") -> Path:
    """Allocate a host file so that ``left`` bytes stay free on the data dir's filesystem."""
    path = cli.data_dir.parent / name
    with open(path, "ab") as f:
        os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, max(free(cli) - left, 4096))
    return path


def guests(cli: CLI) -> list[str]:
    return sorted(p.name for p in (cli.data_dir / "guests").iterdir())


def inspect(cli: CLI, name: str) -> dict[str, object]:
    d = cli.json("inspect", name)
    assert isinstance(d, dict)
    return d


def refused(r: subprocess.CompletedProcess[bytes]) -> str:
    err = r.stderr.decode()
    assert r.returncode == 7, (r.returncode, err)
    assert err.startswith("vmfork: error: not enough space for ") and err.count("\n") == 1, err
    assert "free on" in err and "guest RAM" in err and "--overcommit" in err
    return err


def test_admission_control_refuses_what_cannot_fit(xfs1g: CLI) -> None:
    cli = xfs1g
    before = guests(cli)
    # a fresh boot claims all its RAM
    err = refused(cli("run", "big", "--memory", "2G", check=False))
    assert "its 2.0 GiB of guest RAM can still claim 2.0 GiB" in err
    assert guests(cli) == before  # nothing left behind
    cli("run", "a")
    cli.sh("a", "echo a-ram > /run/s")
    # other running guests count too: room for b alone, not for b and what a can still claim
    a_dir = Path(str(inspect(cli, "a")["dir"]))
    claim_a = ram_claim("a", 256 * MiB, a_dir / "memory").claim_bytes
    assert claim_a > 64 * MiB
    filler = fill_to(cli, 256 * MiB + LOW_WATER + claim_a - 48 * MiB)
    err = refused(cli("run", "b", check=False))
    assert "1 running guest on this filesystem can claim" in err
    filler.unlink()
    # a restore claims its RAM minus the blocks its mem-file owns; a fork to running all of it
    cli("standby", "a")
    claim_a = ram_claim("a", 256 * MiB, a_dir / "snapshots" / "snapshot-latest" / "memory").claim_bytes
    assert 0 < claim_a < 256 * MiB
    filler = fill_to(cli, claim_a + LOW_WATER - 16 * MiB)
    err = refused(cli("restore", "a", check=False))
    assert f"can still claim {claim_a / MiB:.1f} MiB" in err
    refused(cli("fork", "a", "f-run", "--target-state", "running", check=False))
    cli("fork", "a", "f-stopped", "--target-state", "stopped")  # nothing runs: admitted
    refused(cli("start", "f-stopped", check=False))
    assert inspect(cli, "a")["state"] == "standby"
    assert "f-run" not in [i["name"] for i in cli.json("ps")]  # type: ignore[union-attr, index]
    filler.unlink()
    cli("restore", "a")
    assert cli.sh("a", "cat /run/s") == "a-ram"


def watchdog_events(cli: CLI) -> list[str]:
    log = cli.data_dir / "watchdog.log"
    return log.read_text().splitlines() if log.exists() else []


def test_watchdog_pauses_a_filling_guest_before_enospc(xfs1g: CLI, report: list[str]) -> None:
    cli = xfs1g
    cli("run", "w")
    cli.sh("w", "echo w-ram > /run/s")
    pid = inspect(cli, "w")["pid"]
    filler = fill_to(cli, 140 * MiB)  # the guest is about to write 150 MiB of new RAM pages
    # the writer runs in the background in the guest: no vmfork command waits for it
    cli.sh("w", "setsid sh -c 'dd if=/dev/zero of=/run/fill bs=1M count=90 && "
                "dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 && echo filled > /run/done' "
                ">/dev/null 2>&1 </dev/null &")
    t0 = time.monotonic()
    d: dict[str, object] = {}
    for _ in retry.attempts(180, cap=0.5):
        d = inspect(cli, "w")
        if d["state"] != "running":
            break
    assert d["state"] == "paused", d
    assert d["pid"] == pid  # the same VMM: alive, not restarted
    assert "paused by the space watchdog" in str(d["problem"])
    ps = cli("ps").stdout.decode()
    assert re.search(r"w\s+\S+\s+paused", ps) and "w: paused by the space watchdog" in ps
    event = next(e for e in watchdog_events(cli) if "'w': paused" in e)
    at_free = int(re.search(r"free_bytes=(\d+)", event).group(1))  # type: ignore[union-attr]
    after = int(re.search(r"after_bytes=(\d+)", event).group(1))  # type: ignore[union-attr]
    assert 0 < after <= at_free < LOW_WATER
    time.sleep(2)  # paused means paused: the free space does not shrink any more
    assert free(cli) >= after - 1 * MiB
    # a paused guest: exec says why at once; resume is refused while space is short
    r = cli("exec", "w", "--", "true", check=False)
    assert r.returncode == 5 and b"paused by the space watchdog" in r.stderr, r.stderr
    refused(cli("resume", "w", check=False))
    report.append(
        f"space watchdog: paused a guest filling its RAM at {at_free / MiB:.1f} MiB free "
        f"(low-water {LOW_WATER / MiB:.0f} MiB), {after / MiB:.1f} MiB free right after the pause, "
        f"{time.monotonic() - t0:.1f} s after the writer started"
    )
    # space freed: the watchdog resumes it by itself, and the writer finishes
    filler.unlink()
    for _ in retry.attempts(60, cap=0.5):
        if inspect(cli, "w")["state"] == "running":
            break
    assert any("'w': resumed" in e for e in watchdog_events(cli))
    for _ in retry.attempts(120, cap=1.0):
        if cli.sh("w", "cat /run/done 2>/dev/null; true") == "filled":
            break
    assert cli.sh("w", "cat /run/done /run/s") == "filled\nw-ram"


def test_guest_killed_by_a_full_filesystem_is_named(xfs1g: CLI) -> None:
    cli = xfs1g
    off = {"VMFORK_SPACE_WATCHDOG": "0"}  # the watchdog that this run starts does not pause
    cli("run", "k", env=off)
    fill_to(cli, 40 * MiB)
    r = cli("exec", "k", "--", "sh", "-c", "dd if=/dev/zero of=/run/fill bs=1M count=100", check=False)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "guest RAM could not be written: filesystem full" in err and "connection" not in err, err
    assert err.count("\n") == 1
    d = inspect(cli, "k")
    assert d["state"] == "stopped"
    assert str(d["problem"]).startswith("guest RAM could not be written: filesystem full")
    assert "k: guest RAM could not be written: filesystem full" in cli("ps").stdout.decode()
    # run on a (now) full filesystem: refused; with --overcommit it fails saying "no space"
    fill_to(cli, 2 * MiB, "filler2")
    before = guests(cli)
    refused(cli("run", "x", check=False))
    r = cli("run", "x", "--overcommit", check=False, env=off)
    err = r.stderr.decode()
    assert r.returncode != 0 and "no space" in err.lower(), err
    assert "qemu-system" not in err and "-append" not in err and "Traceback" not in err, err
    assert err.count("\n") == 1, err
    assert guests(cli) == before


def test_console_log_is_capped_and_tailed_from_the_end(built: CLI) -> None:
    cli = built
    cli("run", "flood")
    try:
        log = Path(str(inspect(cli, "flood")["dir"])) / "logs" / "console.log"
        flood = subprocess.Popen(
            [sys.executable, "-m", "vmfork.cli", "--data-dir", str(cli.data_dir), "-q", "exec", "flood", "--",
             "sh", "-c", "yes flood-line-0123456789-abcdefghijklmnopqrstuvwxyz | head -c 3000000 > /dev/ttyS0; "
             "printf '\\nflood-done\\n' > /dev/ttyS0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        biggest = 0
        while flood.poll() is None:
            biggest = max(biggest, log.stat().st_size)
            time.sleep(0.1)
        assert flood.returncode == 0, flood.communicate()
        # cut every second once past 1 MiB; a flooding guest writes ~250 KB/s here
        assert biggest <= CONSOLE_LOG_MAX + 1 * MiB, biggest
        assert any(log.stat().st_size <= CONSOLE_LOG_MAX for _ in retry.attempts(5, cap=0.2))
        assert cli("logs", "flood", "--tail", "1").stdout == b"flood-done\r\n"
        assert cli("logs", "flood", "--tail", "3").stdout.count(b"\n") == 3
        assert cli("logs", "flood", "--tail", "0").stdout == b""
        whole = cli("logs", "flood").stdout
        assert len(whole) <= CONSOLE_LOG_MAX and whole.endswith(b"flood-done\r\n")
        assert json.dumps(inspect(cli, "flood"))  # still a healthy guest
        assert cli.sh("flood", "echo ok") == "ok"
    finally:
        cli("rm", "--force", "flood", check=False)
