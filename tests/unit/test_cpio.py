"""The newc cpio writer, checked with GNU cpio."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from vmfork.images.cpio import CpioArchive


def sample() -> CpioArchive:
    arc = CpioArchive()
    arc.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    arc.add_file("lib/modules/a.ko", b"\0" * 1001)
    arc.add_symlink("bin/sh", "/bin/busybox")
    arc.add_chardev("dev/console", 5, 1)
    arc.add_dir("tmp", 0o1777)
    return arc


def test_deterministic_and_aligned() -> None:
    a, b = io.BytesIO(), io.BytesIO()
    size = sample().write(a)
    sample().write(b)
    assert a.getvalue() == b.getvalue()
    assert size == len(a.getvalue()) and size % 512 == 0
    assert a.getvalue().startswith(b"070701")


def test_bad_paths() -> None:
    arc = CpioArchive()
    for bad in ("", "/", "../x", "a/../../b"):
        with pytest.raises(ValueError):
            arc.add_file(bad, b"")


def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    buf = io.BytesIO()
    sample().write(buf)
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()}
    assert set(lines) == {"bin", "bin/sh", "dev", "dev/console", "init", "lib", "lib/modules",
                          "lib/modules/a.ko", "tmp"}
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["tmp"].startswith("drwxrwxrwt")
    assert lines["dev/console"].startswith("crw-------")
    assert "-> /bin/busybox" in lines["bin/sh"]
    # unpack (no device nodes as non-root is fine: only check files and links)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "init", "lib/modules/a.ko", "bin/sh"],
        input=buf.getvalue(), cwd=out, check=True,
    )
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "lib/modules/a.ko").read_bytes() == b"\0" * 1001
    assert (out / "bin/sh").readlink() == Path("/bin/busybox")
