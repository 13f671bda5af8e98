"""Space accounting (``vmfork df``): what each instance, snapshot and image holds on disk.

For each item: its logical size (the sum of its file sizes), what is allocated for it
(``st_blocks``), and of its data extents (FIEMAP) how many bytes are shared with another
item or file (reflink clones) and how many are its own. ``freed_by_rm`` is what removing
it would give back: the physical bytes no other item and no other file refers to. On a
filesystem without reflinks (ext4) nothing is shared: every byte is exclusive.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork.fs import physical_extents


@dataclass
class Item:
    kind: str  # instance, snapshot, image
    name: str
    id: str
    root: Path
    files: list[Path] = field(default_factory=list)


def files_of(root: Path) -> list[Path]:
    out = []
    for d, _dirs, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    out.append(p)
            except OSError:
                continue
    return out


def account(items: list[Item]) -> dict[str, Any]:
    """One row per item plus the totals."""
    # (start, end, item index, shared flag) of every extent of every file
    spans: list[tuple[int, int, int, bool]] = []
    rows: list[dict[str, Any]] = []
    for idx, it in enumerate(items):
        logical = allocated = data = 0
        for f in it.files:
            try:
                st = os.lstat(f)
                ext = physical_extents(f)
            except OSError:
                continue
            logical += st.st_size
            allocated += st.st_blocks * 512
            for phys, length, shared in ext:
                if phys == 0 or length == 0:  # delayed or unknown: not on disk yet
                    continue
                spans.append((phys, phys + length, idx, shared))
                data += length
        rows.append({"kind": it.kind, "name": it.name, "id": it.id, "dir": str(it.root),
                     "logical_bytes": logical, "allocated_bytes": allocated, "data_bytes": data,
                     "shared_bytes": 0, "exclusive_bytes": 0, "freed_by_rm_bytes": 0})
    # Sweep the physical address space: who refers to each piece of it.
    events: list[tuple[int, int, int, bool]] = []  # (offset, +1/-1, item, flag)
    for start, end, idx, shared in spans:
        events.append((start, 1, idx, shared))
        events.append((end, -1, idx, shared))
    events.sort(key=lambda e: (e[0], e[1]))
    active: dict[int, int] = {}  # item -> references open at this offset
    flagged: dict[int, int] = {}  # item -> of those, extents FIEMAP marks shared
    used = 0
    pos = 0
    for off, delta, idx, shared in events:
        if off > pos and active:
            length = off - pos
            used += length
            owners = [i for i, n in active.items() if n > 0]
            for i in owners:
                refs = active[i]
                other = len(owners) > 1 or (flagged.get(i, 0) > 0 and refs == 1)
                key = "shared_bytes" if other else "exclusive_bytes"
                rows[i][key] += length * refs
                if len(owners) == 1 and not (flagged.get(i, 0) > 0 and refs == 1):
                    rows[i]["freed_by_rm_bytes"] += length
        pos = off
        active[idx] = active.get(idx, 0) + delta
        if shared:
            flagged[idx] = flagged.get(idx, 0) + delta
        if active[idx] == 0:
            del active[idx]
            flagged.pop(idx, None)
    totals = {k: sum(r[k] for r in rows) for k in ("logical_bytes", "allocated_bytes", "data_bytes")}
    totals["physical_bytes"] = used  # distinct bytes on disk, shared ones counted once
    return {"items": rows, "totals": totals}
