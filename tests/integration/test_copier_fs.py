"""vmfork.forkvm.copier on real loop-mounted XFS (reflink), btrfs and ext4."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fsutil import (
    MiB,
    free_bytes,
    loop_fs,
    random_data_ranges,
    sha256_file,
    skip_unless_loop_fs,
    write_sparse_file,
)
from vmfork.forkvm import (
    CopyError,
    clone_file,
    clone_tree,
    sparse_copy_file,
)
from vmfork.fs import (
    allocated_bytes,
    filesystem_type,
    reflink_supported,
)

GiB = 1 << 30


@pytest.fixture
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A fresh loop filesystem: ``@pytest.mark.parametrize("fs", [("xfs", 600)], indirect=True)``."""
    kind, size_mb = request.param
    skip_unless_loop_fs(kind)
    with loop_fs(kind, size_mb, tmp_path / "images") as mnt:
        assert filesystem_type(mnt) == kind
        yield mnt


def make_guest(root: Path, size: int, ranges: list[tuple[int, int]]) -> int:
    root.mkdir()
    data = write_sparse_file(root / "mem", size, ranges)
    (root / "vmstate").write_bytes(os.urandom(300_000))
    (root / "config.json").write_text('{"memory": 1024}\n')
    os.symlink("mem", root / "mem-link")
    (root / "qemu.log").write_text("log\n")
    fd = os.open(root / "mem", os.O_RDONLY)
    try:
        os.fsync(fd)  # what standby does: the first FICLONE must not pay for writeback
    finally:
        os.close(fd)
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    "fs", [("xfs", 1200), ("btrfs", 1200)], indirect=True, ids=["xfs", "btrfs"]
)
def test_reflink_clone_shares_data(fs: Path) -> None:
    kind = filesystem_type(fs)
    assert reflink_supported(fs) is True
    assert sorted(p.name for p in fs.iterdir() if p.name.startswith(".vmfork")) == []
    src = fs / "src"
    data = make_guest(src, 1 * GiB, random_data_ranges(1 * GiB, 0.4, 1 * MiB, seed=1))
    digest = sha256_file(src / "mem")
    ino = (src / "mem").stat().st_ino

    free_before = free_bytes(fs)
    stats = clone_tree(src, fs / "dst")
    free_after = free_bytes(fs)
    used = free_before - free_after
    print(
        f"\n{kind}: 1 GiB mem with {data / MiB:.0f} MiB data cloned by {stats.method} in "
        f"{stats.seconds * 1e3:.1f} ms; free space {free_before / MiB:.1f} -> "
        f"{free_after / MiB:.1f} MiB (used {used / MiB:.2f} MiB); "
        f"bytes_data {stats.bytes_data / MiB:.1f} MiB; allocated(dst) {allocated_bytes(fs / 'dst') / MiB:.1f} MiB"
    )
    assert stats.method == "reflink"
    assert stats.reflinked == stats.files == 3 and stats.sparse_copied == 0
    assert stats.skipped == 1 and stats.symlinks == 1
    assert data <= stats.bytes_data <= data + 2 * MiB
    assert used < data / 50  # shared, not copied (XFS: ~0, btrfs: a little metadata)

    # isolation, both ways
    assert sha256_file(fs / "dst" / "mem") == digest
    with open(fs / "dst" / "mem", "r+b") as f:
        for off in (0, 100 * MiB, 700 * MiB, GiB - 4096):
            f.seek(off)
            f.write(b"clone wrote here" * 256)
    assert sha256_file(src / "mem") == digest
    assert (src / "mem").stat().st_ino == ino
    clone_digest = sha256_file(fs / "dst" / "mem")
    assert clone_digest != digest
    with open(src / "mem", "r+b") as f:
        f.seek(200 * MiB)
        f.write(b"source wrote here" * 256)
    assert sha256_file(fs / "dst" / "mem") == clone_digest

    # a clone of the clone
    stats2 = clone_tree(fs / "dst", fs / "dst2", fsync=True)
    assert stats2.method == "reflink"
    assert sha256_file(fs / "dst2" / "mem") == clone_digest

    # mode="reflink" works here, and single-file clone too
    assert clone_tree(src, fs / "dst3", mode="reflink").method == "reflink"
    assert clone_file(src / "vmstate", fs / "vmstate.copy", mode="reflink") == "reflink"


@pytest.mark.parametrize("fs", [("ext4", 600)], indirect=True, ids=["ext4"])
def test_no_reflink_on_ext4(fs: Path, tmp_path: Path) -> None:
    assert reflink_supported(fs) is False
    if filesystem_type(tmp_path) == "ext4":
        assert reflink_supported(tmp_path) is False
    src = fs / "src"
    data = make_guest(src, 256 * MiB, [(0, 4 * MiB), (100 * MiB, 130 * MiB)])

    with pytest.raises(CopyError) as info:
        clone_tree(src, fs / "dst", mode="reflink")
    print(f"\nmode=reflink on ext4: {info.value}")
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY)
    assert "reflink" in str(info.value) and "ext4" in str(info.value)
    assert not os.path.lexists(fs / "dst")
    with pytest.raises(CopyError):
        clone_file(src / "mem", fs / "mem2", mode="reflink")
    assert not os.path.lexists(fs / "mem2")

    stats = clone_tree(src, fs / "dst")
    assert stats.method == "sparse" and stats.reflinked == 0
    assert stats.bytes_data == data + 300_000 + len('{"memory": 1024}\n')
    assert sha256_file(fs / "dst" / "mem") == sha256_file(src / "mem")
    assert data <= allocated_bytes(fs / "dst" / "mem") <= data + MiB


@pytest.mark.parametrize("fs", [("ext4", 600)], indirect=True, ids=["ext4"])
def test_cross_filesystem_copy_keeps_holes(fs: Path, tmp_path: Path) -> None:
    # tmp_path -> loop fs: FICLONE gives EXDEV and copy_file_range may too
    # (then read/write is used); holes must survive either way.
    src = tmp_path / "src"
    data = make_guest(src, 512 * MiB, [(8 * MiB, 40 * MiB), (300 * MiB, 301 * MiB)])
    stats = clone_tree(src, fs / "dst")
    assert stats.method == "sparse"
    assert sha256_file(fs / "dst" / "mem") == sha256_file(src / "mem")
    assert data <= allocated_bytes(fs / "dst" / "mem") <= data + MiB


@pytest.mark.parametrize("fs", [("ext4", 64)], indirect=True, ids=["ext4-64M"])
@pytest.mark.parametrize("where", ["same-fs", "cross-fs"])
def test_enospc_removes_partial_destination(fs: Path, tmp_path: Path, where: str) -> None:
    if where == "same-fs":
        src_base, data_size = fs, 36 * MiB  # two copies do not fit into ~58 MiB
    else:
        src_base, data_size = tmp_path, 100 * MiB
    src = src_base / "src"
    src.mkdir()
    (src / "aaa-small").write_text("copied first\n")
    write_sparse_file(
        src / "mem", 2 * data_size, [(0, data_size // 2), (data_size, data_size * 3 // 2)]
    )
    digest = sha256_file(src / "mem")
    free_before = free_bytes(fs)

    with pytest.raises(CopyError) as info:
        clone_tree(src, fs / "dst")

    free_after = free_bytes(fs)
    print(
        f"\n{where}: {info.value}; free before {free_before / MiB:.1f} MiB, after {free_after / MiB:.1f} MiB"
    )
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith("no space left on device while copying ")
    assert str(src / "mem") in str(info.value)
    assert not os.path.lexists(fs / "dst")
    assert abs(free_after - free_before) < MiB  # the partial copy's blocks were freed
    assert sha256_file(src / "mem") == digest
    assert sorted(p.name for p in src.iterdir()) == ["aaa-small", "mem"]


@pytest.mark.slow
def test_two_gib_memory_file_xfs_vs_ext4(tmp_path: Path) -> None:
    """The figure that matters: a 2 GiB guest memory file with ~45% data."""
    skip_unless_loop_fs("xfs")
    skip_unless_loop_fs("ext4")
    size = 2 * GiB
    ranges = random_data_ranges(size, 0.45, 1 * MiB, seed=7)
    results = {}
    for kind, fs_mb in (("xfs", 3000), ("ext4", 3000)):
        with loop_fs(kind, fs_mb, tmp_path / "images") as mnt:
            src = mnt / "src"
            t0 = time.monotonic()
            data = make_guest(src, size, ranges)
            written = time.monotonic() - t0
            free_before = free_bytes(mnt)
            stats = clone_tree(src, mnt / "fork1")
            used = free_before - free_bytes(mnt)
            again = clone_tree(src, mnt / "fork2")
            results[kind] = (stats, again)
            print(
                f"\n{kind}: 2 GiB mem, {data / MiB:.0f} MiB data ({data / size:.0%}, "
                f"{len(ranges)} extents, written+fsynced in {written:.1f} s): "
                f"{stats.method} clone {stats.seconds * 1e3:.1f} ms, again "
                f"{again.seconds * 1e3:.1f} ms; disk used by one clone {used / MiB:.1f} MiB"
            )
            assert sha256_file(mnt / "fork1" / "mem") == sha256_file(src / "mem")
            if kind == "xfs":
                assert stats.method == "reflink"
                assert used < 8 * MiB
                assert stats.seconds < 0.5  # milliseconds in practice
            else:
                assert stats.method == "sparse"
                assert data <= used <= data + 32 * MiB
                assert stats.bytes_data == data + 300_000 + len('{"memory": 1024}\n')

    # sparse mode on XFS: never FICLONE (copy_file_range may still share extents)
    with loop_fs("xfs", 600, tmp_path / "images") as mnt:
        make_guest(mnt / "src", 256 * MiB, [(0, 64 * MiB)])
        stats = clone_tree(mnt / "src", mnt / "dst", mode="sparse")
        assert stats.method == "sparse" and stats.reflinked == 0
        assert sparse_copy_file(mnt / "src" / "mem", mnt / "mem2") == 64 * MiB
