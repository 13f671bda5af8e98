"""Instance metadata as stored in ``guests/<id>/instance.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vmfork.layout import GuestDir

TYPE_CHECKING = False  # typing only for the type checker (see vmfork/__init__.py)
if TYPE_CHECKING:
    from typing import Any

# Typed fields a readable instance.json must have (the others have defaults).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str, "name": str, "hypervisor": str, "accel": str, "memory_mib": int, "vcpus": int,
    "image_digest": str, "created_at": str, "mac": str, "cid": int,
}
_NAME_IN_TEXT = re.compile(rb'"name"\s*:\s*"([a-z0-9][a-z0-9-]{0,62})"')


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
    # An unfinished creation ("running", "stopped"): run or fork was still bringing the new
    # instance to this state. Cleared once done; a crashed creation is rolled back.
    pending: str | None = None
    # "snapshot" when parent_id names a named snapshot (snapshots/<id>), not an instance.
    parent_kind: str | None = None
    # The named snapshot this instance's state last came from or was last taken as (lineage).
    head_snapshot_id: str | None = None
    head_snapshot_name: str | None = None
    # A fork made with --count: the batch it belongs to (all of it is committed, or none).
    batch: str | None = None
    # Confinement: the VMM's own uid (= gid), allocated at its first start (a fork gets its
    # own), and the resource limits asked for at creation (forks keep their source's).
    uid: int | None = None
    limits: dict[str, Any] | None = None
    # The network asked for (vmfork.network.NetSpec as JSON); None: no network. A fork keeps
    # its source's policy, never its published host ports.
    network: dict[str, Any] | None = None
    # An OCI image guest (vmfork run --image): the image (ref, digest, fs) and its main
    # process as resolved at run (argv, env, workdir, uid, gid, gids). Forks keep it.
    oci: dict[str, Any] | None = None
    dir: Path = field(default=Path("."), compare=False)
    # Not stored: why this instance cannot be used (unreadable metadata), if it cannot.
    problem: str | None = field(default=None, compare=False)

    @property
    def g(self) -> GuestDir:
        return GuestDir(self.dir)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("dir")
        d.pop("problem")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], directory: Path) -> Instance:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        for key, typ in _REQUIRED.items():
            if key not in d:
                raise ValueError(f"'{key}' is missing")
            if not isinstance(d[key], typ) or isinstance(d[key], bool):
                raise ValueError(f"'{key}' is {type(d[key]).__name__}, not {typ.__name__}")  # type: ignore[union-attr]
        if d["id"] != directory.name and not directory.name.startswith("."):
            raise ValueError(f"'id' is {d['id']!r} but the directory is {directory.name!r}")
        known = {f.name for f in fields(cls)} - {"dir", "problem"}
        return cls(**{k: v for k, v in d.items() if k in known}, dir=directory)

    @classmethod
    def load(cls, directory: Path) -> Instance:
        """The instance in ``directory``; one whose metadata is unreadable comes back with a
        ``problem``, its id from the directory and its name found in the text if it can be
        (so that the name stays taken and the instance can be listed and removed)."""
        path = directory / "instance.json"
        try:
            raw = path.read_bytes()
        except OSError as e:
            return cls._broken(directory, b"", f"instance.json cannot be read: {e.strerror}")
        try:
            return cls.from_json(json.loads(raw), directory)
        except (ValueError, TypeError) as e:
            return cls._broken(directory, raw, f"instance.json is invalid: {e}")

    @classmethod
    def _broken(cls, directory: Path, raw: bytes, why: str) -> Instance:
        m = _NAME_IN_TEXT.search(raw)
        name = m.group(1).decode() if m else directory.name
        return cls(id=directory.name, name=name, hypervisor="qemu", accel="", memory_mib=0, vcpus=0,
                   image_digest="", created_at="", mac="", cid=0, dir=directory, problem=why)


def new_mac() -> str:
    """A locally administered unicast MAC (QEMU's 52:54:00 prefix)."""
    import secrets  # not on the path of read-only commands

    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
