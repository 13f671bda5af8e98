"""What a complete snapshot is, and whether it is still what was written.

At commit, ``manifest.json`` records the sizes and SHA-256 of ``state`` and ``config.json``
and the size of ``memory`` (hashing guest RAM would cost a read of all of it). It is
written last, once the state is complete: its presence in a standby under way is the sign
that the VMM has written everything it will write, so a crash from then on is rolled
forward. Restore and fork check it first, so a truncated mem-file or a flipped byte in the
state is refused with a short message instead of being copied or handed to the VMM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TYPE_CHECKING = False  # typing only for the type checker (see vmfork/__init__.py)
if TYPE_CHECKING:
    from typing import Any

MANIFEST = "manifest.json"
_HASHED = ("state", "config.json")


def _digest(path: Path) -> dict[str, Any]:
    import hashlib  # hashlib and util are imported on use: `ps` reads names and sizes only

    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def write_manifest(snap: Path, memory_bytes: int) -> None:
    """Record what ``snap`` holds (not durable: the snapshot commit fsyncs it)."""
    files: dict[str, Any] = {name: _digest(snap / name) for name in _HASHED}
    from vmfork import util

    files["memory"] = {"size": memory_bytes}
    util.atomic_write_json(snap / MANIFEST, {"format": 1, "files": files}, durable=False)


def has_manifest(snap: Path) -> bool:
    return (snap / MANIFEST).is_file()


def missing_files(snap: Path) -> list[str]:
    from vmfork.layout import SNAPSHOT_FILES

    return [f for f in SNAPSHOT_FILES if not (snap / f).is_file()]


def quick_problem(snap: Path, memory_bytes: int) -> str | None:
    """What is wrong with the snapshot in ``snap``, from names and sizes only (cheap)."""
    missing = missing_files(snap)
    if missing:
        return f"snapshot is incomplete: {', '.join(missing)} missing"
    size = (snap / "memory").stat().st_size
    if size != memory_bytes:
        return (f"snapshot is corrupt: its memory file holds {size} bytes, "
                f"the guest has {memory_bytes >> 20} MiB ({memory_bytes} bytes)")
    return None


def problem(snap: Path, memory_bytes: int) -> str | None:
    """What is wrong with the snapshot in ``snap`` (sizes, then the recorded digests)."""
    quick = quick_problem(snap, memory_bytes)
    if quick or not has_manifest(snap):
        return quick  # a snapshot of an earlier vmfork has no manifest: sizes only
    try:
        recorded = json.loads((snap / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"snapshot is corrupt: {MANIFEST} is unreadable ({e})"
    for name in _HASHED:
        want = recorded.get(name) if isinstance(recorded, dict) else None
        got = _digest(snap / name)
        if not isinstance(want, dict) or want.get("size") != got["size"]:
            return f"snapshot is corrupt: {name} is {got['size']} bytes, {want and want.get('size')} were written"
        if want.get("sha256") != got["sha256"]:
            return f"snapshot is corrupt: {name} does not match the digest recorded when it was taken"
    return None


def fsync_snapshot(snap: Path, *also: Path) -> None:
    """Make every file of ``snap`` durable (the memory file: only the pages dirtied since),
    ``snap`` itself and the files ``also``, all fsyncs issued together."""
    from vmfork import util

    util.fsync_together([*(snap / name for name in os.listdir(snap)), snap, *also])
