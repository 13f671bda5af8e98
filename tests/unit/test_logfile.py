"""Reading a log's end without reading it whole, and capping a log a writer keeps appending to."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmfork.hypervisor.base import tail
from vmfork.logfile import cap, read_tail


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(b"line %08d\n" % i for i in range(start, start + n))


def test_read_tail_lines(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(lines(100_000))  # 1.4 MB: read in blocks from the end
    assert read_tail(p, 3) == lines(3, 99_997)
    assert read_tail(p, 1) == b"line 00099999\n"
    assert read_tail(p, 0) == b""
    p.write_bytes(b"a\nb\nno newline at the end")
    assert read_tail(p, 2) == b"b\nno newline at the end"
    assert read_tail(p, 10) == b"a\nb\nno newline at the end"
    assert read_tail(tmp_path / "missing", 5) == b""


def test_read_tail_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(b"x" * (3 << 20) + b"\nlast\n")  # one 3 MiB line: never read whole
    out = read_tail(p, 2, max_bytes=1 << 20)
    assert len(out) <= 1 << 20
    assert out.endswith(b"\nlast\n")


def test_tail_leaves_out_vmfork_notes(tmp_path: Path) -> None:
    p = tmp_path / "vmm.log"
    p.write_text("--- qemu-system-x86_64 -name x -m 256M ...\nqemu: first\n\n--- vmfork watchdog: paused\nqemu: second\n")
    assert tail(p, 3) == "qemu: first | qemu: second"


def test_cap_leaves_small_files_alone(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(lines(10))
    assert cap(p, limit=4096, keep=1024) == 0
    assert p.read_bytes() == lines(10)
    assert cap(tmp_path / "missing", 1, 1) == 0


@pytest.mark.parametrize("where", ["tmp", "tmpfs"])
def test_cap_keeps_the_newest_while_a_writer_appends(tmp_path: Path, where: str) -> None:
    """A real writer appends numbered lines (O_APPEND, as QEMU's file chardev) while the
    file is capped again and again: it stays bounded, and what is kept is the newest part.
    On ext4/XFS (collapse-range) nothing after the cut point is lost."""
    if where == "tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm (tmpfs) here")
        base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    else:
        base = tmp_path
    p = base / "console.log"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os,sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
        "for i in range(400_000):\n"
        "    os.write(fd, b'line %08d\\n' % i)\n"
    ), str(p)])
    cuts = 0
    try:
        while writer.poll() is None:
            if p.exists():
                cuts += cap(p, limit=256 << 10, keep=64 << 10) > 0
            time.sleep(0.01)
    finally:
        writer.kill()
        writer.wait()
    cuts += cap(p, limit=256 << 10, keep=64 << 10) > 0
    data = p.read_bytes()
    assert cuts >= 3  # 5.6 MB written through a 256 KiB cap
    assert 64 << 10 <= len(data) <= 256 << 10
    assert data.endswith(b"line 00399999\n")  # the newest is kept
    kept = data.split(b"\n")[1:-1]  # the first line may be cut in the middle
    numbers = [int(x.split()[1]) for x in kept]
    if where == "tmp":  # collapse-range: every line after the cut point is there, in order
        assert numbers == list(range(numbers[0], 400_000))
    else:
        assert numbers == sorted(numbers)
    if where == "tmpfs":
        p.unlink()
        base.rmdir()
