"""Fill, list, drain and claim the slots of a warm pool (see ``vmfork.pool``).

The Manager stays the owner of instance state: a slot is made, claimed and removed under
its lock (``locks/<slot id>.lock``, the future fork's), with the Manager's helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork import confine, util
from vmfork.errors import Busy, InvalidArgument, NotFound, VmforkError, WrongState
from vmfork.hypervisor.base import VMConfig, vmm_record
from vmfork.layout import GuestDir
from vmfork.pool import READY, SLOT, STARTING, Slot, problem, slot_dirs, snapshot_key
from vmfork.util import crashpoint

if TYPE_CHECKING:
    from vmfork.instances.manager import Manager
    from vmfork.instances.model import Instance

MAX_SIZE = 32


def slots(mgr: Manager) -> list[Slot]:
    return [s for s in (Slot.load(d) for d in slot_dirs(mgr.dd.guests)) if s is not None]


def usable(mgr: Manager, slot: Slot, src: Instance) -> str | None:
    """Why ``slot`` cannot become a fork of ``src`` as it is now, or None."""
    why = problem(slot, mgr.dd.guests)
    if why:
        return why
    if slot.source_id != src.id:
        return "made for another source"
    if slot.key != snapshot_key(src.g.snapshot_latest):
        return "stale: made for an older snapshot of its source"
    if slot.network != mgr._fork_network(src, ()):
        return "stale: its source's network changed"
    return None


# --- the size kept after claims (a data-dir setting per source) -----------------------------------
def _setting(mgr: Manager, src_id: str) -> Path:
    return mgr.dd.root / "pool" / f"{src_id}.json"


def kept(mgr: Manager, src_id: str) -> int:
    """The pool size refilled after each claim of a slot of ``src_id`` (0: none)."""
    try:
        return int(util.read_json(_setting(mgr, src_id)).get("size", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _keep(mgr: Manager, src_id: str, size: int) -> None:
    f = _setting(mgr, src_id)
    if size <= 0:
        f.unlink(missing_ok=True)
        return
    f.parent.mkdir(mode=0o700, exist_ok=True)
    util.atomic_write_json(f, {"source_id": src_id, "size": size})


def refill(mgr: Manager, src_id: str) -> None:
    """After a claim: the source's pool back to its kept size (failures only said)."""
    size = kept(mgr, src_id)
    if not size:
        return
    try:
        fill(mgr, src_id, size)
    except VmforkError as e:
        mgr.progress(f"pool not refilled: {e}")


# --- fill ---------------------------------------------------------------------------------------
def fill(mgr: Manager, src_ref: str, size: int, *, keep: bool = False) -> dict[str, Any]:
    """Keep ``size`` ready slots for forks of ``src_ref`` (a QEMU instance in standby):
    stale or broken ones go, missing ones are made, extra ones go. With ``keep``, the pool
    is refilled to ``size`` after each fork that takes a slot (``Manager.refill``)."""
    if not 0 <= size <= MAX_SIZE:
        raise InvalidArgument(f"invalid pool size '{size}': must be between 0 and {MAX_SIZE}")
    src = mgr.find(src_ref)
    if src.hypervisor != "qemu":
        raise InvalidArgument(f"instance '{src.name}' runs on {src.hypervisor}: a pool needs the qemu backend")
    t0 = time.monotonic()
    made: list[str] = []
    removed: list[str] = []
    with mgr._locked(src) as src:
        st = mgr.status(src)
        mgr._usable(src, st)
        if st.state != "standby":
            raise WrongState(f"instance '{src.name}' is {st.state}: a pool is made for a source in standby")
        mgr._check_snapshot(src, "pooled")
        key = snapshot_key(src.g.snapshot_latest)
        keep_slots: list[Slot] = []
        for s in [s for s in slots(mgr) if s.source_id == src.id]:
            why = usable(mgr, s, src)
            if why is None and len(keep_slots) < size:
                keep_slots.append(s)
            elif _remove_locked(mgr, s):
                removed.append(s.iid)
        if keep:
            _keep(mgr, src.id, size)
        for _ in range(size - len(keep_slots)):
            made.append(_make(mgr, src, key).iid)
    return {"source": src.name, "size": size, "made": made, "removed": removed,
            "refilled": kept(mgr, src.id), "seconds": round(time.monotonic() - t0, 3)}


def _make(mgr: Manager, src: Instance, key: dict[str, Any]) -> Slot:
    """One slot for forks of ``src`` (locked, in standby): built in ``.tmp-<id>``, renamed to
    its final dir, then its VMM started and the slot marked ready."""
    from vmfork.forkvm import clone_tree
    from vmfork.forkvm.copier import fsync_tree
    from vmfork.hypervisor.shared_ram import ensure_template
    from vmfork.instances import snapshot_ops
    from vmfork.instances.manager import _guest_skip, _now
    from vmfork.instances.model import new_mac

    hv = mgr.hypervisor(src)
    iid = mgr._new_id()
    tmp, final = mgr.dd.guests / f".tmp-{iid}", mgr.dd.guests / iid
    with mgr._instance_lock(iid, f"pool slot {iid}", timeout=0):
        with mgr._global_lock():
            try:
                clone_tree(src.dir, tmp, skip=_guest_skip)
                for d in (tmp, tmp / "logs"):
                    if d.is_dir():
                        os.chmod(d, 0o700)
                snap = GuestDir(tmp).snapshot_latest
                snapshot_ops.name_template(hv, snap, lambda: ensure_template(
                    src.g.snapshot_latest / "memory", src.dir), src.memory_mib << 20)
                cfg = VMConfig.from_json({k: v for k, v in util.read_json(snap / "config.json").items()
                                          if k != "taken_at"})
                os.rename(snap / "memory", tmp / "memory")  # the fork's own mem-file (a clone)
                shutil.rmtree(snap)  # the state is read from the source's snapshot at the claim
                slot = Slot(iid=iid, dir=final, source_id=src.id, source_name=src.name, key=key,
                            cid=mgr._free_cid(), mac=new_mac(), uid=None,
                            network=mgr._fork_network(src, ()), state=STARTING, created_at=_now())
                util.atomic_write_json(tmp / SLOT, slot.to_json(), durable=False)
                GuestDir(tmp).ensure_dirs()
                fsync_tree(tmp, parent=False)
                os.rename(tmp, final)
                util.fsync_dir(mgr.dd.guests)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        crashpoint("pool:slot-renamed")
        try:
            inst = _instance(src, slot, name=f"slot-{iid}", pending=None)
            if confine.enabled():
                inst.uid = slot.uid = confine.ids.allocate(mgr.dd.root, iid)
            hv.check_snapshot_compat(cfg, src.name)
            cfg.id, cfg.cid, cfg.mac = iid, slot.cid, slot.mac
            image = mgr.image(cfg.image_digest)
            mgr._confine(inst, image)
            mgr._attach_network(inst, cfg)()  # its namespace, whole before the VMM starts in it
            util.atomic_write_json(inst.g.run / "config.json", cfg.to_json(), durable=False)
            with mgr._explain_vmm_death(inst):
                hv.prestart(inst.g, cfg, image)
            crashpoint("pool:slot-started")
            slot.state = READY
            util.atomic_write_json(final / SLOT, slot.to_json())
        except BaseException:
            _discard(mgr, slot)
            raise
    return slot


def _instance(src: Instance, slot: Slot, *, name: str, pending: str | None) -> Instance:
    """The fork ``slot`` becomes (or, for its confinement and network, already is)."""
    from vmfork.instances.manager import _now
    from vmfork.instances.model import Instance

    return Instance(
        id=slot.iid, name=name, hypervisor=src.hypervisor, accel=src.accel, memory_mib=src.memory_mib,
        vcpus=src.vcpus, image_digest=src.image_digest, created_at=_now(), mac=slot.mac, cid=slot.cid,
        parent_id=src.id, parent_name=src.name, identity_applied=False, pending=pending, dir=slot.dir,
        limits=src.limits, network=slot.network, oci=src.oci, uid=slot.uid,
    )


# --- remove -------------------------------------------------------------------------------------
def _discard(mgr: Manager, slot: Slot) -> None:
    """Remove a slot whose lock is held: out of sight first (``.trash-``, which recovery
    finishes), then its VMM, cgroup, uid and network go."""
    trash = mgr.dd.guests / f".trash-{slot.iid}"
    if slot.dir.exists():
        os.rename(slot.dir, trash)
        util.fsync_dir(mgr.dd.guests)
    crashpoint("pool:slot-trashed")
    proc = vmm_record(GuestDir(trash))
    if proc is not None:
        proc.kill()
    confine.release(mgr.dd.root, slot.iid)
    if (mgr.dd.root / "network" / "leases" / f"{slot.iid}.json").exists():
        from vmfork import network

        network.release(mgr.dd.root, slot.iid)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_locked(mgr: Manager, slot: Slot) -> bool:
    """Take the slot's lock and remove it; False if a command holds it (a claim at work)."""
    try:
        with mgr._instance_lock(slot.iid, f"pool slot {slot.iid}", timeout=0):
            if slot.dir.is_dir() and Slot.load(slot.dir) is not None:
                _discard(mgr, slot)
            return True
    except Busy:
        return False


def drain(mgr: Manager, src_ref: str) -> dict[str, Any]:
    """Remove every slot of source ``src_ref`` (a name or id; the source may be gone)."""
    mine = [s for s in slots(mgr) if src_ref in (s.source_id, s.source_name)]
    for s in mine:
        _keep(mgr, s.source_id, 0)
    with contextlib.suppress(NotFound):
        _keep(mgr, mgr.find(src_ref).id, 0)
    if not mine:
        with contextlib.suppress(NotFound):
            mgr.find(src_ref)
            return {"source": src_ref, "removed": [], "busy": []}
        raise NotFound(f"no pool for '{src_ref}': no such instance, and no slot made for one")
    removed: list[str] = []
    busy: list[str] = []
    for s in mine:
        (removed if _remove_locked(mgr, s) else busy).append(s.iid)
    return {"source": src_ref, "removed": removed, "busy": busy}


def drain_of(mgr: Manager, src_id: str) -> None:
    """``rm`` of a source: its slots go with it."""
    _keep(mgr, src_id, 0)
    for s in slots(mgr):
        if s.source_id == src_id:
            _remove_locked(mgr, s)


def recover(mgr: Manager) -> list[str]:
    """Remove the slots a crash left unusable (unfinished, VMM dead, source gone, a claim cut
    short before its fork was committed); those whose lock is held are at work."""
    actions = []
    for d in slot_dirs(mgr.dd.guests):
        slot = Slot.load(d)
        why = problem(slot, mgr.dd.guests)
        if why is None:
            continue
        if slot is None:
            slot = Slot(iid=d.name, dir=d, source_id="", source_name="", key={}, cid=0, mac="", uid=None,
                        network=None, state="", created_at="")
        try:
            with mgr._instance_lock(slot.iid, f"pool slot {slot.iid}", timeout=0):
                if Slot.load(d) is not None or d.exists():
                    _discard(mgr, slot)
                    actions.append(f"removed pool slot {slot.iid} ({why})")
        except Busy:
            continue
    return actions


# --- ls -----------------------------------------------------------------------------------------
def pss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def ls(mgr: Manager) -> list[dict[str, Any]]:
    srcs = {i.id: i for i in mgr.instances()}
    rows = []
    for s in slots(mgr):
        src = srcs.get(s.source_id)
        why = usable(mgr, s, src) if src is not None else "its source is gone"
        proc = vmm_record(GuestDir(s.dir))
        rows.append({"id": s.iid, "source": s.source_name, "source_id": s.source_id,
                     "state": "ready" if why is None else "stale" if why.startswith("stale") else s.state,
                     "problem": why, "pid": proc.pid if proc else None,
                     "pss_mib": pss_mib(proc.pid) if proc else None, "created_at": s.created_at})
    return rows


# --- claim (Manager.fork) -----------------------------------------------------------------------
def reserve(mgr: Manager, src: Instance, name: str, stack: contextlib.ExitStack) -> Slot | None:
    """Lock a ready slot of ``src`` for the fork ``name`` (the lock is the fork's, held by
    ``stack``); None if there is none free. Whether it matches the source's snapshot is
    checked by ``claim``, under the source's lock."""
    for s in slots(mgr):
        if s.source_id != src.id or problem(s, mgr.dd.guests):
            continue
        attempt = contextlib.ExitStack()
        try:
            attempt.enter_context(mgr._instance_lock(s.iid, name, timeout=0))
        except Busy:
            continue
        again = Slot.load(s.dir)
        if again is None or problem(again, mgr.dd.guests):
            attempt.close()
            continue
        stack.enter_context(attempt)
        return again
    return None


def claim(mgr: Manager, src: Instance, slot: Slot, name: str) -> tuple[Instance, int] | None:
    """Make the reserved ``slot`` the fork ``name`` of ``src`` (locked, in standby): its
    metadata is written, then its marker removed (the commit point: from here on it is an
    instance, rolled back by recovery until it runs). Returns the fork and an fd of the
    source's device state; None if the slot did not match (it is removed: the caller goes
    the usual way, with the same id and lock)."""
    why = usable(mgr, slot, src)
    if why is not None:
        mgr.progress(f"pool slot {slot.iid} not used: {why}")
        _discard(mgr, slot)
        return None
    fd = os.open(src.g.snapshot_latest / "state", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fork = _instance(src, slot, name=name, pending="running")
        with mgr._global_lock():
            mgr._check_name_free(name)
            util.atomic_write_json(fork.g.metadata, fork.to_json())
        crashpoint("pool:metadata-written")
        os.unlink(slot.dir / SLOT)
        util.fsync_dir(slot.dir)
    except BaseException:
        os.close(fd)
        if (slot.dir / SLOT).exists():  # not committed: it stays a slot
            (slot.dir / "instance.json").unlink(missing_ok=True)
        else:
            mgr._destroy(fork)
        raise
    crashpoint("pool:claimed")
    return fork, fd
