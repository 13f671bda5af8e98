"""Instance metadata as stored in ``guests/<id>/instance.json``."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vmfork.layout import GuestDir


@dataclass
class Instance:
    id: str
    name: str
    hypervisor: str
    accel: str
    memory_mib: int
    vcpus: int
    image_digest: str
    created_at: str
    mac: str
    cid: int
    parent_id: str | None = None
    parent_name: str | None = None
    identity_applied: bool = True  # False for a fork until its hostname etc. were set in the guest
    dir: Path = field(default=Path("."), compare=False)

    @property
    def g(self) -> GuestDir:
        return GuestDir(self.dir)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("dir")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], directory: Path) -> Instance:
        known = {f.name for f in fields(cls)} - {"dir"}
        return cls(**{k: v for k, v in d.items() if k in known}, dir=directory)


def new_mac() -> str:
    """A locally administered unicast MAC (QEMU's 52:54:00 prefix)."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
