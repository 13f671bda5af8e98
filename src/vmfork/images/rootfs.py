"""An unpacked image tree → one read-only root filesystem file (ext4 or erofs).

Chosen by measurement (docs/images.md): ext4 without a journal. The guest kernel has ext4
built in (no module to load at boot), and the build is as fast as erofs's within noise."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmfork.images.tools import run_tool

LABEL = "vmfork-image"  # the guest's stage-1 init finds the image disk by this label
FORMATS = ("ext4", "erofs")
DEFAULT_FORMAT = "ext4"


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of a tree, hard links counted once."""
    used = 0
    count = 1
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            count += 1
            if (st.st_dev, st.st_ino) in seen:
                continue
            if st.st_nlink > 1:
                seen.add((st.st_dev, st.st_ino))
            used += (st.st_size + 4095) // 4096 * 4096
        used += 4096 * len(dirnames)
    return used, count


def make_ext4(tree: Path, out: Path) -> None:
    used, count = tree_usage(tree)
    inodes = (count + 256 + 31) // 32 * 32
    size_mib = ((used + inodes * 256) * 6 // 5 + (8 << 20) + (1 << 20) - 1) >> 20
    run_tool(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-b", "4096", "-N", str(inodes), "-m", "0",
              "-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0",
              "-d", str(tree), str(out), f"{size_mib}M"], "mkfs.ext4 (image root filesystem)")
    if not (tree / "lost+found").exists():  # mkfs made it: the guest must see the image's tree only
        run_tool(["debugfs", "-w", "-R", "rmdir /lost+found", str(out)], "debugfs (image root filesystem)")


def make_erofs(tree: Path, out: Path, compress: str | None = None) -> None:
    run_tool(["mkfs.erofs", *([f"-z{compress}"] if compress else []), str(out), str(tree)],
             "mkfs.erofs (image root filesystem)")


def convert(tree: Path, out: Path, fmt: str = DEFAULT_FORMAT) -> float:
    """Write ``tree`` as a root filesystem of format ``fmt`` into ``out``; returns the seconds."""
    t0 = time.monotonic()
    if fmt == "ext4":
        make_ext4(tree, out)
    elif fmt == "erofs":
        make_erofs(tree, out)
    else:
        raise ValueError(f"unknown root filesystem format {fmt!r}")
    os.chmod(out, 0o644)
    return time.monotonic() - t0
