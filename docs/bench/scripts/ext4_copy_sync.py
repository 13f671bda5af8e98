"""A guest-like dir (2 GiB mem-file with 600 MiB of data in 1 MiB extents, a 4 GiB data disk
with 40 MiB, state, config) cloned on a filesystem, interleaved: vmfork's copier + an fsync
per file (what a fork does), the copier + fsyncs in parallel threads, the copier + one
syncfs, and `cp -a --reflink=never` + `sync -f`.

    python ext4_copy_sync.py DIR [RUNS]
"""

import ctypes
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vmfork.forkvm.copier import clone_tree, fsync_tree
from vmfork.util import fsync_dir, fsync_file

libc = ctypes.CDLL(None, use_errno=True)


def make_source(src: Path) -> None:
    snap = src / "snapshots" / "snapshot-latest"
    snap.mkdir(parents=True)
    rnd = random.Random(1)
    blk = os.urandom(1 << 20)
    for path, size_mib, data_mib in ((snap / "memory", 2048, 600), (src / "disk.raw", 4096, 40)):
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
            for i in rnd.sample(range(size_mib), data_mib):
                f.seek(i << 20)
                f.write(blk)
    (snap / "state").write_bytes(os.urandom(60 << 10))
    (snap / "config.json").write_text("{}")
    os.sync()


def parallel_fsyncs(dst: Path) -> None:
    files, dirs = [], []
    for dp, _, fn in os.walk(dst):
        dirs.append(dp)
        files += [os.path.join(dp, f) for f in fn]
    threads = [threading.Thread(target=fsync_file, args=(Path(f),)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in reversed(dirs):
        fsync_dir(Path(d))


def syncfs(dst: Path) -> None:
    fd = os.open(dst, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


def main() -> None:
    base = Path(sys.argv[1])
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    src = base / "src"
    if not src.exists():
        make_source(src)
    ways: dict[str, Callable[[Path], None]] = {
        "copier + fsync per file": lambda d: (clone_tree(src, d), fsync_tree(d, parent=False)),
        "copier + parallel fsyncs": lambda d: (clone_tree(src, d), parallel_fsyncs(d)),
        "copier + syncfs": lambda d: (clone_tree(src, d), syncfs(d)),
        "cp -a + sync -f": lambda d: (
            subprocess.run(["cp", "-a", "--reflink=never", str(src), str(d)], check=True),
            subprocess.run(["sync", "-f", str(d)], check=True)),
    }
    ms: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(runs):
        for k, way in ways.items():
            dst = base / "dst"
            os.sync()
            t0 = time.monotonic()
            way(dst)
            ms[k].append((time.monotonic() - t0) * 1000)
            shutil.rmtree(dst)
    for k, v in ms.items():
        print(f"{k:26} median {statistics.median(v):6.0f} ms [{min(v):.0f}-{max(v):.0f}]")


if __name__ == "__main__":
    main()
