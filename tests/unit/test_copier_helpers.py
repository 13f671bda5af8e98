"""New copier helpers on whatever filesystem the tests run on (tmp dirs): fsync_tree,
extent_stats / has_shared_extents, the CoW extent size hint where there is none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmfork.forkvm.copier import (
    CopyError,
    clone_tree,
    fsync_tree,
)
from vmfork.fs import (
    cow_extent_size_hint,
    extent_stats,
    has_shared_extents,
    set_cow_extent_size_hint,
)


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x" * 10000)
    (root / "g").write_bytes(b"y")
    os.symlink("/nonexistent/target", root / "dangling")  # never followed


def test_fsync_tree_syncs_a_tree_without_following_symlinks(tmp_path: Path):
    _tree(tmp_path / "t")
    fsync_tree(tmp_path / "t")
    fsync_tree(tmp_path / "t", parent=False)


def test_fsync_tree_reports_a_missing_root(tmp_path: Path):
    with pytest.raises(CopyError, match="reading directory"):
        fsync_tree(tmp_path / "nope")


def test_clone_tree_with_fsync_still_copies_everything(tmp_path: Path):
    _tree(tmp_path / "src")
    stats = clone_tree(tmp_path / "src", tmp_path / "dst", fsync=True)
    assert stats.files == 2 and stats.symlinks == 1
    assert (tmp_path / "dst" / "a" / "b" / "f").read_bytes() == b"x" * 10000


def test_extent_stats_of_a_plain_file(tmp_path: Path):
    f = tmp_path / "f"
    f.write_bytes(os.urandom(64 * 1024))
    try:
        st = extent_stats(f)
    except OSError as e:
        pytest.skip(f"no FIEMAP here: {e}")
    assert st.count >= 1 and st.bytes >= 64 * 1024 and st.shared_bytes == 0
    assert st.exclusive_bytes == st.bytes
    assert has_shared_extents(f) is False


def test_has_shared_extents_is_false_when_unknowable(tmp_path: Path):
    assert has_shared_extents(tmp_path / "missing") is False


def test_no_hint_where_the_filesystem_has_none(tmp_path: Path):
    if cow_extent_size_hint(tmp_path) is not None:
        pytest.skip("the test tmp dir is on a filesystem with CoW extent size hints")
    assert set_cow_extent_size_hint(tmp_path, 4096) in (False, True)
    assert cow_extent_size_hint(tmp_path / "missing") is None
    assert set_cow_extent_size_hint(tmp_path / "missing", 4096) is False
