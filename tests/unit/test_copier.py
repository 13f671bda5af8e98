"""vmfork.forkvm.copier on the filesystem of tmp_path (ext4 here: no reflinks)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.fsutil import MiB, sha256_file, write_sparse_file
from vmfork.errors import VmforkError
from vmfork.forkvm import (
    CopyError,
    CopyStats,
    clone_file,
    clone_tree,
    default_skip,
    sparse_copy_file,
)
from vmfork.fs import (
    allocated_bytes,
    filesystem_type,
    reflink_supported,
)

# holes at the start, in the middle and at the end
MEM_SIZE = 64 * MiB
MEM_RANGES = [(4 * MiB, 12 * MiB), (30 * MiB, 31 * MiB), (40 * MiB, 40 * MiB + 4096)]
MEM_DATA = sum(e - s for s, e in MEM_RANGES)


def expected_method(directory: Path) -> str:
    return "reflink" if reflink_supported(directory) else "sparse"


def make_guest_tree(root: Path) -> dict[str, int]:
    """A guest-like directory; returns {relative path: mode} of what must be cloned."""
    root.mkdir()
    write_sparse_file(root / "mem", MEM_SIZE, MEM_RANGES)
    (root / "config.json").write_text('{"memory": 256}\n')
    (root / "config.json").chmod(0o640)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty").touch()
    (root / "disk").mkdir(mode=0o750)
    (root / "disk").chmod(0o750)
    write_sparse_file(root / "disk" / "root.img", 16 * MiB, [(0, 1 * MiB), (8 * MiB, 9 * MiB)])
    (root / "disk" / "nested" / "deep").mkdir(parents=True)
    (root / "disk" / "nested" / "deep" / "file.bin").write_bytes(os.urandom(10000))
    (root / "disk" / "nested" / "deep" / "file.bin").chmod(0o600)
    (root / "ro").mkdir()
    (root / "ro" / "inside").write_text("read-only dir content\n")
    (root / "ro").chmod(0o555)
    os.symlink("mem", root / "mem-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("disk", root / "dir-link")
    # things that must be skipped
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "qmp.sock"))
    sock.close()
    os.mkfifo(root / "serial.fifo")
    (root / "console.log").write_text("boot log\n")
    (root / "vm.pid").write_text("1234\n")
    (root / "instance.lock").touch()
    (root / "logs").mkdir()
    (root / "logs" / "qemu.txt").write_text("x\n")
    (root / "disk" / "agent.sock").write_text("not a socket, skipped by name\n")
    # an old mtime on files and directories, to see it preserved
    for path in (root / "config.json", root / "disk" / "nested", root / "mem"):
        os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.utime(
        root / "mem-link", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9), follow_symlinks=False
    )

    kept = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if default_skip(rel, os.lstat(path)) or rel.parts[0] == "logs":
                continue
            kept[str(rel)] = os.lstat(path).st_mode
    return kept


def listing(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = os.lstat(path).st_mode
    return out


def test_clone_tree_copies_everything_that_matters(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    kept = make_guest_tree(src)
    before = {rel: sha256_file(src / rel) for rel, m in kept.items() if stat.S_ISREG(m)}

    stats = clone_tree(src, dst)

    print(f"\n{filesystem_type(tmp_path)}: {stats}")
    assert isinstance(stats, CopyStats)
    assert stats.method == expected_method(tmp_path)
    # the same entries with the same types and modes; skipped ones are absent
    assert listing(dst) == kept
    for name in ("qmp.sock", "serial.fifo", "console.log", "vm.pid", "instance.lock", "logs"):
        assert not os.path.lexists(dst / name), name
    assert not (dst / "disk" / "agent.sock").exists()
    assert stats.skipped == 7
    assert stats.files == 7
    assert stats.symlinks == 4
    assert stats.dirs == 4  # disk, disk/nested, disk/nested/deep, ro (dst itself not counted)
    assert stats.reflinked + stats.sparse_copied == stats.files
    assert stats.bytes_logical == sum(os.lstat(src / r).st_size for r in before)
    assert stats.seconds > 0

    # bytewise equal, distinct inodes
    for rel, digest in before.items():
        assert sha256_file(dst / rel) == digest, rel
        assert os.stat(dst / rel).st_ino != os.stat(src / rel).st_ino
    # mode and mtime kept (files, dirs, the top dir itself)
    for rel in [*kept, "."]:
        s, d = os.lstat(src / rel), os.lstat(dst / rel)
        assert stat.S_IMODE(d.st_mode) == stat.S_IMODE(s.st_mode), rel
        assert d.st_mtime_ns == s.st_mtime_ns, rel
    # symlinks copied as symlinks, never followed
    for name, target in [
        ("mem-link", "mem"),
        ("abs-link", "/etc/hostname"),
        ("dangling", "does/not/exist"),
        ("dir-link", "disk"),
    ]:
        assert (dst / name).is_symlink()
        assert os.readlink(dst / name) == target

    # holes preserved: only the data is allocated, at the same offsets
    alloc = allocated_bytes(dst / "mem")
    print(
        f"mem: logical {MEM_SIZE >> 20} MiB, data {MEM_DATA / MiB:.2f} MiB, dst allocated {alloc / MiB:.2f} MiB"
    )
    assert MEM_DATA <= alloc <= MEM_DATA + 1 * MiB
    assert (dst / "mem").stat().st_size == MEM_SIZE
    fd = os.open(dst / "mem", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 4 * MiB  # hole at the start
        assert os.lseek(fd, 4 * MiB, os.SEEK_HOLE) == 12 * MiB  # hole in the middle
        with pytest.raises(OSError) as info:  # hole at the end
            os.lseek(fd, 40 * MiB + 4096, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    if stats.method == "sparse":
        assert stats.bytes_data == MEM_DATA + 2 * MiB + 10000 + sum(
            os.lstat(src / r).st_size for r in ("config.json", "run.sh", "ro/inside")
        )
    assert allocated_bytes(dst) < 2 * (MEM_DATA + 2 * MiB)

    # writing to the clone never changes the source
    with open(dst / "mem", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"X" * 8192)
        f.seek(20 * MiB)  # into a hole
        f.write(b"Y" * 4096)
    (dst / "config.json").write_text("changed\n")
    (dst / "disk" / "nested" / "deep" / "file.bin").unlink()
    for rel, digest in before.items():
        assert sha256_file(src / rel) == digest, rel
    assert sha256_file(dst / "mem") != before["mem"]


def test_clone_tree_sparse_mode_and_fsync(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_guest_tree(src)
    stats = clone_tree(src, tmp_path / "dst", mode="sparse", fsync=True)
    assert stats.method == "sparse"
    assert stats.reflinked == 0 and stats.sparse_copied == stats.files == 7
    assert sha256_file(tmp_path / "dst" / "mem") == sha256_file(src / "mem")


def test_clone_tree_custom_skip_and_empty(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_guest_tree(src)
    seen: list[Path] = []

    def skip_files(rel: Path, st: os.stat_result) -> bool:
        seen.append(rel)
        return not stat.S_ISDIR(st.st_mode)

    stats = clone_tree(src, tmp_path / "dst", skip=skip_files)
    assert stats.method == "empty" and stats.files == 0 and stats.symlinks == 0
    assert Path("disk/nested/deep/file.bin") in seen
    assert Path("logs/qemu.txt") in seen  # custom skip: the logs dir is entered
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["disk", "logs", "ro"]

    empty = tmp_path / "empty-src"
    empty.mkdir()
    stats = clone_tree(empty, tmp_path / "empty-dst")
    assert stats.method == "empty" and stats.files == stats.dirs == 0
    assert list((tmp_path / "empty-dst").iterdir()) == []


def test_destination_must_not_exist(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_guest_tree(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("mine\n")
    with pytest.raises(CopyError) as info:
        clone_tree(src, dst)
    assert info.value.errno == errno.EEXIST
    assert "already exists" in str(info.value) and str(dst) in str(info.value)
    assert (dst / "keep").read_text() == "mine\n"  # not removed: not ours

    os.symlink("nowhere", tmp_path / "dangling")
    with pytest.raises(CopyError) as info:
        clone_tree(src, tmp_path / "dangling")
    assert info.value.errno == errno.EEXIST

    (tmp_path / "file").write_text("x")
    for fn in (clone_file, sparse_copy_file):
        with pytest.raises(CopyError) as info:
            fn(src / "config.json", tmp_path / "file")
        assert info.value.errno == errno.EEXIST
    assert (tmp_path / "file").read_text() == "x"


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(CopyError) as info:
        clone_tree(tmp_path / "missing", tmp_path / "dst")
    assert info.value.errno == errno.ENOENT and "missing" in str(info.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CopyError) as info:
        clone_tree(tmp_path / "f", tmp_path / "dst")
    assert info.value.errno == errno.ENOTDIR
    (tmp_path / "d").mkdir()
    with pytest.raises(CopyError) as info:
        clone_tree(tmp_path / "d", tmp_path / "d" / "inner")
    assert info.value.errno == errno.EINVAL
    assert not (tmp_path / "d" / "inner").exists()
    with pytest.raises(CopyError):
        clone_file(tmp_path / "d", tmp_path / "d2")
    with pytest.raises(CopyError) as info:
        clone_tree(tmp_path / "d", tmp_path / "no" / "parent")
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, VmforkError)


def test_partial_destination_removed_on_failure(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_guest_tree(src)
    before = listing(src)
    digest = sha256_file(src / "mem")
    calls = 0

    def skip_then_fail(rel: Path, st: os.stat_result) -> bool:
        nonlocal calls
        calls += 1
        if rel == Path("run.sh"):  # after disk/, mem, ro/ ... were copied (sorted walk)
            assert (dst / "mem").exists() and (dst / "disk" / "root.img").exists()
            raise RuntimeError("interrupted")
        return default_skip(rel, st)

    with pytest.raises(RuntimeError, match="interrupted"):
        clone_tree(src, dst, skip=skip_then_fail)
    assert calls > 5
    assert not os.path.lexists(dst)
    assert listing(src) == before
    assert sha256_file(src / "mem") == digest


def _clone_as_nobody(src: Path, dst: Path) -> dict[str, object]:
    """Run clone_tree in a forked child with uid/gid 65534, report the outcome."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                clone_tree(src, dst)
                result: dict[str, object] = {"ok": True}
            except CopyError as exc:
                result = {"ok": False, "errno": exc.errno, "message": str(exc)}
            result["dst_exists"] = os.path.lexists(dst)
            os.write(write_fd, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "child failed"
    loaded: dict[str, object] = json.loads(data)
    return loaded


def test_os_error_is_copy_error_and_partial_destination_removed() -> None:
    # A real EACCES: an unreadable file, cloned by an unprivileged user.
    base = Path(tempfile.mkdtemp(prefix="vmfork-copier-"))
    try:
        base.chmod(0o755)
        src = base / "src"
        src.mkdir()
        write_sparse_file(src / "a-mem", 8 * MiB, [(0, 2 * MiB)])
        (src / "b-dir").mkdir()
        (src / "b-dir" / "ok").write_text("fine\n")
        (src / "c-secret").write_text("secret\n")
        # readable by everyone but c-secret, whatever umask an earlier test left this process
        for p in (src, src / "b-dir"):
            p.chmod(0o755)
        for f in (src / "a-mem", src / "b-dir" / "ok"):
            f.chmod(0o644)
        (src / "c-secret").chmod(0)
        out = base / "out"
        out.mkdir()
        dst = out / "dst"
        if os.geteuid() == 0:
            os.chown(out, 65534, 65534)
            result = _clone_as_nobody(src, dst)
        else:
            try:
                clone_tree(src, dst)
                result = {"ok": True}
            except CopyError as exc:
                result = {"ok": False, "errno": exc.errno, "message": str(exc)}
            result["dst_exists"] = os.path.lexists(dst)
        print(f"\n{result}")
        assert result["ok"] is False
        assert result["errno"] == errno.EACCES
        assert result["message"] == f"permission denied while opening {src / 'c-secret'}"
        assert result["dst_exists"] is False
        assert (src / "a-mem").stat().st_size == 8 * MiB
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_sparse_copy_file_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "big"
    size = 256 * MiB
    data = write_sparse_file(src, size, [(1 * MiB, 3 * MiB), (100 * MiB, 101 * MiB)])
    src.chmod(0o604)
    copied = sparse_copy_file(src, tmp_path / "copy")
    assert copied == data == 3 * MiB
    assert sha256_file(tmp_path / "copy") == sha256_file(src)
    assert (tmp_path / "copy").stat().st_size == size
    assert data <= allocated_bytes(tmp_path / "copy") <= data + MiB
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o604
    assert (tmp_path / "copy").stat().st_mtime_ns == src.stat().st_mtime_ns

    # all holes, and no data at all
    write_sparse_file(tmp_path / "holes", 10 * MiB, [])
    assert sparse_copy_file(tmp_path / "holes", tmp_path / "holes2") == 0
    assert (tmp_path / "holes2").stat().st_size == 10 * MiB
    assert allocated_bytes(tmp_path / "holes2") == 0


def test_clone_file(tmp_path: Path) -> None:
    src = tmp_path / "f"
    write_sparse_file(src, 8 * MiB, [(4 * MiB, 5 * MiB)])
    assert clone_file(src, tmp_path / "g") == expected_method(tmp_path)
    assert clone_file(src, tmp_path / "h", mode="sparse") == "sparse"
    assert sha256_file(tmp_path / "g") == sha256_file(tmp_path / "h") == sha256_file(src)
    with pytest.raises(ValueError):
        clone_file(src, tmp_path / "i", mode="copy")  # type: ignore[arg-type]


def test_default_skip(tmp_path: Path) -> None:
    (tmp_path / "f").touch()
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "fifo")
    reg, dir_, fifo = (os.lstat(tmp_path / n) for n in ("f", "d", "fifo"))
    assert default_skip(Path("qmp.sock"), reg)
    assert default_skip(Path("vm.pid"), reg)
    assert default_skip(Path("x/y.lock"), reg)
    assert default_skip(Path("serial.log"), reg)
    assert default_skip(Path("anything"), fifo)
    assert default_skip(Path("logs"), dir_)
    assert not default_skip(Path("disk/logs"), dir_)  # only the top-level logs dir
    assert not default_skip(Path("logs"), reg)
    assert not default_skip(Path("mem"), reg)
    assert not default_skip(Path("vmstate"), reg)
    assert not default_skip(Path("disk"), dir_)
    assert not default_skip(Path("catalog"), reg)


def test_filesystem_type_and_allocated_bytes(tmp_path: Path) -> None:
    fstype = filesystem_type(tmp_path)
    findmnt = shutil.which("findmnt")
    if findmnt:
        expected = subprocess.run(
            [findmnt, "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert fstype == expected
    assert filesystem_type(tmp_path / "not" / "yet") == fstype
    assert filesystem_type(Path("/proc/self")) == "proc"
    if fstype == "ext4":
        assert reflink_supported(tmp_path) is False
    assert list(tmp_path.iterdir()) == []  # the probe cleaned up

    (tmp_path / "t").mkdir()
    write_sparse_file(tmp_path / "t" / "a", 10 * MiB, [(0, MiB)])
    (tmp_path / "t" / "sub").mkdir()
    write_sparse_file(tmp_path / "t" / "sub" / "b", 10 * MiB, [(MiB, 3 * MiB)])
    os.symlink("/usr", tmp_path / "t" / "usr")  # not followed
    total = allocated_bytes(tmp_path / "t")
    assert 3 * MiB <= total <= 3 * MiB + 64 * 1024
    assert allocated_bytes(tmp_path / "t" / "a") == MiB
