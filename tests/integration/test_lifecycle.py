"""Issue 2: boot real microVMs under QEMU and drive them through the CLI."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.conftest import CLI
from vmfork import retry

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


def test_logs_tail(built: CLI, vm: str):
    whole = built("logs", vm).stdout
    lines = whole.splitlines(keepends=True)
    assert len(lines) >= 3
    assert built("logs", vm, "--tail", "0").stdout == b""  # was: everything
    assert built("logs", vm, "--tail", "1").stdout == lines[-1]
    assert built("logs", vm, "--tail", "2").stdout == b"".join(lines[-2:])
    assert built("logs", vm, "--tail", str(len(lines) + 5)).stdout == whole
    for bad in ("-1", "-2"):  # -1 was accepted, and dropped the first line
        r = built("logs", vm, "--tail", bad, check=False)
        assert r.returncode == 2 and r.stdout == b""
        assert r.stderr.decode().splitlines() == [f"vmfork: error: invalid --tail '{bad}': a number of lines, 0 or more"]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_exec_timeout_nan_inf_on_a_running_guest(built: CLI, vm: str, value: str):
    r = built("exec", vm, "--timeout", value, "--", "echo", "ran", check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and f"invalid --timeout '{value}'" in err


def test_guest_console_with_markup_is_printed_verbatim(built: CLI):
    """A guest controls its console, and a failed restore quotes the console's tail. A guest
    printing rich markup there (``[/]``) turned that one-line error into a MarkupError
    traceback; it must come out as one line, verbatim, with control characters escaped."""
    built("run", "marked")
    try:
        fake_agent = "#!/bin/sh\necho '[/] [bold]from the guest\t:x:' > /dev/console\nexec sleep 100000\n"
        built("exec", "marked", "-i", "--", "sh", "-c",
              "cat > /tmp/fake && chmod +x /tmp/fake && mv /tmp/fake /sbin/vmfork-agent.new && "
              "mv /sbin/vmfork-agent.new /sbin/vmfork-agent && "
              "(setsid sh -c 'sleep 1; killall vmfork-agent' </dev/null >/dev/null 2>&1 &)",
              input=fake_agent.encode())
        # wait until the fake agent has printed its line (the real one is gone)
        assert any(b"[/] [bold]from the guest" in built("logs", "marked").stdout
                   for _ in retry.attempts(30, first=0.1, cap=0.5))
        built("standby", "marked")
        r = built("restore", "marked", check=False, env={"VMFORK_RESTORE_TIMEOUT": "5"})
        err = r.stderr.decode()
        assert r.returncode != 0 and "Traceback" not in err, err
        assert len(err.splitlines()) == 1, err
        assert "guest agent not ready after restore" in err, err
        assert "[/] [bold]from the guest\\t:x:" in err, err
    finally:
        built("rm", "--force", "marked", check=False)


def test_piped_human_output_is_not_wrapped(built: CLI, vm: str):
    d = built.json("inspect", vm)
    assert len(d["dir"]) + 23 > 80  # a line that rich folded at 80 columns when piped
    lines = built("inspect", vm).stdout.decode().splitlines()
    assert f"{'dir':22} {d['dir']}" in lines
    ps = built("ps").stdout.decode().splitlines()
    assert any(line.split()[:3] == [vm, d["id"], "running"] for line in ps)


def test_doctor_reports_accel_and_cow(built: CLI):
    d = built.json("doctor")
    names = {c["name"] for c in d["checks"]}
    assert {"qemu", "/dev/kvm", "accel", "copy-on-write", "data dir"} <= names
    assert d["accel"] in ("kvm", "tcg")
    assert isinstance(d["reflink"], bool)
