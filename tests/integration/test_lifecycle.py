"""Issue 2: boot real microVMs under QEMU and drive them through the CLI."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.conftest import CLI

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="module")
def vm(built: CLI):
    built("run", "basic", "--memory", "256M")
    yield "basic"
    built("rm", "--force", "basic", check=False)


def test_exec_stdout_stderr_exit_code(built: CLI, vm: str):
    r = built("exec", vm, "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert r.returncode == 3
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"


def test_exec_binary_output_is_exact(built: CLI, vm: str):
    r = built(
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "head -c 3000000 /dev/urandom > /tmp/b; sha256sum /tmp/b; cat /tmp/b >&2",
    )
    want = r.stdout.split()[0].decode()
    assert hashlib.sha256(r.stderr).hexdigest() == want
    assert len(r.stderr) == 3_000_000
    assert b"\0" in r.stderr


def test_exec_timeout(built: CLI, vm: str):
    t0 = time.monotonic()
    r = built("exec", vm, "--timeout", "1", "--", "sleep", "30", check=False)
    assert r.returncode == 124
    assert b"timed out" in r.stderr
    assert time.monotonic() - t0 < 20
    # the agent is still usable afterwards
    assert built.sh(vm, "echo alive") == "alive"


def test_exec_stdin_env_workdir(built: CLI, vm: str):
    r = built(
        "exec",
        vm,
        "-i",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        'read x; echo "$GREETING $x $(pwd)"',
        input=b"there\n",
    )
    assert r.stdout == b"hi there /tmp\n"


def test_exec_missing_command(built: CLI, vm: str):
    r = built("exec", vm, "--", "/no/such/binary", check=False)
    assert r.returncode == 127


def test_layout_and_inspect(built: CLI, vm: str):
    d = built.json("inspect", vm)
    assert d["name"] == vm and d["state"] == "running" and d["hypervisor"] == "qemu"
    assert d["accel"] in ("tcg", "kvm")
    assert len(d["id"]) == 12
    gdir = d["dir"]
    assert gdir.endswith(f"guests/{d['id']}")
    for rel in (
        "instance.json",
        "disk.raw",
        "memory",
        "logs/console.log",
        "run/qmp.sock",
        "run/agent.sock",
    ):
        assert os.path.exists(os.path.join(gdir, rel)), rel
    assert os.path.exists(f"/proc/{d['pid']}")
    # guest RAM is a file in the instance dir, of the guest's size
    assert os.stat(os.path.join(gdir, "memory")).st_size == 256 << 20
    rows = built.json("ps")
    assert any(r["name"] == vm and r["state"] == "running" for r in rows)
    # /run is tmpfs (RAM), /root is on the overlay disk
    mounts = built.sh(vm, "cat /proc/mounts")
    assert "tmpfs /run tmpfs" in mounts
    assert built.sh(vm, "stat -f -c %T /root") != "tmpfs"
    assert built.sh(vm, "hostname") == vm


def test_stop_start_keeps_disk_files(built: CLI):
    built("run", "persist")
    try:
        built.sh("persist", "echo kept > /root/f && echo gone > /run/f && sync")
        assert built("stop", "persist").returncode == 0
        assert built.state("persist") == "stopped"
        r = built("exec", "persist", "--", "true", check=False)
        assert r.returncode != 0 and b"stopped" in r.stderr
        built("start", "persist")
        assert built.sh("persist", "cat /root/f") == "kept"
        assert built.sh("persist", "cat /run/f 2>/dev/null || echo missing") == "missing"
        r = built("start", "persist", check=False)
        assert r.returncode != 0 and b"already running" in r.stderr
    finally:
        built("rm", "--force", "persist", check=False)


def test_rm_leaves_no_process_no_directory(built: CLI):
    built("run", "doomed")
    d = built.json("inspect", "doomed")
    r = built("rm", "doomed", check=False)
    assert r.returncode != 0 and b"running" in r.stderr  # needs --force
    built("rm", "--force", "doomed")
    assert not os.path.exists(d["dir"])
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{d['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        not os.path.exists(f"/proc/{d['pid']}")
        or "Z" in Path(f"/proc/{d['pid']}/stat").read_text().split()[2]
    )
    r = built("inspect", "doomed", check=False)
    assert r.returncode != 0 and b"not found" in r.stderr


def test_two_vms_at_once(built: CLI, vm: str):
    built("run", "second")
    try:
        built.sh(vm, "echo one > /root/who")
        built.sh("second", "echo two > /root/who")
        assert built.sh(vm, "cat /root/who") == "one"
        assert built.sh("second", "cat /root/who") == "two"
        a, b = built.json("inspect", vm), built.json("inspect", "second")
        assert a["pid"] != b["pid"] and a["dir"] != b["dir"]
    finally:
        built("rm", "--force", "second")


def _guests(cli: CLI) -> set[str]:
    return {p.name for p in (cli.data_dir / "guests").iterdir()}


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["run", "Bad_Name"], 2, "invalid name 'Bad_Name'"),
        (["run", "x" * 64], 2, "longer than 63"),
        (["run", "okname", "--memory", "12X"], 2, "invalid memory size '12X'"),
        (["run", "okname", "--memory", "16M"], 2, "at least 64M"),
        (["run", "okname", "--accel", "warp"], 2, "invalid accel 'warp'"),
        (["run", "okname", "--hypervisor", "vbox"], 2, "invalid hypervisor 'vbox'"),
        (["exec", "nosuch", "--", "true"], 3, "instance 'nosuch' not found"),
        (["stop", "nosuch"], 3, "instance 'nosuch' not found"),
        (["rm", "nosuch"], 3, "instance 'nosuch' not found"),
        (["inspect", "nosuch"], 3, "instance 'nosuch' not found"),
        (["logs", "nosuch"], 3, "instance 'nosuch' not found"),
    ],
)
def test_bad_inputs_one_clear_line_nothing_created(built: CLI, args, code, message):
    before = _guests(built)
    r = built(*args, check=False)
    assert r.returncode == code, r.stderr
    err = r.stderr.decode()
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert _guests(built) == before


def test_duplicate_name_and_wrong_state(built: CLI, vm: str):
    before = _guests(built)
    r = built("run", vm, check=False)
    assert r.returncode == 4 and f"instance '{vm}' already exists" in r.stderr.decode()
    assert _guests(built) == before
    r = built("restore", vm, check=False)
    assert r.returncode == 5 and "is running" in r.stderr.decode()


def test_logs_show_console(built: CLI, vm: str):
    out = built("logs", vm).stdout.decode(errors="replace")
    assert "vmfork" in out.lower() or "linux" in out.lower()


def test_doctor_reports_accel_and_cow(built: CLI):
    d = built.json("doctor")
    names = {c["name"] for c in d["checks"]}
    assert {"qemu", "/dev/kvm", "accel", "copy-on-write", "data dir"} <= names
    assert d["accel"] in ("kvm", "tcg")
    assert isinstance(d["reflink"], bool)
