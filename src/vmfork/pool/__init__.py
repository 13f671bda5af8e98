"""A warm pool: VMMs pre-started for the forks of one source, waiting for its state.

A slot is an instance-in-waiting in ``guests/<id>/`` (its final dir: a confined VMM sees its
guest dir at the path it was started in, so a slot is never renamed): the fork's own clones
of its source's disk and mem-file, its own CID, uid, cgroup and network namespace, and a
QEMU started on them with ``-incoming defer``. ``slot.json`` says it is a slot (``ps`` and
every instance lookup skip such a dir) and which snapshot of which source it was made for.
A fork to running claims a ready slot: its metadata is written and ``slot.json`` removed
(the commit point), then the source's device state is loaded into the waiting QEMU.

This module is light (``ps`` and recovery's check import it); the operations are in
``vmfork.pool.ops``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLOT = "slot.json"
STARTING, READY = "starting", "ready"


@dataclass
class Slot:
    iid: str
    dir: Path
    source_id: str
    source_name: str
    key: dict[str, Any]  # the source snapshot it was made for (``snapshot_key``)
    cid: int
    mac: str
    uid: int | None
    network: dict[str, Any] | None
    state: str  # starting, ready
    created_at: str

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("dir")
        return d

    @classmethod
    def load(cls, d: Path) -> Slot | None:
        """The slot in guest dir ``d`` (None: not a slot, or an unreadable marker)."""
        try:
            raw = json.loads((d / SLOT).read_text())
            return cls(dir=d, **{k: raw[k] for k in cls.__dataclass_fields__ if k != "dir"})
        except (OSError, ValueError, KeyError, TypeError):
            return None


def is_slot(d: Path) -> bool:
    return os.path.lexists(d / SLOT)


def slot_dirs(guests: Path) -> list[Path]:
    return [d for d in sorted(guests.iterdir()) if not d.name.startswith(".") and is_slot(d)] \
        if guests.is_dir() else []


def cids(guests: Path) -> set[int]:
    """The CIDs slots hold (a new instance must not take one)."""
    return {s.cid for s in (Slot.load(d) for d in slot_dirs(guests)) if s is not None}


def snapshot_key(snap: Path) -> dict[str, Any]:
    """What identifies one snapshot of a source: a new standby, restore or rollback makes
    another (new files, a new ``taken_at``), so a slot made for an older one is stale."""
    key: dict[str, Any] = {}
    try:
        key["taken_at"] = json.loads((snap / "config.json").read_text()).get("taken_at")
        for f in ("state", "memory"):
            st = os.stat(snap / f)
            key[f] = [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size]
    except (OSError, ValueError, AttributeError):
        return {}
    return key


def vmm_alive(d: Path) -> bool:
    from vmfork.procs import recorded

    return recorded(d / "run" / "vmm.json") is not None


def problem(slot: Slot | None, guests: Path) -> str | None:
    """Why a slot cannot be claimed as it is (recovery removes such a slot), or None.
    Whether its source's snapshot changed is checked by the claim (``ops``)."""
    if slot is None:
        return "unreadable slot marker"
    if slot.state != READY:
        return "unfinished"
    if os.path.lexists(slot.dir / "instance.json"):
        return "unfinished claim"
    if not (guests / slot.source_id).is_dir():
        return "its source is gone"
    if not vmm_alive(slot.dir):
        return "its VMM is gone"
    return None
