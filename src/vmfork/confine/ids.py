"""One unprivileged uid/gid per instance, unique on this host.

A uid is host-wide, and one host may hold several data dirs, so the claims live in one
host-wide registry (``/var/lib/vmfork/uids``, env ``VMFORK_UID_REGISTRY``), one file per
uid naming its owner (data dir + instance id), created and removed under an flock on the
registry. The instance records its uid in its own ``instance.json`` (the data dir's record);
the gid is the same number (a group of its own). A claim whose instance no longer exists
(its data dir or guest dir is gone, e.g. a deleted test dir) is stale and is taken over.

The range is ``VMFORK_UID_RANGE`` (``FIRST-LAST``, default 1500000000-1500999999): far above
login users, subordinate-id ranges (100000+) and systemd's dynamic users (61184-65519), below
2^31 (some tools read uids as signed). A uid that names a user in the passwd database is
never handed out.
"""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import InvalidArgument, VmforkError
from vmfork.locking import file_lock

DEFAULT_RANGE = (1_500_000_000, 1_500_999_999)


@dataclass(frozen=True)
class Owner:
    data_dir: str
    iid: str

    def exists(self) -> bool:
        guests = Path(self.data_dir) / "guests"
        return any((guests / f"{p}{self.iid}").exists() for p in ("", ".tmp-", ".trash-"))


def registry() -> Path:
    return Path(os.environ.get("VMFORK_UID_REGISTRY") or "/var/lib/vmfork/uids")


def uid_range() -> tuple[int, int]:
    text = os.environ.get("VMFORK_UID_RANGE", "")
    if not text:
        return DEFAULT_RANGE
    try:
        first_s, last_s = text.split("-", 1)
        first, last = int(first_s), int(last_s)
    except ValueError:
        raise InvalidArgument(f"invalid VMFORK_UID_RANGE '{text}': expected FIRST-LAST, e.g. 1500000000-1500999999") from None
    if not 1000 <= first <= last < 2**31 - 1:
        raise InvalidArgument(f"invalid VMFORK_UID_RANGE '{text}': need 1000 <= FIRST <= LAST < 2147483647")
    return first, last


def _read(path: Path) -> Owner | None:
    try:
        d = json.loads(path.read_text())
        return Owner(str(d["data_dir"]), str(d["id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def allocate(data_dir: Path, iid: str) -> int:
    """Claim a free uid for instance ``iid`` of ``data_dir`` (its existing claim, if any)."""
    reg = registry()
    reg.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = Owner(str(data_dir.resolve()), iid)
    first, last = uid_range()
    with file_lock(reg / ".lock", what="the uid registry", timeout=30):
        claimed = {}
        for f in reg.iterdir():
            if f.name.isdigit():
                claimed[int(f.name)] = f
        for uid, f in claimed.items():
            if _read(f) == me:
                return uid
        for uid in range(first, last + 1):
            f = reg / str(uid)
            if uid in claimed:
                owner = _read(f)
                if owner is not None and owner.exists():
                    continue
                f.unlink(missing_ok=True)  # stale: its instance is gone
            if _is_user(uid):
                continue
            tmp = reg / f".{uid}.tmp"
            tmp.write_text(json.dumps({"data_dir": me.data_dir, "id": iid}))
            os.rename(tmp, f)
            return uid
    raise VmforkError(f"no free uid left in {first}-{last} (VMFORK_UID_RANGE); remove instances or widen it")


def free(data_dir: Path, iid: str) -> None:
    """Drop every claim of instance ``iid`` of ``data_dir``."""
    reg = registry()
    if not reg.is_dir():
        return
    me = Owner(str(data_dir.resolve()), iid)
    with file_lock(reg / ".lock", what="the uid registry", timeout=30):
        for f in reg.iterdir():
            if f.name.isdigit() and _read(f) == me:
                f.unlink(missing_ok=True)


def owner_of(uid: int) -> Owner | None:
    return _read(registry() / str(uid))


def live_owners() -> set[str]:
    """Instance ids of every claim whose instance still exists."""
    reg = registry()
    out = set()
    for f in reg.iterdir() if reg.is_dir() else []:
        owner = _read(f) if f.name.isdigit() else None
        if owner is not None and owner.exists():
            out.add(owner.iid)
    return out
