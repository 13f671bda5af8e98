"""Confinement of every VMM: its own uid/gid, a private mount (and network, IPC) namespace
with a minimal view of the filesystem, ``no_new_privs``, seccomp, and per-instance cgroups.

The manager decides and writes the *plan* of a guest, ``run/confine.json`` (uid, gid,
cgroup, limits, what the VMM may see), before it starts a VMM; ``spawn_vmm`` applies the
plan if there is one (``starter``). Backends know nothing else about it, except that QEMU
adds ``-sandbox`` (``qemu_sandbox_args``). A fork's ``run/`` is never cloned, so a fork
never starts with its source's plan: the manager writes one with the fork's own uid.

``VMFORK_CONFINE``: ``auto`` (default: confine when vmfork runs as root, which it must to
confine), ``1`` (refuse to start a VMM unconfined), ``0`` (off: VMMs run as vmfork's user,
as before; for comparisons in the bench and for test doubles that are no VMM).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmfork.confine import cgroups, ids
from vmfork.confine.cgroups import Limits
from vmfork.errors import HypervisorError, InvalidArgument
from vmfork.layout import GuestDir
from vmfork.util import atomic_write_json

__all__ = ["LIMIT_KEYS", "PLAN", "Limits", "Plan", "default_limits", "enabled", "exit_cause", "load_plan", "qemu_sandbox_args",
           "release", "starter", "usage", "write_plan"]

PLAN = "confine.json"
# QEMU's seccomp sandbox: the default deny-list plus every optional group.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Memory a VMM may use beyond guest RAM (the RAM file's page cache is charged to the VMM's
# cgroup): QEMU's own heap, device state, I/O buffers and, under TCG, its translated-code
# cache. VMFORK_VMM_OVERHEAD_MIB overrides it.
OVERHEAD_MIB = {"tcg": 384, "kvm": 128}
PIDS_LIMIT = 256
LIMIT_KEYS = ("memory_limit_mib", "pids", "cpus", "io_weight")  # instance.json "limits"  # threads + processes: QEMU's I/O thread pool alone may use 64


def mode() -> str:
    v = os.environ.get("VMFORK_CONFINE", "auto")
    if v not in ("auto", "0", "1"):
        raise InvalidArgument(f"invalid VMFORK_CONFINE '{v}': use auto, 1 or 0")
    return v


def enabled() -> bool:
    """True when VMMs are confined (``VMFORK_CONFINE`` and running as root)."""
    m = mode()
    if m == "0":
        return False
    if os.geteuid() != 0:
        if m == "1":
            raise HypervisorError("VMFORK_CONFINE=1 but vmfork does not run as root: a VMM cannot be confined")
        return False
    return True


def default_limits(memory_mib: int, accel: str, *, memory_limit_mib: int | None = None,
                   pids: int | None = None, cpus: float | None = None, io_weight: int | None = None) -> Limits:
    env = os.environ.get("VMFORK_VMM_OVERHEAD_MIB", "")
    overhead = int(env) if env.isdigit() else OVERHEAD_MIB.get(accel, OVERHEAD_MIB["tcg"])
    mem = memory_limit_mib if memory_limit_mib is not None else memory_mib + overhead
    return Limits(memory_bytes=mem << 20, pids=pids or PIDS_LIMIT, cpus=cpus, io_weight=io_weight)


def validate_limits(*, memory_limit_mib: int | None, pids: int | None, cpus: float | None,
                    io_weight: int | None) -> None:
    if memory_limit_mib is not None and memory_limit_mib < 8:
        raise InvalidArgument(f"invalid --memory-limit {memory_limit_mib}M: must be at least 8M")
    if pids is not None and not 8 <= pids <= 1_000_000:
        raise InvalidArgument(f"invalid --pids-limit {pids}: must be between 8 and 1000000")
    if cpus is not None and not 0.01 <= cpus <= 1024:
        raise InvalidArgument(f"invalid --cpus {cpus}: must be between 0.01 and 1024")
    if io_weight is not None:
        if not 1 <= io_weight <= 10000:
            raise InvalidArgument(f"invalid --io-weight {io_weight}: must be between 1 and 10000")
        h, why = cgroups.detect()
        if h is None or cgroups.io_weight_file(h) is None:
            raise InvalidArgument("--io-weight: this host's cgroups have no I/O weight "
                                  f"(no io.weight or blkio.weight{'' if h else ': ' + why})")


@dataclass(frozen=True)
class Plan:
    uid: int
    gid: int
    group: str  # cgroup name under the parent
    limits: Limits
    data_dir: str
    ro_dirs: tuple[str, ...]
    devices: tuple[str, ...]
    groups: tuple[int, ...]
    writable: tuple[str, ...]  # guest-dir subdirs the VMM owns (Firecracker writes files by path)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"limits": self.limits.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        return cls(uid=int(d["uid"]), gid=int(d["gid"]), group=str(d["group"]),
                   limits=Limits.from_json(d["limits"]), data_dir=str(d["data_dir"]),
                   ro_dirs=tuple(d["ro_dirs"]), devices=tuple(d["devices"]), groups=tuple(d["groups"]),
                   writable=tuple(d["writable"]))


def write_plan(g: GuestDir, *, data_dir: Path, iid: str, uid: int, limits: Limits, hypervisor: str,
               accel: str, ro_dirs: list[Path], tun: bool = False) -> Plan:
    """Write ``run/confine.json`` for the next VMM of this guest (``tun``: it opens its TAP)."""
    devices = list(("null", "zero", "full", "random", "urandom")) + (["net/tun"] if tun else [])
    groups: list[int] = []
    if accel == "kvm" or hypervisor == "firecracker":
        devices.append("kvm")
        try:
            groups.append(os.stat("/dev/kvm").st_gid)
        except OSError:
            pass
    plan = Plan(uid=uid, gid=uid, group=cgroups.group_name(data_dir, iid), limits=limits,
                data_dir=str(data_dir.resolve()), ro_dirs=tuple(str(p.resolve()) for p in ro_dirs),
                devices=tuple(devices), groups=tuple(groups),
                writable=("run", "snapshots") if hypervisor == "firecracker" else ())
    g.run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(g.run / PLAN, plan.to_json(), durable=False)
    return plan


def clear_plan(g: GuestDir) -> None:
    (g.run / PLAN).unlink(missing_ok=True)


def load_plan(g: GuestDir) -> Plan | None:
    try:
        return Plan.from_json(json.loads((g.run / PLAN).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HypervisorError(f"unreadable confinement plan {g.run / PLAN}: {e}") from None


def qemu_sandbox_args(g: GuestDir) -> list[str]:
    """``-sandbox ...`` for a confined QEMU (none when this guest has no plan)."""
    return ["-sandbox", QEMU_SANDBOX] if (g.run / PLAN).exists() else []


# --- ownership ------------------------------------------------------------------------------
def _own(path: Path, uid: int, gid: int, mode: int) -> None:
    """Give one file of this guest to the VMM: never through a symlink, never a file that
    has another name somewhere (it could be another instance's)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if mode & 0o100 else 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise HypervisorError(f"refusing to give {path} to the VMM: it has {st.st_nlink} links")
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _own_tree(top: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        _own(Path(dirpath), uid, gid, 0o700)
        for n in filenames:
            p = Path(dirpath) / n
            if stat.S_ISREG(os.lstat(p).st_mode):  # not symlinks; sockets are made anew by the VMM
                _own(p, uid, gid, 0o600)
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]


def prepare_guest(g: GuestDir, plan: Plan, hypervisor: str) -> None:
    """The guest dir as the confined VMM needs it: root-owned, traversable by the VMM's group
    only (0710); the files the VMM opens by path (RAM file, disk, console log) owned by its
    uid, mode 0600. Nothing outside this guest dir is touched; a fork's files are its clones."""
    _own(g.path, 0, plan.gid, 0o710)
    _own(g.logs, 0, plan.gid, 0o710)  # the VMM opens its console log in it by path
    if not g.memory.exists() and hypervisor == "qemu":
        fd = os.open(g.memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
    if not g.console_log.exists():
        os.close(os.open(g.console_log, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for f in (g.memory, g.disk, g.console_log):
        if f.exists():
            _own(f, plan.uid, plan.gid, 0o600)
    for rel in plan.writable:
        _own_tree(g.path / rel, plan.uid, plan.gid)
    for d in plan.ro_dirs:  # image files hold nothing secret: readable by every VMM uid
        dmode = stat.S_IMODE(os.stat(d).st_mode)
        if dmode & 0o011 != 0o011:  # built under a tight umask: let the VMM uids through
            os.chmod(d, dmode | 0o711)
        for f in Path(d).iterdir():
            st = f.stat()
            if stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IROTH:
                os.chmod(f, stat.S_IMODE(st.st_mode) | 0o444)


# --- start ----------------------------------------------------------------------------------
def mountpoint(data_dir: Path) -> Path:
    """An empty dir on the host: each confined VMM mounts its tmpfs root here, privately."""
    p = data_dir / ".confine-root"
    if not p.is_dir():
        p.mkdir(mode=0o700, exist_ok=True)
    return p


def starter(g: GuestDir, hypervisor: str, argv0: str, inner: Any, netns: str = "",
            ro_paths: tuple[str, ...] = ()) -> Any:
    """``inner`` (a Popen-like starter) wrapped to start the VMM confined by this guest's
    plan (in network namespace ``netns`` if given); None when the guest has no plan.
    ``ro_paths``: more files and dirs the VMM sees read-only at their paths (a fork's shared
    template, which must be readable by the VMM's uid: ``shared_ram.ensure_template``)."""
    plan = load_plan(g)
    if plan is None:
        return None
    from vmfork.confine.launch import Spec, child_setup, host_root_entries

    h, why = cgroups.detect()
    if h is None:
        raise HypervisorError(f"cannot confine the VMM: {why}")
    prepare_guest(g, plan, hypervisor)
    try:
        cgroups.create(h, plan.group, plan.limits)
    except OSError as e:
        raise HypervisorError(f"cannot set up the cgroup of {g.path.name}: {e.strerror or e}") from None
    links, dirs = host_root_entries()
    ro = list(plan.ro_dirs)
    # The VMM binary's dir (outside /usr: e.g. .tools/bin). A bare name is found on PATH, as
    # exec will find it: resolved against the cwd instead, it bound the cwd into the VMM's
    # root, over the image dir when the data dir lay under the cwd ("Permission denied").
    # Bound at the path exec is given and at its real one (they differ when a dir on the way is
    # a symlink, e.g. a worktree's .tools linked to the main checkout's): exec resolves the
    # first inside the VMM's root, the binary's own lookups (-L, its libraries) the second.
    exe = argv0 if "/" in argv0 else (shutil.which(argv0) or "")
    exe_dirs = {os.path.dirname(os.path.abspath(exe)), os.path.dirname(os.path.realpath(exe))} if exe else set()
    for exe_dir in sorted(exe_dirs):
        if not exe_dir.startswith("/usr/") and exe_dir not in ro:
            ro.append(exe_dir)
    ro_files = [f for f in ("/etc/ld.so.cache",) if os.path.exists(f)]
    for p in ro_paths:  # bound at the path the VMM is given
        (ro if os.path.isdir(p) else ro_files).append(os.path.abspath(p))
    ro.sort(key=lambda d: d.count("/"))  # a parent first: bound later, it would hide its child
    spec = Spec(
        uid=plan.uid, gid=plan.gid, groups=plan.groups, mountpoint=str(mountpoint(Path(plan.data_dir))),
        guest_dir=str(g.path.resolve()), ro_dirs=tuple(ro),
        devices=tuple(d for d in plan.devices if os.path.exists(f"/dev/{d}")),
        procs_files=tuple(str(p) for p in cgroups.procs_files(h, plan.group)),
        root_links=links, root_dirs=dirs,
        ro_files=tuple(ro_files),
        netns=netns, new_net=not netns,
    )
    setup = child_setup(spec)
    base = inner

    def start(args: list[str], **kw: Any) -> Any:
        import subprocess

        from vmfork.supervisor import EXIT_FILE

        record = g.path / EXIT_FILE  # the supervising shell runs confined too: it writes its record
        if record.is_file():
            _own(g.run, 0, plan.gid, 0o710)
            _own(record, plan.uid, plan.gid, 0o600)
        return (base or subprocess.Popen)(args, preexec_fn=setup, **kw)

    return start


# --- after ----------------------------------------------------------------------------------
def release(data_dir: Path, iid: str) -> None:
    """The instance is gone (its VMM stopped): remove its cgroup, free its uid."""
    h, _ = cgroups.detect()
    if h is not None:
        cgroups.remove(h, cgroups.group_name(data_dir, iid))
    ids.free(data_dir, iid)


def clean(data_dir: Path, live: set[str]) -> list[str]:
    """Remove this data dir's cgroups whose instance is gone (recovery)."""
    h, _ = cgroups.detect()
    if h is None:
        return []
    prefix = cgroups.data_dir_prefix(data_dir)
    owned = ids.live_owners()  # instances of any data dir on this host that have a uid
    out = []
    for name in sorted(h.groups()):
        iid = name.partition(".")[2]
        if name.startswith(prefix):
            if iid not in live and cgroups.remove(h, name, timeout=0):
                out.append(f"removed the leftover cgroup {h.parent_name}/{name}")
        elif iid not in owned:  # another data dir's, whose instance is gone (e.g. a deleted dir)
            cgroups.remove(h, name, timeout=0)
    return out


def usage(data_dir: Path, iid: str) -> dict[str, Any] | None:
    h, _ = cgroups.detect()
    return None if h is None else cgroups.stats(h, cgroups.group_name(data_dir, iid))


def exit_cause(data_dir: Path, iid: str) -> str | None:
    """Why the last VMM of this instance died, if its cgroup knows: "memory limit"."""
    u = usage(data_dir, iid)
    if u and u.get("oom_kills"):
        limit = u.get("memory_limit_bytes") or 0
        return f"memory limit ({limit >> 20} MiB; the cgroup killed the VMM)"
    return None
