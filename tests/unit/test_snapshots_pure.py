"""The pure parts of named snapshots: digests, space accounting, lineage, names, durations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmfork.errors import InvalidArgument
from vmfork.instances.snapshot_ops import MAX_COUNT, fork_names, parse_duration
from vmfork.snapshots.digest import BLOCK, file_digest
from vmfork.snapshots.lineage import Node, build, render
from vmfork.snapshots.space import Item, account


def test_digest_is_of_content_not_allocation(tmp_path: Path) -> None:
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as f:
        f.truncate(8 * BLOCK)
        f.seek(3 * BLOCK + 17)
        f.write(b"data")
    data = bytearray(8 * BLOCK)
    data[3 * BLOCK + 17 : 3 * BLOCK + 21] = b"data"
    dense.write_bytes(data)
    assert file_digest(sparse) == file_digest(dense)  # a hole and zeros hash alike
    data[5 * BLOCK] = 1
    dense.write_bytes(data)
    assert file_digest(sparse) != file_digest(dense)
    longer = tmp_path / "longer"
    longer.write_bytes(bytes(8 * BLOCK + 1))
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(8 * BLOCK))
    assert file_digest(longer) != file_digest(zeros)  # the size is part of it


def test_digest_sees_a_moved_block(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * BLOCK + bytes(BLOCK))
    b.write_bytes(bytes(BLOCK) + b"x" * BLOCK)
    assert file_digest(a) != file_digest(b)


def test_space_without_sharing_is_all_exclusive(tmp_path: Path) -> None:
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_bytes(os.urandom(1 << 20))
        os.fsync(os.open(tmp_path / n / "f", os.O_RDONLY))
    try:
        rep = account([Item("instance", n, n, tmp_path / n, [tmp_path / n / "f"]) for n in ("a", "b")])
    except OSError as e:  # pragma: no cover - a filesystem without FIEMAP (tmpfs)
        pytest.skip(f"no FIEMAP where the tests' temp dir is: {e}")
    if rep["totals"]["data_bytes"] == 0:
        pytest.skip("no FIEMAP extents where the tests' temp dir is (tmpfs)")
    for row in rep["items"]:
        assert row["logical_bytes"] == 1 << 20
        assert row["shared_bytes"] == 0 and row["exclusive_bytes"] == row["data_bytes"] == 1 << 20
        assert row["freed_by_rm_bytes"] == 1 << 20
    assert rep["totals"]["physical_bytes"] == 2 << 20


def test_lineage_keeps_deleted_ancestors() -> None:
    nodes = [
        Node("snapshot", "s1", "tpl", ("instance", "i0", "gone-src")),
        Node("instance", "i1", "fork-1", ("snapshot", "s1", "tpl"), info={"state": "running"}),
        Node("instance", "i2", "fork-2", ("snapshot", "s9", "removed-snap"), info={"state": "standby"}),
        Node("snapshot", "s8", "old", ("instance", "i0", "gone-src"), deleted=True),  # nothing from it
    ]
    roots = build(nodes)
    by_name = {r.name: r for r in roots}
    assert set(by_name) == {"gone-src", "removed-snap"}
    assert by_name["gone-src"].deleted and [c.name for c in by_name["gone-src"].children] == ["tpl"]
    assert [c.name for c in by_name["removed-snap"].children] == ["fork-2"]
    text = "\n".join(render(roots))
    assert "gone-src (deleted)" in text and "└── fork-1  [running]" in text and "old" not in text


def test_fork_names_and_limits() -> None:
    assert fork_names("web", None) == ["web"]
    assert fork_names("web", 3) == ["web-1", "web-2", "web-3"]
    assert len(fork_names("w", MAX_COUNT)) == MAX_COUNT
    for bad in (0, -1, MAX_COUNT + 1):
        with pytest.raises(InvalidArgument, match="--count"):
            fork_names("web", bad)
    with pytest.raises(InvalidArgument):
        fork_names("x" * 62, 10)  # x...-10 is longer than a name may be


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("7d") == 7 * 86400
    for bad in ("", "7", "d", "1.5h", "-1d", "3y"):
        with pytest.raises(InvalidArgument, match="invalid duration"):
            parse_duration(bad)
