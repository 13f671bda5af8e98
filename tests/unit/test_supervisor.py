"""The supervising shell records how a detached VMM ended; real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmfork import retry
from vmfork.layout import GuestDir
from vmfork.supervisor import EXIT_FILE, death_cause, read_exit, start_supervised, vmm_ended

# A real SIGBUS, as QEMU gets it: touch a page of a shared file mapping that has no backing
# (here: past the end of the file, which was truncated under the mapping).
SIGBUS_BY_MAPPING = (
    "import mmap, os\n"
    "fd = os.open('ram', os.O_RDWR | os.O_CREAT, 0o600)\n"
    "os.ftruncate(fd, 1 << 20)\n"
    "m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)\n"
    "os.ftruncate(fd, 0)\n"
    "m[4096] = 1\n"
)


def supervised(tmp_path: Path, argv: list[str]) -> GuestDir:
    """Start ``argv`` the way spawn_vmm does, and record it in run/vmm.json like it."""
    g = GuestDir(tmp_path)
    g.ensure_dirs()
    with open(g.vmm_log, "ab") as log:
        proc, shell = start_supervised(argv, g.path, stdin=subprocess.DEVNULL, stderr=log,
                                       start_new_session=True, close_fds=True)
    g.vmm_json.write_text(json.dumps({"pid": proc.pid, "start": proc.start, "hypervisor": "qemu",
                                      "supervisor": {"pid": shell.pid, "start": shell.start}}))
    return g


def test_reports_the_vmm_pid_not_the_shell(tmp_path: Path) -> None:
    g = supervised(tmp_path, ["sleep", "30"])
    rec = json.loads(g.vmm_json.read_text())
    try:
        # the shell reports the pid as soon as it forked: the exec may follow a moment later
        assert any(os.readlink(f"/proc/{rec['pid']}/exe").endswith("/sleep") for _ in retry.attempts(5))
        assert rec["pid"] != rec["supervisor"]["pid"]
        assert os.getsid(rec["pid"]) == rec["pid"]  # detached: its own session, as before
        assert read_exit(g.path) is None  # still the placeholder
        assert vmm_ended(g) is None
    finally:
        os.kill(rec["pid"], signal.SIGKILL)
    ex = vmm_ended_soon(g)
    assert ex.pid == rec["pid"] and ex.signal == signal.SIGKILL
    assert death_cause(g) == "the VMM was killed by SIGKILL"


def test_sigbus_on_a_ram_file_is_named(tmp_path: Path) -> None:
    g = supervised(tmp_path, [sys.executable, "-c", SIGBUS_BY_MAPPING])
    g.memory.write_bytes(b"")  # a guest whose RAM is a file here
    ex = vmm_ended_soon(g)
    assert ex.signal == signal.SIGBUS
    cause = death_cause(g)
    assert cause is not None and cause.startswith("guest RAM could not be written: filesystem full")


def test_exit_codes_and_clean_exits(tmp_path: Path) -> None:
    g = supervised(tmp_path / "a", ["sh", "-c", "exit 3"])
    assert vmm_ended_soon(g).code == 3
    assert death_cause(g) == "the VMM exited with status 3"
    g = supervised(tmp_path / "b", ["true"])
    assert vmm_ended_soon(g).code == 0
    assert death_cause(g) is None  # a clean exit (e.g. the guest powered off) is no problem


def test_record_is_written_on_a_full_filesystem(tmp_path: Path) -> None:
    from tests.fsutil import loop_fs, loop_fs_unavailable_reason

    reason = loop_fs_unavailable_reason("ext4")
    if reason:
        pytest.skip(reason)
    with loop_fs("ext4", 16, tmp_path) as mnt:
        g = supervised(mnt / "g", ["sh", "-c", "while [ ! -e go ]; do sleep 0.01; done; kill -BUS $$"])
        with open(mnt / "filler", "wb") as f:  # fill every block left
            chunk = b"\1" * (1 << 20)
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass
            try:
                while True:
                    f.write(b"\1" * 4096)
                    f.flush()
            except OSError:
                pass
        with pytest.raises(OSError):  # the filesystem is really full
            (mnt / "g" / "probe").write_bytes(b"\1" * 8192)
        (mnt / "g" / "go").touch()  # an inode, no block
        ex = vmm_ended_soon(g)
        assert ex.signal == signal.SIGBUS
        assert len((g.path / EXIT_FILE).read_bytes()) == 64


def test_missing_binary_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        start_supervised(["/no/such/vmm"], tmp_path)


def vmm_ended_soon(g: GuestDir):  # type: ignore[no-untyped-def]
    from vmfork.procs import ProcRef

    rec = json.loads(g.vmm_json.read_text())
    assert ProcRef(rec["pid"], rec["start"]).wait_exit(20)
    ex = vmm_ended(g)
    assert ex is not None
    return ex
