"""Issue 8: a vmfork command killed at any moment never loses a guest.

``vmfork standby``, ``restore``, ``fork`` (every target state) and ``rm`` are killed with
SIGKILL at every crashpoint (``VMFORK_CRASHPOINT``, deterministic: the outcome of each point
is asserted exactly) and at random moments (at least 20 per command). After each kill the
next command recovers, and then:
- the instance is whole: running, standby or stopped, and stopped only if it was before;
- its RAM sentinel survives wherever it is running or standby (checked inside the guest);
- a fork source's snapshot is byte-identical to what it was;
- no temp dir, trash dir, stray lock file or unrecorded VMM is left.
The outcomes are counted and printed in the test summary.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_fork_isolation import _qemu_pids_in, fingerprint

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MEM = "128M"
RANDOM_KILLS = int(os.environ.get("VMFORK_TEST_RANDOM_KILLS", "20"))
SENTINEL = "echo ram > /run/sentinel && echo disk > /root/sentinel && sync"
RNG = random.Random(int(os.environ.get("VMFORK_TEST_SEED", "8")))


@pytest.fixture(scope="module")
def crash_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path_factory.mktemp("crash"), size_mb=4000) as cli:
        cli("run", "src", "--memory", MEM)
        cli.sh("src", SENTINEL)
        yield cli


def _states(cli: CLI) -> dict[str, str]:
    return {str(i["name"]): str(i["state"]) for i in cli.json("ps")}  # type: ignore[union-attr, index]


def recovered(cli: CLI) -> dict[str, str]:
    """Run the next command (it recovers), check that nothing is left over, return the states."""
    states = _states(cli)
    guests, locks = cli.data_dir / "guests", cli.data_dir / "locks"
    assert not [p.name for p in guests.iterdir() if p.name.startswith(".")]
    ids = {str(i["id"]) for i in cli.json("ps")}  # type: ignore[union-attr, index]
    stray = {f.name for f in locks.iterdir()} - {"global.lock", "watchdog.lock"} - {f"{i}.lock" for i in ids}
    assert not stray, f"lock files of no instance: {stray}"
    recorded = {int(i["pid"]) for i in cli.json("ps") if i["pid"]}  # type: ignore[union-attr, index, arg-type]
    assert _qemu_pids_in(cli.data_dir) == recorded
    assert "error" not in states.values(), states
    return states


def ram_ok(cli: CLI, name: str, state: str) -> None:
    """The guest's RAM and disk sentinels are there (a standby guest is restored first)."""
    if state == "standby":
        cli("restore", name)
    assert cli.sh(name, "cat /run/sentinel /root/sentinel").split() == ["ram", "disk"]


def snapshot_digest(cli: CLI, name: str) -> tuple[tuple[int, str], tuple[int, str]]:
    d = cli.json("inspect", name)
    snap = Path(d["dir"]) / "snapshots" / "snapshot-latest"  # type: ignore[index]
    return fingerprint(snap / "memory"), fingerprint(snap / "state")


def ensure(cli: CLI, name: str, state: str) -> None:
    now = cli.state(name)
    if now == state:
        return
    if state == "running":
        cli("restore" if now == "standby" else "start", name)
        if now == "stopped":  # a cold boot has fresh RAM
            cli.sh(name, SENTINEL)
    elif state == "standby":
        ensure(cli, name, "running")
        cli("standby", name)


def killed(cli: CLI, args: list[str], *, point: str | None = None, after: float | None = None) -> int:
    """Run ``vmfork ARGS`` and kill it with SIGKILL at ``point`` or ``after`` seconds."""
    cmd = [sys.executable, "-m", "vmfork.cli", "--data-dir", str(cli.data_dir), "-q", *args]
    env = os.environ | ({"VMFORK_CRASHPOINT": point} if point else {})
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if after is not None:
        try:
            p.wait(after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    try:
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    if point is not None:
        assert p.returncode == -9, (point, p.returncode, err)
    elif p.returncode not in (0, -9):
        raise AssertionError(f"vmfork {' '.join(args)} exited {p.returncode}: {err.decode(errors='replace')}")
    return p.returncode


# --- every crashpoint, with the one outcome each must have ---------------------------------
STANDBY_POINTS = {
    "standby:begun": "running",  # nothing written yet: undone
    "standby:state-written": "running",  # state written, not marked complete: undone, guest resumed
    "standby:marked": "standby",  # marked complete, VMM paused and alive: rolled forward
    "standby:vmm-stopped": "standby",  # VMM gone, RAM file still in the guest dir: rolled forward
    "standby:memory-moved": "standby",
    "standby:committed": "standby",
}
RESTORE_POINTS = {
    "restore:consuming": "standby",  # rolled back
    "restore:memory-moved": "standby",
    "restore:loaded": "standby",  # loaded but never resumed: the RAM is untouched
    "restore:resumed": "running",  # the guest runs on its RAM: finished
    "restore:ready": "running",
}


@pytest.mark.parametrize("command,point,outcome",
                         [("standby", p, o) for p, o in sorted(STANDBY_POINTS.items())]
                         + [("restore", p, o) for p, o in sorted(RESTORE_POINTS.items())])
def test_standby_or_restore_killed_at_crashpoint(crash_cli: CLI, command: str, point: str, outcome: str,
                                                 report: list[str]) -> None:
    ensure(crash_cli, "src", "running" if command == "standby" else "standby")
    killed(crash_cli, [command, "src"], point=point)
    state = recovered(crash_cli)["src"]
    assert state == outcome, (point, state)
    ram_ok(crash_cli, "src", state)
    report.append(f"crashpoint {point}: {state}")


FORK_POINTS = [
    # (target state, crashpoint, does the fork exist afterwards)
    ("standby", "fork:cloned", False),
    ("standby", "fork:before-rename", False),
    ("standby", "fork:created", True),  # a standby fork is complete once renamed into place
    ("running", "fork:created", False),  # not yet running: rolled back
    ("running", "restore:consuming", False),
    ("running", "restore:loaded", False),
    ("running", "restore:resumed", False),
    ("running", "fork:target-reached", False),  # running, but not yet marked done: rolled back
    ("stopped", "fork:created", False),
    ("stopped", "fork:target-reached", False),
]


@pytest.mark.parametrize("target,point,exists", FORK_POINTS)
def test_fork_killed_at_crashpoint(crash_cli: CLI, target: str, point: str, exists: bool,
                                   report: list[str]) -> None:
    cli = crash_cli
    ensure(cli, "src", "standby")
    before = snapshot_digest(cli, "src")
    killed(cli, ["fork", "src", "kid", "--target-state", target], point=point)
    states = recovered(cli)
    assert ("kid" in states) == exists, (point, states)
    assert snapshot_digest(cli, "src") == before
    if exists:
        assert states["kid"] == target
        cli("rm", "--force", "kid")
    report.append(f"crashpoint {point} (fork to {target}): {'fork ' + target if exists else 'rolled back'}")


@pytest.mark.parametrize("point", ["rm:renamed", "rm:vmm-stopped"])
def test_rm_killed_at_crashpoint(crash_cli: CLI, point: str, report: list[str]) -> None:
    cli = crash_cli
    ensure(cli, "src", "standby")
    cli("fork", "src", "victim", "--target-state", "running")
    killed(cli, ["rm", "--force", "victim"], point=point)
    states = recovered(cli)
    assert "victim" not in states  # renamed out of sight is the commit point: removal finished
    report.append(f"crashpoint {point}: removed")


# --- random moments ------------------------------------------------------------------------
def _duration(cli: CLI, args: list[str]) -> float:
    t0 = time.monotonic()
    cli(*args)
    return time.monotonic() - t0


def _random_kills(cli: CLI, args: list[str], span: float, check: object) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for _ in range(RANDOM_KILLS):
        rc = killed(cli, args, after=RNG.uniform(0.05, span))
        outcome = check()  # type: ignore[operator]
        outcomes[f"{outcome}{' (completed)' if rc == 0 else ''}"] += 1
    return outcomes


def test_standby_and_restore_killed_at_random(crash_cli: CLI, report: list[str]) -> None:
    cli = crash_cli
    ensure(cli, "src", "running")
    span = _duration(cli, ["standby", "src"]) * 1.2
    ensure(cli, "src", "running")

    def after_standby() -> str:
        state = recovered(cli)["src"]
        assert state in ("running", "standby")
        ram_ok(cli, "src", state)  # and back to running for the next kill
        return state

    got = _random_kills(cli, ["standby", "src"], span, after_standby)
    report.append(f"random kills of standby: {dict(got)}")

    ensure(cli, "src", "standby")
    span = _duration(cli, ["restore", "src"]) * 1.2
    cli("standby", "src")

    def after_restore() -> str:
        state = recovered(cli)["src"]
        assert state in ("running", "standby")
        ram_ok(cli, "src", state)
        cli("standby", "src")
        return state

    got = _random_kills(cli, ["restore", "src"], span, after_restore)
    report.append(f"random kills of restore: {dict(got)}")


@pytest.mark.parametrize("target", ["standby", "running", "stopped"])
def test_fork_killed_at_random(crash_cli: CLI, target: str, report: list[str]) -> None:
    cli = crash_cli
    ensure(cli, "src", "standby")
    before = snapshot_digest(cli, "src")
    args = ["fork", "src", "kid", "--target-state", target]
    span = _duration(cli, args) * 1.2
    cli("rm", "--force", "kid")

    def after_fork() -> str:
        states = recovered(cli)
        assert snapshot_digest(cli, "src") == before
        if "kid" not in states:
            return "rolled back"
        assert states["kid"] == target
        if target != "stopped":
            ram_ok(cli, "kid", states["kid"])  # the fork's RAM is the source's: its sentinel is there
        cli("rm", "--force", "kid")
        return f"fork {target}"

    got = _random_kills(cli, args, span, after_fork)
    report.append(f"random kills of fork to {target}: {dict(got)}")


def test_rm_killed_at_random(crash_cli: CLI, report: list[str]) -> None:
    cli = crash_cli
    ensure(cli, "src", "standby")
    cli("fork", "src", "victim", "--target-state", "running")
    span = _duration(cli, ["rm", "--force", "victim"]) * 1.2

    def after_rm() -> str:
        states = recovered(cli)
        if "victim" in states:
            assert states["victim"] == "running"
            return "kept running"
        return "removed"

    outcomes: Counter[str] = Counter()
    for _ in range(RANDOM_KILLS):
        cli("fork", "src", "victim", "--target-state", "running")
        killed(cli, ["rm", "--force", "victim"], after=RNG.uniform(0.05, span))
        outcomes[after_rm()] += 1
        cli("rm", "--force", "victim", check=False)
    report.append(f"random kills of rm: {dict(outcomes)}")
