"""Named, immutable snapshots under ``<data-dir>/snapshots/<id>/``.

    snapshots/<id>/snapshot.json   metadata: name, source, parent, created, image, sizes, digests
    snapshots/<id>/memory          guest RAM (a copy-on-write clone: never any VMM's RAM file)
    snapshots/<id>/state           the VMM's device state
    snapshots/<id>/config.json     the VMM configuration it must be restored with
    snapshots/<id>/manifest.json   the cheap check (instances.integrity), as in any snapshot
    snapshots/<id>/disk.raw        a copy-on-write clone of the instance's disk at that moment
    snapshots/.tmp-<id>/           one being built (create, import); removed by recovery
    snapshots/.trash-<id>/         one being removed; removed by recovery

A snapshot is built in ``.tmp-<id>`` and committed by one rename; it is never written after
that. Nothing runs on its files: forks and rollbacks get clones of them (QEMU writes the
guest's RAM into the file it runs on). Removing one never touches what was made from it.
This module knows files only; the Manager (instances/) does what involves an instance.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmfork import util
from vmfork.errors import AlreadyExists, InvalidArgument, NotFound, VmforkError, WrongState
from vmfork.locking import file_lock, release, try_lock
from vmfork.snapshots.digest import file_digest

META = "snapshot.json"
#: The files of a snapshot, each with a recorded size and digest.
FILES = ("memory", "state", "config.json", "disk.raw")
LOCK_TIMEOUT = float(os.environ.get("VMFORK_LOCK_TIMEOUT", "60"))


class SnapshotCorrupt(WrongState):
    """A snapshot's files are not what was recorded when it was taken."""


@dataclass
class Snapshot:
    id: str
    name: str
    created_at: str
    source_id: str  # the instance it was taken of (may be gone)
    source_name: str
    hypervisor: str
    memory_mib: int
    vcpus: int
    accel: str
    image_digest: str
    vmm_version: str = ""
    parent_id: str | None = None  # the snapshot the source was made from when this was taken
    parent_name: str | None = None
    live: bool = False  # taken of a running instance
    pause_ms: float | None = None  # how long that instance was paused for it
    limits: dict[str, Any] | None = None  # the source's resource limits (forks keep them)
    oci: dict[str, Any] | None = None  # the source's OCI image and main process (forks keep them)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = 1
    dir: Path = field(default=Path("."), compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("dir")
        return d

    @classmethod
    def from_json(cls, d: Any, directory: Path) -> Snapshot:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        for key, typ in (("id", str), ("name", str), ("source_id", str), ("memory_mib", int),
                         ("hypervisor", str), ("image_digest", str), ("files", dict)):
            if not isinstance(d.get(key), typ):
                raise ValueError(f"'{key}' is missing or not a {typ.__name__}")
        known = set(cls.__dataclass_fields__) - {"dir"}
        return cls(**{k: v for k, v in d.items() if k in known}, dir=directory)

    @property
    def logical_bytes(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())


class Store:
    """The snapshots of one data dir."""

    def __init__(self, root: Path, locks: Path) -> None:
        self.root = root
        self.locks = locks

    def ensure(self) -> Store:
        self.root.mkdir(0o700, exist_ok=True)
        return self

    # --- locks ------------------------------------------------------------------------------
    def lock(self) -> contextlib.AbstractContextManager[int]:
        """The store's lock: names are checked and snapshots committed or removed under it."""
        return file_lock(self.locks / "snapshots.lock", what="the snapshot store", timeout=LOCK_TIMEOUT)

    def using(self, snap: Snapshot) -> contextlib.AbstractContextManager[int]:
        """The lock of one snapshot: held while it is read for a fork, an export or a verify,
        and by its removal."""
        return file_lock(self.locks / f"snap-{snap.id}.lock", what=f"snapshot '{snap.name}'",
                         timeout=LOCK_TIMEOUT)

    # --- lookup -----------------------------------------------------------------------------
    def all(self) -> list[Snapshot]:
        out = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                out.append(Snapshot.from_json(util.read_json(d / META), d))
            except (OSError, ValueError, TypeError) as e:
                out.append(_broken(d, f"{META} is unreadable: {e}"))
        return sorted(out, key=lambda s: (s.created_at, s.name))

    def find(self, ref: str) -> Snapshot:
        for s in self.all():
            if ref in (s.name, s.id):
                return s
        raise NotFound(f"snapshot '{ref}' not found")

    def check_name_free(self, name: str) -> None:
        for s in self.all():
            if s.name == name:
                raise AlreadyExists(f"snapshot '{name}' already exists (id {s.id})")

    def new_id(self) -> str:
        while True:
            sid = util.new_id()
            if not any((self.root / p).exists() for p in (sid, f".tmp-{sid}", f".trash-{sid}")):
                return sid

    # --- build and commit -------------------------------------------------------------------
    @contextlib.contextmanager
    def building(self, sid: str) -> Iterator[Path]:
        """A temp dir for snapshot ``sid``, removed unless committed."""
        tmp = self.root / f".tmp-{sid}"
        tmp.mkdir(0o700)
        lock_path = self.locks / f"snap-{sid}.lock"
        fd = try_lock(lock_path, create=True)  # recovery leaves a tmp dir alone while held
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if fd is not None:
                release(fd, lock_path, remove=not (self.root / sid).exists())

    def commit(self, tmp: Path, snap: Snapshot) -> Snapshot:
        """Record digests, write the metadata, make it durable and rename it into place."""
        from vmfork.forkvm.copier import fsync_tree

        snap.files = {f: file_digest(tmp / f) for f in FILES}
        util.atomic_write_json(tmp / META, snap.to_json(), durable=False)
        fsync_tree(tmp, parent=False)
        util.crashpoint("snapshot:before-rename")
        with self.lock():
            self.check_name_free(snap.name)
            os.rename(tmp, self.root / snap.id)
            util.fsync_dir(self.root)
        snap.dir = self.root / snap.id
        return snap

    @property
    def removed_dir(self) -> Path:
        """Metadata of removed snapshots (no files): lineage keeps showing them as deleted."""
        return self.root / ".removed"

    def removed(self) -> list[Snapshot]:
        out = []
        for f in sorted(self.removed_dir.glob("*.json")) if self.removed_dir.is_dir() else []:
            try:
                out.append(Snapshot.from_json(util.read_json(f), f))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def rm(self, ref: str) -> Snapshot:
        snap = self.find(ref)
        with self.using(snap), self.lock():
            if snap.format == 1:
                self.removed_dir.mkdir(0o700, exist_ok=True)
                util.atomic_write_json(self.removed_dir / f"{snap.id}.json", snap.to_json(), durable=False)
            trash = self.root / f".trash-{snap.id}"
            os.rename(snap.dir, trash)
            util.fsync_dir(self.root)
            util.crashpoint("snapshot-rm:renamed")
            shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.locks / f"snap-{snap.id}.lock").unlink()
        return snap

    def recover(self) -> list[str]:
        """Remove what a crashed create, import or rm left (temp and trash dirs no live
        vmfork holds the lock of)."""
        actions = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not d.name.startswith((".tmp-", ".trash-", ".import-")):
                continue
            sid = d.name.split("-", 1)[1]
            lock_path = self.locks / f"snap-{sid}.lock"
            fd = try_lock(lock_path, create=True)
            if fd is None:
                continue
            try:
                shutil.rmtree(d, ignore_errors=True)
                actions.append(f"removed unfinished snapshot {d.name}")
            finally:
                release(fd, lock_path, remove=True)
        return actions

    # --- integrity --------------------------------------------------------------------------
    def quick_problem(self, snap: Snapshot) -> str | None:
        """Sizes of every file and the digest of the small ones (state, config.json): what a
        fork and a rollback check every time."""
        from vmfork.instances import integrity

        if snap.files == {} or snap.format != 1:
            return f"{META} is unreadable or of an unknown format"
        for f in FILES:
            want = snap.files.get(f, {})
            try:
                size = (snap.dir / f).stat().st_size
            except OSError:
                return f"{f} is missing"
            if size != want.get("size"):
                return f"{f} is {size} bytes, {want.get('size')} were recorded"
        return integrity.problem(snap.dir, snap.memory_mib << 20)

    def check(self, snap: Snapshot, what: str) -> None:
        problem = self.quick_problem(snap)
        if problem:
            raise SnapshotCorrupt(f"snapshot '{snap.name}' cannot be {what}: {problem} "
                                  f"('vmfork snapshot verify {snap.name}' checks it all)")

    def verify(self, snap: Snapshot) -> list[dict[str, Any]]:
        """Recompute every digest; one row per file with ``ok``."""
        rows = []
        with self.using(snap):
            for f in FILES:
                want = snap.files.get(f, {})
                try:
                    got: dict[str, Any] = dict(file_digest(snap.dir / f))
                except OSError as e:
                    got = {"size": None, "digest": None, "error": e.strerror}
                rows.append({"file": f, "ok": got.get("digest") == want.get("digest") and got["size"] == want.get("size"),
                             "size": got["size"], "recorded_size": want.get("size"),
                             "digest": got.get("digest"), "recorded_digest": want.get("digest")})
        return rows


def _broken(d: Path, why: str) -> Snapshot:
    return Snapshot(id=d.name, name=d.name, created_at="", source_id="", source_name="",
                    hypervisor="", memory_mib=0, vcpus=0, accel="", image_digest="", dir=d,
                    files={"problem": {"why": why}}, format=0)


def validate_count(count: int, limit: int) -> int:
    if not 1 <= count <= limit:
        raise InvalidArgument(f"invalid --count '{count}': between 1 and {limit}")
    return count


__all__ = ["FILES", "META", "Snapshot", "SnapshotCorrupt", "Store", "VmforkError", "validate_count"]
