"""Issue 8, "exec must not hold the instance": concurrent execs through the exec mux,
standby / stop / rm ending running execs with a clear error, a killed `vmfork exec`
killing its guest command, and bounded exec output, on real guests."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CLI
from vmfork import retry
from vmfork.procs import ProcRef

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def vm(built: CLI):
    built("run", "execs", "--memory", "256M")
    yield "execs"
    built("rm", "--force", "execs", check=False)


def _exec_bg(cli: CLI, name: str, script: str) -> subprocess.Popen[bytes]:
    """`vmfork exec NAME -- sh -c SCRIPT` in the background, its stdout a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "vmfork.cli", "--data-dir", str(cli.data_dir), "-q", "exec", name,
         "--", "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _started(p: subprocess.Popen[bytes]) -> int:
    """Wait for the first line of the command's stdout (its pid): it runs in the guest."""
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip().isdigit(), f"no pid from the guest command: {line!r} {p.stderr.read() if p.stderr else ''}"
    return int(line)


def _guest_proc_gone(cli: CLI, name: str, pid: int, within: float = 60) -> bool:
    for _ in retry.attempts(within, first=0.2, cap=1.0):
        r = cli("exec", name, "--", "test", "-d", f"/proc/{pid}", check=False)
        if r.returncode == 1:
            return True
        assert r.returncode == 0, r.stderr
    return False


def test_eight_concurrent_execs(built: CLI, vm: str, report: list[str]):
    script = "sleep 1; echo out{i}; echo err{i} >&2; exit {i}"
    built("exec", vm, "--", "true")  # the mux is up: measure execs, not its start
    t0 = time.monotonic()
    r = built("exec", vm, "--", "sh", "-c", script.format(i=0), check=False)
    one = time.monotonic() - t0
    assert (r.returncode, r.stdout, r.stderr) == (0, b"out0\n", b"err0\n")
    t0 = time.monotonic()
    procs = {i: _exec_bg(built, vm, script.format(i=i)) for i in range(8)}
    results = {i: (p.wait(timeout=120), p.stdout.read(), p.stderr.read())  # type: ignore[union-attr]
               for i, p in procs.items()}
    eight = time.monotonic() - t0
    assert results == {i: (i, f"out{i}\n".encode(), f"err{i}\n".encode()) for i in range(8)}
    report.append(f"exec concurrency: 8 parallel `vmfork exec` of 'sleep 1; echo' {eight:.2f}s "
                  f"wall vs one {one:.2f}s ({eight / one:.2f}x; 8 CLI start-ups on 2 cores)")


def test_eight_concurrent_execs_in_process(built: CLI, vm: str, report: list[str]):
    """The same through Manager.exec from 8 threads: the mux and the guest, without 8 CLI
    processes starting on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    from vmfork.instances import Manager

    m = Manager(built.data_dir)

    def one(i: int) -> tuple[int, bytes]:
        r = m.exec(vm, ["sh", "-c", f"sleep 1; echo {i}; exit {i}"])
        return r.exit_code, r.stdout

    t0 = time.monotonic()
    assert one(0) == (0, b"0\n")
    single = time.monotonic() - t0
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    eight = time.monotonic() - t0
    assert got == [(i, f"{i}\n".encode()) for i in range(8)]
    assert eight < 5.0, f"8 execs of 'sleep 1' took {eight:.1f}s: they ran one after another"
    report.append(f"exec concurrency in-process: 8 parallel Manager.exec of 'sleep 1; echo' "
                  f"{eight:.2f}s wall vs one {single:.2f}s ({eight / single:.2f}x)")


def test_standby_during_long_exec_is_immediate_and_ends_the_exec(built: CLI, vm: str):
    p = _exec_bg(built, vm, "echo $$; exec sleep 60")
    pid = _started(p)
    t0 = time.monotonic()
    built("standby", vm)
    took = time.monotonic() - t0
    rc = p.wait(timeout=30)
    err = p.stderr.read().decode()  # type: ignore[union-attr]
    assert rc != 0 and "was put in standby" in err and err.count("\n") == 1, err
    assert took < 20, f"standby waited {took:.1f}s behind the exec"  # it waited ~58 s before
    built("restore", vm)
    # the command was killed before the snapshot: the restored guest does not run it
    r = built("exec", vm, "--", "test", "-d", f"/proc/{pid}", check=False)
    assert r.returncode == 1, "the exec's command survived the standby"


def _mux(cli: CLI, name: str) -> ProcRef:
    d = cli.json("inspect", name)
    assert isinstance(d, dict)
    rec = json.loads((Path(d["dir"]) / "run" / "mux.json").read_text())
    return ProcRef(rec["pid"], rec["start"])


def test_stop_and_rm_force_during_hung_exec(built: CLI):
    built("run", "hung", "--memory", "256M")
    try:
        p = _exec_bg(built, "hung", "echo $$; exec sleep 3600")
        _started(p)
        built("stop", "hung")
        assert p.wait(timeout=60) != 0
        err = p.stderr.read().decode()  # type: ignore[union-attr]
        assert "'hung'" in err and "was stopped" in err, err
        built("start", "hung")
        p = _exec_bg(built, "hung", "echo $$; exec sleep 3600")
        _started(p)
        mux = _mux(built, "hung")
        t0 = time.monotonic()
        built("rm", "--force", "hung")
        assert time.monotonic() - t0 < 30  # it failed with "busy" after 60 s before
        assert p.wait(timeout=30) != 0
        err = p.stderr.read().decode()  # type: ignore[union-attr]
        assert "was removed" in err, err
        assert not mux.alive(), "the exec mux outlived its instance"
    finally:
        built("rm", "--force", "hung", check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_killing_host_exec_kills_guest_command(built: CLI, vm: str, sig: signal.Signals):
    p = _exec_bg(built, vm, "sleep 300 & echo $!; wait")
    pid = _started(p)
    p.send_signal(sig)
    assert p.wait(timeout=30) != 0
    assert _guest_proc_gone(built, vm, pid), f"guest command survived {sig.name} of its vmfork exec"


def test_buffered_exec_output_is_bounded(built: CLI, vm: str):
    from vmfork.instances import Manager

    m = Manager(built.data_dir)
    r = m.exec(vm, ["sh", "-c", "head -c 3000000 /dev/zero; echo tail >&2"], max_output=1 << 20)
    assert (len(r.stdout), r.stdout_dropped, r.stderr, r.stderr_dropped) == (1 << 20, 3000000 - (1 << 20), b"tail\n", 0)
    assert r.truncated and r.exit_code == 0


def test_streamed_exec_output_is_complete(built: CLI, vm: str, tmp_path: Path):
    """32 MiB through `vmfork exec` into a file: all of it, exactly (the streaming path
    holds the guest command while the reader lags instead of buffering)."""
    out = tmp_path / "out"
    with open(out, "wb") as f:
        r = subprocess.run(
            [sys.executable, "-m", "vmfork.cli", "--data-dir", str(built.data_dir), "-q", "exec", vm,
             "--", "sh", "-c", "head -c 33554432 /dev/urandom | tee /tmp/big | md5sum >&2"],
            stdout=f, stderr=subprocess.PIPE, timeout=300,
        )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == 0  # tee wrote to the pipe to md5sum only
    # now stream the same bytes to the host
    with open(out, "wb") as f:
        r2 = subprocess.run(
            [sys.executable, "-m", "vmfork.cli", "--data-dir", str(built.data_dir), "-q", "exec", vm,
             "--", "cat", "/tmp/big"], stdout=f, stderr=subprocess.PIPE, timeout=300,
        )
    assert r2.returncode == 0, r2.stderr
    assert hashlib.md5(out.read_bytes()).hexdigest() == r.stderr.split()[0].decode()
    built("exec", vm, "--", "rm", "/tmp/big")
