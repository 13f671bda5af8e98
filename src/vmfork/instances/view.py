"""An instance's state as its files say it, and its row in ``vmfork ps``: read-only.

The Manager derives states here, and so does ``vmfork ps --json`` before the CLI is
imported (``vmfork.fastps``): one derivation for both. Only light modules are imported at
the top (no click, pydantic, rich, QMP, images, network, cgroups); what a rarer state needs
is imported where it is needed (tests/unit/test_startup.py checks it).

The state of an instance:

- ``error``: its ``instance.json`` is unreadable, or its snapshot is incomplete or of the
  wrong size (names and sizes only: ``integrity.quick_problem``);
- ``running``: the VMM recorded in ``run/vmm.json`` is still that process;
- ``standby``: no live VMM, and a snapshot in ``snapshots/snapshot-latest``;
- ``stopped``: neither.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmfork.instances import integrity
from vmfork.instances.model import Instance
from vmfork.layout import GuestDir
from vmfork.pool import Slot, is_slot, problem, slot_dirs
from vmfork.procs import ProcRef, recorded
from vmfork.util import is_id

TYPE_CHECKING = False  # typing only for the type checker (see vmfork/__init__.py)
if TYPE_CHECKING:
    from typing import Any


@dataclass
class Status:
    state: str  # running, standby, stopped, error
    proc: ProcRef | None
    problem: str | None = None  # why the state is "error"


def instances(guests: Path) -> list[Instance]:
    """Every instance under ``guests``, those with unreadable metadata included (with their
    ``problem``), by creation time."""
    out = []
    for d in sorted(guests.iterdir()) if guests.is_dir() else []:
        if d.name.startswith(".") or not d.is_dir() or is_slot(d):  # a warm pool's slot: not an instance
            continue
        out.append(Instance.load(d))
    return sorted(out, key=lambda i: (i.created_at, i.name))


def vmm(g: GuestDir) -> ProcRef | None:
    """The VMM recorded for this guest, if it is still that process."""
    return recorded(g.vmm_json)


def status(inst: Instance) -> Status:
    proc = vmm(inst.g)
    if inst.problem:
        return Status("error", proc, inst.problem)
    if proc is not None:
        return Status("running", proc)
    snap = inst.g.snapshot_latest
    if snap.exists():
        problem = integrity.quick_problem(snap, inst.memory_mib << 20)
        return Status("error", None, problem) if problem else Status("standby", None)
    return Status("stopped", None)


def row(root: Path, inst: Instance, st: Status, state: str) -> dict[str, Any]:
    """``ps``'s row of ``inst`` in the data dir ``root`` (``inspect`` adds its details).

    ``state`` is ``st.state``, or what the caller found out more precisely (``inspect``
    asks a running VMM whether its guest is paused); a guest the space watchdog paused is
    ``paused`` either way."""
    g = inst.g
    parent = inst.parent_name
    parents = root / "snapshots" if inst.parent_kind == "snapshot" else root / "guests"
    if inst.parent_id and not (parents / inst.parent_id).is_dir():
        parent = f"{inst.parent_name} (deleted)"
    mark = None
    if st.proc is not None:
        from vmfork.space.pause import read_mark

        mark = read_mark(g, st.proc)
        if mark is not None:
            state = "paused"
    problem = st.problem or (mark.describe() if mark else _death_cause(g) if state == "stopped" else None)
    last_exit = None
    if st.proc is None and g.vmm_json.exists():  # a VMM that died: its cgroup may say why
        from vmfork import confine

        last_exit = confine.exit_cause(root, inst.id)
    return {
        "id": inst.id, "name": inst.name, "state": state, "problem": problem, "hypervisor": inst.hypervisor,
        "accel": inst.accel, "memory_mib": inst.memory_mib, "vcpus": inst.vcpus,
        "pid": st.proc.pid if st.proc else None, "dir": str(inst.dir),
        "created_at": inst.created_at, "parent": parent, "last_exit": last_exit,
        "network": _network(root, inst),
    }


def _death_cause(g: GuestDir) -> str | None:
    if not g.vmm_json.exists():  # vmfork stopped it (or it never ran): nothing died
        return None
    from vmfork.supervisor import death_cause

    return death_cause(g)


def _network(root: Path, inst: Instance) -> dict[str, Any] | None:
    if inst.network is None:
        return None
    from vmfork import network

    return network.describe(root, inst.id, network.NetSpec.from_json(inst.network))


# --- what recovery would act on ------------------------------------------------------------------
def unfinished(inst: Instance) -> bool:
    """Whether an operation on this instance was cut short (recovery finishes or undoes it):
    a standby, restore, live snapshot or rollback under way, or a creation not finished.
    (A fork of an uncommitted batch: ``.batch-*`` in ``guests/``.)"""
    return bool(inst.pending) or inst.g.unfinished()


def unrecorded_vmms(guests: Path) -> Iterator[tuple[int, Path]]:
    """VMMs (pid, guest dir) running in one of the guest dirs under ``guests`` that no
    instance records as its VMM: orphans, or the VMM of a command at work that has not
    recorded it yet (recovery tells them apart by the instance lock)."""
    prefix = str(guests.resolve()) + "/"
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit():
            continue
        pid = int(pid_s)
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            continue
        if not cwd.startswith(prefix) or not exe.startswith(("qemu-system", "firecracker")):
            continue
        gdir = Path(cwd.removesuffix(" (deleted)"))
        if gdir.exists():
            rec = vmm(GuestDir(gdir))
            if rec is not None and rec.pid == pid:
                continue
        yield pid, gdir


def stale_locks(root: Path) -> list[Path]:
    """Lock files under ``root/locks`` of instances that do not exist (not the data dir's
    own, such as ``global.lock``)."""
    guests, locks = root / "guests", root / "locks"
    out = []
    for f in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        iid = f.name.removesuffix(".lock")
        if is_id(iid) and not (guests / iid).exists() and not (guests / f".tmp-{iid}").exists():
            out.append(f)
    return out


def needs_recovery(root: Path, insts: list[Instance] | None = None) -> bool:
    """Whether ``Manager.recover()`` may have something to do in the data dir ``root`` that
    changes or cleans up after its instances (it is then run, through the CLI): a dot-entry
    in ``guests/`` (an unfinished creation or removal, an uncommitted batch), an instance cut
    short, an unrecorded VMM, a stale lock, an unfinished named snapshot or image pull, the
    network lease of a gone instance. Leftover cgroups (host-wide) are not looked for.
    ``insts``: the data dir's instances, if the caller has read them already."""
    guests = root / "guests"
    names = os.listdir(guests) if guests.is_dir() else []
    if any(n.startswith(".") for n in names):
        return True
    if any(unfinished(i) for i in (instances(guests) if insts is None else insts)):
        return True
    if next(unrecorded_vmms(guests), None) is not None:
        return True
    if stale_locks(root):
        return True
    if any(problem(Slot.load(d), guests) for d in slot_dirs(guests)):  # a warm pool's slot to remove
        return True
    for d, prefixes in ((root / "snapshots", (".tmp-", ".trash-", ".import-")), (root / "images" / "oci", (".tmp-",))):
        if d.is_dir() and any(n.startswith(prefixes) for n in os.listdir(d)):
            return True
    leases = root / "network" / "leases"
    live = set(names)
    return leases.is_dir() and any(n.endswith(".json") and n.removesuffix(".json") not in live
                                   for n in os.listdir(leases))

