"""What the Manager does with named snapshots: take one of an instance, fork one N times,
roll an instance back to one, and finish or undo any of these after a crash.

Functions of the Manager (its first argument), kept apart from ``manager.py``: the Manager
stays the only owner of instance state (they run under its locks and use its building
blocks); ``vmfork.snapshots`` holds the snapshot files themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork import util
from vmfork.errors import InvalidArgument, VmforkError, WrongState
from vmfork.forkvm import clone_file, clone_tree
from vmfork.forkvm.copier import fsync_tree
from vmfork.hypervisor import get_hypervisor
from vmfork.hypervisor.base import VMConfig, vmm_record
from vmfork.hypervisor.shared_ram import ensure_template
from vmfork.instances import integrity
from vmfork.instances.model import Instance, new_mac
from vmfork.layout import LIVE_DIR, ROLLBACK_DIR, GuestDir
from vmfork.paths import PRIVATE_FILE
from vmfork.snapshots.store import Snapshot, Store
from vmfork.util import crashpoint

if TYPE_CHECKING:
    from vmfork.instances.manager import Manager

#: Most forks one command makes (--count): E2B and forkd offer 100 per call; each fork to
#: running is a VMM (~80 MiB of RSS right after restore here), so more belongs to a fleet.
MAX_COUNT = 100
COMMITTED = "committed"  # in .rollback: from here on it is rolled forward
SNAP_FILES = ("memory", "state", "config.json", integrity.MANIFEST)


def store(mgr: Manager) -> Store:
    return Store(mgr.dd.root / "snapshots", mgr.dd.locks).ensure()


def fork_names(name: str, count: int | None) -> list[str]:
    util.validate_name(name)
    if count is None:
        return [name]
    if not 1 <= count <= MAX_COUNT:
        raise InvalidArgument(f"invalid --count '{count}': a number from 1 to {MAX_COUNT}")
    names = [f"{name}-{i}" for i in range(1, count + 1)]
    for n in names:
        util.validate_name(n)
    return names


# --- create ---------------------------------------------------------------------------------
def create(mgr: Manager, ref: str, name: str) -> tuple[Snapshot, dict[str, Any]]:
    """Take snapshot ``name`` of instance ``ref``: a standby instance stays in standby, a
    running one keeps running (paused only to save its device state and clone its RAM file
    and disk)."""
    util.validate_name(name, "snapshot name")
    st = store(mgr)
    st.check_name_free(name)
    t0 = time.monotonic()
    sid = st.new_id()
    timings: dict[str, Any] = {}
    with st.building(sid) as tmp, mgr._locked(ref) as inst:
        status = mgr.status(inst)
        mgr._usable(inst, status)
        g = inst.g
        if status.state == "standby":
            mgr._check_snapshot(inst, "snapshotted")
            for f in SNAP_FILES:
                clone_file(g.snapshot_latest / f, tmp / f)
            clone_file(g.disk, tmp / "disk.raw")
            cfg = VMConfig.from_json(util.read_json(tmp / "config.json"))
            live, pause = False, None
        elif status.state == "running":
            assert status.proc is not None
            cfg, saved = _live(mgr, inst, status.proc, tmp)
            timings |= {k: round(v, 4) for k, v in saved.items()}
            live, pause = True, round(saved["pause_s"] * 1000, 2)
        else:
            raise WrongState(f"instance '{inst.name}' is {status.state}: only a running or standby "
                             "instance can be snapshotted")
        crashpoint("snapshot:files")
        head = (inst.head_snapshot_id, inst.head_snapshot_name)
        snap = Snapshot(
            id=sid, name=name, created_at=_now(), source_id=inst.id, source_name=inst.name,
            hypervisor=inst.hypervisor, memory_mib=inst.memory_mib, vcpus=inst.vcpus,
            accel=inst.accel, image_digest=inst.image_digest, vmm_version=cfg.vmm_version,
            parent_id=head[0], parent_name=head[1], live=live, pause_ms=pause, limits=inst.limits,
            oci=inst.oci,
        )
        t_files = time.monotonic()
        st.commit(tmp, snap)  # digests, metadata, fsync, rename
        crashpoint("snapshot:committed")
        mgr._set_metadata(inst, head_snapshot_id=sid, head_snapshot_name=name)
    timings |= {"files_s": round(t_files - t0, 4), "commit_s": round(time.monotonic() - t_files, 4),
                "total_s": round(time.monotonic() - t0, 4)}
    return snap, timings


def _live(mgr: Manager, inst: Instance, proc: Any, tmp: Path) -> tuple[VMConfig, dict[str, float]]:
    g, hv = inst.g, mgr.hypervisor(inst)
    if not hv.capabilities.live_snapshot:
        raise WrongState(f"instance '{inst.name}' is running and {hv.name} cannot snapshot a running "
                         f"guest: 'vmfork standby {inst.name}' first")
    live = g.snapshots / LIVE_DIR
    shutil.rmtree(live, ignore_errors=True)
    live.mkdir(0o700, parents=True)
    st_parent = os.stat(g.snapshots)  # a confined Firecracker owns snapshots/ and writes by path
    if (st_parent.st_uid, st_parent.st_gid) != (0, 0) and os.geteuid() == 0:
        os.chown(live, st_parent.st_uid, st_parent.st_gid)
    try:
        cfg = VMConfig.from_json(util.read_json(g.run / "config.json"))

        def while_paused() -> None:  # the vCPUs are stopped: RAM and disk are consistent
            if hv.capabilities.file_backed_memory:
                clone_file(g.memory, live / "memory")
            clone_file(g.disk, live / "disk.raw")
            crashpoint("snapshot:cloned")

        t0 = time.monotonic()
        # Write back what the guest dirtied while it still runs: the clones in the pause then
        # write back only what it dirties from here on (FICLONE flushes its source first).
        for path in (g.memory, g.disk):
            if path.exists():
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        t_flush = time.monotonic() - t0
        saved = hv.snapshot_live(g, cfg, proc, live, while_paused=while_paused)
        saved.phases["preflush_s"] = t_flush
        util.atomic_write_json(live / "config.json", cfg.to_json() | {"taken_at": _now()}, durable=False)
        integrity.write_manifest(live, inst.memory_mib << 20)
        for f in (*SNAP_FILES, "disk.raw"):
            os.rename(live / f, tmp / f)
    finally:
        shutil.rmtree(live, ignore_errors=True)
    return cfg, saved.phases


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- shared templates -------------------------------------------------------------------------
def name_template(hv: Any, snap: Path, template: Callable[[], Path | None], memory_bytes: int) -> None:
    """Let the fork whose fresh snapshot is ``snap`` run from its source's template (made by
    ``template()``, None if there can be none) rather than from its own clone, where the
    backend and this host allow it (``hypervisor.shared_ram``): the template's path goes into
    the snapshot's config."""
    from vmfork.hypervisor import shared_ram

    if not hv.capabilities.shared_template:
        return
    cfg = util.read_json(snap / "config.json")
    if not shared_ram.enabled(hv.readonly_template(str(cfg.get("vmm_version") or ""))):
        return
    path = template()
    if path is None:
        return
    if os.stat(path).st_mode & 0o777 != shared_ram.TEMPLATE_MODE:  # a named snapshot's mem-file
        os.chmod(path, shared_ram.TEMPLATE_MODE)
    cfg["template"] = str(path)
    util.atomic_write_json(snap / "config.json", cfg, durable=False)
    integrity.write_manifest(snap, memory_bytes)


# --- fork, N at a time ------------------------------------------------------------------------
Build = Callable[[Path], None]


def fork_snapshot(mgr: Manager, ref: str, name: str, *, count: int | None = None,
                  target_state: str = "standby", partial: bool = False,
                  overcommit: bool = False) -> tuple[list[Instance], dict[str, Any]]:
    names = fork_names(name, count)
    st = store(mgr)
    snap = st.find(ref)
    hv = get_hypervisor(snap.hypervisor) if snap.hypervisor else None
    if hv is None or hv.available():
        raise WrongState(f"snapshot '{snap.name}' is of hypervisor '{snap.hypervisor}', which is not usable "
                         f"here{': ' + str(hv.available()) if hv else ''}")
    t0 = time.monotonic()
    with st.using(snap):
        st.check(snap, "forked")
        cfg = VMConfig.from_json({k: v for k, v in util.read_json(snap.dir / "config.json").items() if k != "taken_at"})
        hv.check_snapshot_compat(cfg, snap.name)
        mgr.image(snap.image_digest)  # refuse a snapshot whose image is gone, before any work

        def build(tmp: Path) -> None:
            latest = GuestDir(tmp).snapshot_latest
            latest.mkdir(0o700, parents=True)
            for f in SNAP_FILES:
                clone_file(snap.dir / f, latest / f)
            os.chmod(latest / "memory", PRIVATE_FILE)  # the snapshot's own may be a template's 0444
            clone_file(snap.dir / "disk.raw", tmp / "disk.raw")
            name_template(hv, latest, lambda: snap.dir / "memory", snap.memory_mib << 20)  # immutable

        template = {"hypervisor": snap.hypervisor, "accel": snap.accel, "memory_mib": snap.memory_mib,
                    "vcpus": snap.vcpus, "image_digest": snap.image_digest, "parent_id": snap.id,
                    "parent_name": snap.name, "parent_kind": "snapshot", "head_snapshot_id": snap.id,
                    "head_snapshot_name": snap.name, "limits": snap.limits, "oci": snap.oci}
        forks, timings = fork_many(mgr, names, build, template, target_state=target_state,
                                   partial=partial, locked_source=True, overcommit=overcommit)
    timings["total_s"] = round(time.monotonic() - t0, 4)
    return forks, timings


def fork_instance(mgr: Manager, src_ref: str, name: str, *, count: int, from_running: bool = False,
                  target_state: str | None = None, partial: bool = False,
                  overcommit: bool = False) -> tuple[list[Instance], dict[str, Any]]:
    """``vmfork fork SOURCE NAME --count N``: N forks of one instance in one pass."""
    names = fork_names(name, count)
    t0 = time.monotonic()
    timings: dict[str, Any] = {}
    with mgr._locked(src_ref) as src:
        was_running = mgr._check_forkable(src, mgr.status(src), from_running)
        target = target_state or ("running" if was_running else "standby")
        if was_running and not overcommit:  # the source claims its RAM again when it is restored
            from vmfork.space.admission import Claim

            ram = src.memory_mib << 20
            mgr._admit(f"fork '{name}' --count {count}", mgr.hypervisor(src), [Claim(src.name, ram, ram)],
                       overcommit=overcommit, replacing=(src.id,))
        if was_running:
            timings["source_standby"] = mgr._standby_locked(src)
        try:
            mgr._check_snapshot(src, "forked")
            from vmfork.instances.manager import _guest_skip

            def build(tmp: Path) -> None:
                clone_tree(src.dir, tmp, skip=_guest_skip)
                for d in (tmp, tmp / "logs"):  # not the source VMM's 0710 root:<its gid>
                    if d.is_dir():
                        os.chmod(d, 0o700)
                name_template(mgr.hypervisor(src), GuestDir(tmp).snapshot_latest, lambda: ensure_template(
                    src.g.snapshot_latest / "memory", src.dir), src.memory_mib << 20)

            template = {"hypervisor": src.hypervisor, "accel": src.accel, "memory_mib": src.memory_mib,
                        "vcpus": src.vcpus, "image_digest": src.image_digest, "parent_id": src.id,
                        "parent_name": src.name, "head_snapshot_id": src.head_snapshot_id,
                        "head_snapshot_name": src.head_snapshot_name, "limits": src.limits,
                        "network": mgr._fork_network(src, ()), "oci": src.oci}
            forks, t = fork_many(mgr, names, build, template, target_state=target, partial=partial,
                                 overcommit=overcommit,
                                 locked_source=True, after_clone=(lambda: _restore_source(mgr, src, timings))
                                 if was_running else None)
            timings |= t
        finally:
            if was_running and "source_restore" not in timings and mgr.status(src).state == "standby":
                _restore_source(mgr, src, timings)
    timings["total_s"] = round(time.monotonic() - t0, 4)
    return forks, timings


def _restore_source(mgr: Manager, src: Instance, timings: dict[str, Any]) -> None:
    timings["source_restore"] = mgr._restore_locked(src)


def _batch_marker(mgr: Manager, bid: str) -> Path:
    return mgr.dd.guests / f".batch-{bid}"


@contextlib.contextmanager
def _locks(mgr: Manager, iids: list[str], names: list[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for iid, n in zip(iids, names, strict=True):
            stack.enter_context(mgr._instance_lock(iid, n, timeout=0))
        yield


def fork_many(mgr: Manager, names: list[str], build: Build, template: dict[str, Any], *,
              target_state: str, partial: bool, locked_source: bool, overcommit: bool = False,
              after_clone: Callable[[], None] | None = None) -> tuple[list[Instance], dict[str, Any]]:
    """Make one fork per name with ``build`` (which fills a new guest dir), in one pass:
    one global lock, one name check, one sync of all the clones, one directory sync; then
    bring them to ``target_state``.

    All or none: the batch marker ``guests/.batch-<id>`` is made (durable) before the first
    fork is renamed into place and removed once all are in their target state -- that
    removal is the commit point. A crash before it removes every fork of the batch
    (``recover``); with ``partial``, a failure in reaching the target state removes only the
    forks it hit, and the result names them."""
    if target_state not in ("running", "standby", "stopped"):
        raise InvalidArgument(f"invalid target state '{target_state}': use running, standby or stopped")
    assert locked_source
    if len(set(names)) != len(names):
        raise InvalidArgument("fork names must differ")
    _check_names_free(mgr, names)
    bid = util.new_id()
    iids: list[str] = []
    while len(iids) < len(names):
        iid = mgr._new_id()
        if iid not in iids:
            iids.append(iid)
    timings: dict[str, Any] = {"count": len(names)}
    forks: list[Instance] = []
    hv = get_hypervisor(template["hypervisor"])
    if target_state == "running":  # admission: each running fork claims all its RAM
        from vmfork.space.admission import Claim

        ram = template["memory_mib"] << 20
        mgr._admit(f"{len(names)} fork(s) '{names[0]}'...", hv, [Claim(n, ram, ram) for n in names],
                   overcommit=overcommit)
    marker = _batch_marker(mgr, bid)
    t0 = time.monotonic()
    with _locks(mgr, iids, names):  # held until the end: recovery leaves these forks alone
        tmps = [mgr.dd.guests / f".tmp-{iid}" for iid in iids]
        with mgr._global_lock():
            existing = _check_names_free(mgr, names)
            try:
                used = {i.cid for i in existing}
                for iid, n, tmp in zip(iids, names, tmps, strict=True):
                    build(tmp)
                    GuestDir(tmp).ensure_dirs()
                    snap = GuestDir(tmp).snapshot_latest
                    if hv.prepare_fork(GuestDir(mgr.dd.guests / iid), snap):
                        integrity.write_manifest(snap, template["memory_mib"] << 20)
                    cid = 3
                    while cid in used:
                        cid += 1
                    used.add(cid)
                    fork = Instance(id=iid, name=n, created_at=_now(), mac=new_mac(), cid=cid,
                                    identity_applied=False, batch=bid, dir=tmp, **template)
                    util.atomic_write_json(fork.g.metadata, fork.to_json(), durable=False)
                    forks.append(fork)
                    crashpoint("fork-many:cloned-one")
                t_sync = time.monotonic()
                timings["clone_s"] = round(t_sync - t0, 4)
                util.atomic_write_json(marker, {"ids": iids}, durable=False)
                _sync_all(tmps, marker)  # every clone, its metadata and the marker: one pass
                crashpoint("fork-many:synced")
                for fork, iid in zip(forks, iids, strict=True):
                    os.rename(fork.dir, mgr.dd.guests / iid)
                    fork.dir = mgr.dd.guests / iid
                    crashpoint("fork-many:renamed-one")
                util.fsync_dir(mgr.dd.guests)
                timings["sync_s"] = round(time.monotonic() - t_sync, 4)
            except BaseException:
                for fork in forks:
                    shutil.rmtree(fork.dir, ignore_errors=True)
                for tmp in tmps:
                    shutil.rmtree(tmp, ignore_errors=True)
                marker.unlink(missing_ok=True)
                raise
        if after_clone is not None:
            after_clone()
        crashpoint("fork-many:created")
        t_target = time.monotonic()
        failed: dict[str, str] = {}
        try:
            for fork in forks:
                try:
                    if target_state == "running":
                        mgr._restore_locked(fork)
                    elif target_state == "stopped":
                        shutil.rmtree(fork.g.snapshot_latest)
                    crashpoint("fork-many:target-one")
                except VmforkError as e:
                    if not partial:
                        raise
                    failed[fork.name] = str(e)
            if len(failed) == len(forks):
                raise WrongState(f"no fork reached {target_state}: " + "; ".join(failed.values()))
            for fork in forks:
                if fork.name in failed:
                    mgr._destroy(fork)
            crashpoint("fork-many:before-commit")
            marker.unlink()  # the commit point
            util.fsync_dir(mgr.dd.guests)
            crashpoint("fork-many:committed")
        except BaseException:
            for fork in forks:
                mgr._destroy(fork)
            marker.unlink(missing_ok=True)
            raise
        timings["target_s"] = round(time.monotonic() - t_target, 4)
    timings["failed"] = failed
    return [f for f in forks if f.name not in failed], timings


def _check_names_free(mgr: Manager, names: list[str]) -> list[Instance]:
    """One listing for all the names (not one per name); returns the instances listed."""
    from vmfork.errors import AlreadyExists

    existing = mgr.instances()
    taken = {i.name: i.id for i in existing}
    for n in names:
        if n in taken:
            raise AlreadyExists(f"instance '{n}' already exists (id {taken[n]})")
    return existing


def _sync_all(dirs: list[Path], *extra: Path) -> None:
    from vmfork.forkvm.copier import _fsync_all

    files: list[Path] = list(extra)
    subdirs: list[Path] = []
    for root in dirs:
        for d, dnames, fnames in os.walk(root):
            subdirs.append(Path(d))
            files += [Path(d) / f for f in fnames if not os.path.islink(Path(d) / f)]
            del dnames
    _fsync_all(files, list(reversed(subdirs)) + ([extra[0].parent] if extra else []))


def _sync_files(files: list[Path]) -> None:
    for f in files:
        util.fsync_file(f)


# --- rollback ---------------------------------------------------------------------------------
def rollback(mgr: Manager, ref: str, snap_ref: str, *, overcommit: bool = False) -> tuple[Instance, dict[str, Any]]:
    """Put instance ``ref`` back to its named snapshot ``snap_ref`` and run it from there; the
    snapshot stays (the instance gets clones of its files)."""
    st = store(mgr)
    snap = st.find(snap_ref)
    t0 = time.monotonic()
    with st.using(snap), mgr._locked(ref) as inst:
        forked_from = inst.parent_kind == "snapshot" and inst.parent_id == snap.id
        if snap.source_id != inst.id and not forked_from:
            raise WrongState(f"snapshot '{snap.name}' was taken of '{snap.source_name}', not of "
                             f"'{inst.name}' (nor was '{inst.name}' forked from it): "
                             f"'vmfork snapshot fork {snap.name} NAME' makes a new instance of it")
        st.check(snap, "restored")
        from vmfork.space.admission import ram_claim

        mgr._admit(f"'{inst.name}'", mgr.hypervisor(inst), [ram_claim(
            inst.name, inst.memory_mib << 20, snap.dir / "memory")], overcommit=overcommit, replacing=(inst.id,))
        status = mgr.status(inst)
        if inst.problem:
            mgr._usable(inst, status)
        g = inst.g
        rb = g.snapshots / ROLLBACK_DIR
        shutil.rmtree(rb, ignore_errors=True)
        rb.mkdir(0o700, parents=True)
        for f in SNAP_FILES:
            clone_file(snap.dir / f, rb / f)
        os.chmod(rb / "memory", PRIVATE_FILE)  # not the 0444 of a snapshot that is a template
        clone_file(snap.dir / "disk.raw", rb / "disk.raw")
        fsync_tree(rb, parent=False)
        crashpoint("rollback:cloned")
        util.atomic_write_bytes(rb / COMMITTED, b"")  # the commit point
        crashpoint("rollback:committed")
        _finish_rollback(mgr, inst)
        crashpoint("rollback:swapped")
        mgr._set_metadata(inst, head_snapshot_id=snap.id, head_snapshot_name=snap.name)
        t_swap = time.monotonic()
        timings = {"swap_s": round(t_swap - t0, 4), "restore": mgr._restore_locked(inst)}
    timings["total_s"] = round(time.monotonic() - t0, 4)
    return inst, timings


def _finish_rollback(mgr: Manager, inst: Instance) -> None:
    """From the commit point on: stop what runs, swap the snapshot and the disk in."""
    g = inst.g
    rb = g.snapshots / ROLLBACK_DIR
    proc = vmm_record(g)
    if proc is not None:
        from vmfork.guest import muxctl

        muxctl.end_execs(g, "the instance was rolled back to a snapshot")
        mgr.hypervisor(inst).quit(g, proc)
    g.vmm_json.unlink(missing_ok=True)
    g.memory.unlink(missing_ok=True)
    for d in (g.snapshot_latest, g.snapshot_base, g.snapshot_tmp, g.restoring):
        shutil.rmtree(d, ignore_errors=True)
    if (rb / "disk.raw").exists():
        os.rename(rb / "disk.raw", g.disk)
    (rb / COMMITTED).unlink(missing_ok=True)
    os.rename(rb, g.snapshot_latest)
    util.fsync_dir(g.path)
    util.fsync_dir(g.snapshots)


# --- recovery ---------------------------------------------------------------------------------
def recover_guest(mgr: Manager, inst: Instance) -> list[str]:
    """A crashed live snapshot (the guest may be paused) or rollback of this instance."""
    g, actions = inst.g, []
    live = g.snapshots / LIVE_DIR
    if live.exists():
        shutil.rmtree(live, ignore_errors=True)
        proc = vmm_record(g)
        resumed = False
        from vmfork.space.pause import read_mark

        if proc is not None and read_mark(g, proc) is None:  # one the watchdog paused stays paused
            with contextlib.suppress(VmforkError):
                resumed = mgr.hypervisor(inst).resume(g, proc)
        actions.append(f"{inst.name}: removed an unfinished snapshot" + ("; resumed the guest" if resumed else ""))
    rb = g.snapshots / ROLLBACK_DIR
    if rb.exists():
        if (rb / COMMITTED).exists():
            _finish_rollback(mgr, inst)
            actions.append(f"{inst.name}: finished an interrupted rollback (it is in standby at the snapshot)")
        else:
            shutil.rmtree(rb, ignore_errors=True)
            actions.append(f"{inst.name}: undid an interrupted rollback")
    return actions


def batch_open(mgr: Manager, inst: Instance) -> bool:
    """A fork of a batch that was never committed (its marker is still there)."""
    return bool(inst.batch) and _batch_marker(mgr, str(inst.batch)).exists()


def recover(mgr: Manager) -> list[str]:
    """Snapshot temp dirs, and the markers of uncommitted batches none of whose forks is
    left (called after the forks of dead batches were removed) or locked by a live fork."""
    actions = Store(mgr.dd.root / "snapshots", mgr.dd.locks).recover()  # creates nothing
    for m in list(mgr.dd.guests.glob(".batch-*")):
        try:
            ids = util.read_json(m)["ids"]
        except (OSError, ValueError, KeyError, TypeError):
            ids = []
        if any((mgr.dd.guests / str(i)).exists() or (mgr.dd.guests / f".tmp-{i}").exists() for i in ids):
            continue  # still being made (its forks are locked) or not yet rolled back
        m.unlink(missing_ok=True)
    return actions


# --- views: df, tree; retention ----------------------------------------------------------------
def df(mgr: Manager) -> dict[str, Any]:
    from vmfork.snapshots.space import Item, account, files_of

    items = [Item("instance", i.name, i.id, i.dir, files_of(i.dir)) for i in mgr.instances()]
    items += [Item("snapshot", s.name, s.id, s.dir, files_of(s.dir)) for s in store(mgr).all()]
    images = mgr.dd.images
    for d in sorted(images.iterdir()) if images.is_dir() else []:
        if d.is_dir() and not d.name.startswith("."):
            items.append(Item("image", d.name, d.name, d, files_of(d)))
    return account(items)


def tree(mgr: Manager) -> list[Any]:
    from vmfork.snapshots.lineage import Node, build

    nodes = []
    for i in mgr.instances():
        parent = None
        if i.parent_id:
            parent = ("snapshot" if i.parent_kind == "snapshot" else "instance", i.parent_id, i.parent_name or i.parent_id)
        nodes.append(Node("instance", i.id, i.name, parent, info={"state": mgr.status(i).state}))
    st = store(mgr)
    for s in st.all() + st.removed():
        parent = ("instance", s.source_id, s.source_name) if s.source_id else None
        nodes.append(Node("snapshot", s.id, s.name, parent, deleted=s.dir.suffix == ".json",
                          info={"created_at": s.created_at, "after": s.parent_name}))
    return build(nodes)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    if len(t) >= 2 and t[-1] in _UNITS and t[:-1].isdigit():
        return int(t[:-1]) * _UNITS[t[-1]]
    raise InvalidArgument(f"invalid duration '{text}': a number and a unit, s, m, h, d or w (e.g. 12h, 7d)")


def prune(mgr: Manager, instance: str, *, keep_last: int | None, older_than: str | None,
          dry_run: bool) -> list[Snapshot]:
    """Snapshots of ``instance`` (by name or id; it may be gone) beyond the newest
    ``keep_last`` and/or older than ``older_than``; removed unless ``dry_run``."""
    from datetime import UTC, datetime

    if keep_last is None and older_than is None:
        raise InvalidArgument("prune needs --keep-last N and/or --older-than DURATION")
    if keep_last is not None and keep_last < 0:
        raise InvalidArgument(f"invalid --keep-last '{keep_last}': 0 or more")
    age = parse_duration(older_than) if older_than is not None else None
    st = store(mgr)
    mine = [s for s in st.all() if instance in (s.source_id, s.source_name)]
    if not mine:
        from vmfork.errors import NotFound

        raise NotFound(f"no snapshots of instance '{instance}'")
    mine.sort(key=lambda s: s.created_at, reverse=True)
    candidates = mine[keep_last:] if keep_last is not None else mine
    if age is not None:
        now = datetime.now(UTC)
        candidates = [s for s in candidates
                      if (now - datetime.fromisoformat(s.created_at)).total_seconds() > age]
    if not dry_run:
        for s in candidates:
            st.rm(s.id)
    return candidates
