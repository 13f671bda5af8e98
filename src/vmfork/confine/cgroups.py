"""Per-instance cgroups, on cgroup v2 or on the v1 hierarchies (memory, pids, cpu, blkio).

Each running VMM is in ``<hierarchy>/vmfork/<group>`` (``<group>`` = a short hash of the
data dir + the instance id; ``VMFORK_CGROUP_PARENT`` renames ``vmfork``). The group is made
afresh (counters at zero) each time a VMM starts, the VMM joins it before it executes, and it
stays after the VMM exits so that ``ps``/``inspect`` can tell a VMM the memory limit killed
(its ``oom_kill`` counter); ``rm`` and recovery remove it.

Limits: memory (guest RAM + ``overhead_mib``), pids, optional CPU quota (``--cpus 0.5`` =
half a core), optional I/O weight (1-10000 as on v2; v1 ``blkio.weight`` is 10-1000).
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmfork import retry

CONTROLLERS = ("memory", "pids", "cpu", "io")
_V1_NAMES = {"memory": "memory", "pids": "pids", "cpu": "cpu", "io": "blkio"}
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpus: float | None = None
    io_weight: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "pids": self.pids, "cpus": self.cpus,
                "io_weight": self.io_weight}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Limits:
        return cls(int(d["memory_bytes"]), int(d["pids"]),
                   None if d.get("cpus") is None else float(d["cpus"]),
                   None if d.get("io_weight") is None else int(d["io_weight"]))


@dataclass(frozen=True)
class Hierarchy:
    """Where each controller lives: version 2 (one dir) or 1 (one mount per controller)."""

    version: int
    dirs: dict[str, Path]  # controller -> mount point of its hierarchy (v2: all the same)

    @property
    def parent_name(self) -> str:
        return os.environ.get("VMFORK_CGROUP_PARENT") or "vmfork"

    def paths(self, group: str) -> dict[str, Path]:
        return {c: d / self.parent_name / group for c, d in self.dirs.items()}

    def groups(self) -> set[str]:
        """Every group under our parent, in any controller."""
        out: set[str] = set()
        for d in set(self.dirs.values()):
            p = d / self.parent_name
            if p.is_dir():
                out |= {x.name for x in p.iterdir() if x.is_dir()}
        return out


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    out: list[tuple[str, str, str]] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            out.append((fields[4].replace("\\040", " "), rest[0], rest[2]))
    return out


def detect() -> tuple[Hierarchy | None, str]:
    """The hierarchy to use, and a one-line description (or why there is none)."""
    v1: dict[str, Path] = {}
    v2root: Path | None = None
    for mnt, fstype, opts in _mounts():
        if fstype == "cgroup2":
            if v2root is None or mnt == "/sys/fs/cgroup":
                v2root = Path(mnt)
            continue
        for c, name in _V1_NAMES.items():
            if name in opts.split(","):
                v1.setdefault(c, Path(mnt))
    if v2root is not None:
        try:
            avail = set((v2root / "cgroup.controllers").read_text().split())
        except OSError:
            avail = set()
        if {"memory", "pids"} <= avail:
            dirs = {c: v2root for c in CONTROLLERS if c in avail}
            return Hierarchy(2, dirs), f"cgroup v2 at {v2root} ({', '.join(sorted(dirs))})"
    if "memory" in v1 and "pids" in v1:
        desc = ", ".join(f"{_V1_NAMES[c]}" for c in v1)
        return Hierarchy(1, v1), f"cgroup v1 ({desc}) under {os.path.commonpath([str(p) for p in v1.values()])}"
    return None, "no cgroup hierarchy with the memory and pids controllers is mounted"


def group_name(data_dir: Path, iid: str) -> str:
    h = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{h}.{iid}"


def data_dir_prefix(data_dir: Path) -> str:
    return group_name(data_dir, "")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def io_weight_file(h: Hierarchy) -> str | None:
    """The I/O weight knob this host has, if any (v2 io.weight / io.bfq.weight, v1 blkio.weight / blkio.bfq.weight)."""
    d = h.dirs.get("io")
    if d is None:
        return None
    names = ("io.weight", "io.bfq.weight") if h.version == 2 else ("blkio.weight", "blkio.bfq.weight")
    probe = d / h.parent_name if (d / h.parent_name).is_dir() else d
    for n in names:
        if (probe / n).exists() or (h.version == 1 and (d / n).exists()):
            return n
    if h.version == 2:  # the root has no io.weight; a child shows it once io is enabled
        for n in names:
            for child in d.iterdir() if d.is_dir() else []:
                if (child / n).exists():
                    return n
    return None


def _enable_v2(root: Path, parent: Path) -> None:
    want = [c for c in CONTROLLERS if (root / "cgroup.controllers").exists()
            and c in (root / "cgroup.controllers").read_text().split()]
    for d in (root, parent):
        have = set((_read(d / "cgroup.subtree_control") or "").split())
        for c in want:
            if c not in have:
                try:
                    _write(d / "cgroup.subtree_control", f"+{c}")
                except OSError:
                    pass  # e.g. cpu with realtime tasks in the root: that controller is left out


def create(h: Hierarchy, group: str, limits: Limits) -> dict[str, Path]:
    """(Re)make ``group`` with ``limits``; returns its dir per controller."""
    paths = h.paths(group)
    remove(h, group)
    if h.version == 2:
        root = next(iter(h.dirs.values()))
        parent = root / h.parent_name
        parent.mkdir(exist_ok=True)
        _enable_v2(root, parent)
        d = paths["memory"]
        d.mkdir(exist_ok=True)  # still busy (a VMM exiting): reused, its counters kept
        _write(d / "memory.max", str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        _write(d / "pids.max", str(limits.pids))
        if limits.cpus is not None:
            _write(d / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if limits.io_weight is not None:
            knob = io_weight_file(h)
            if knob is None:
                raise OSError(errno.ENOTSUP, "no I/O weight on this host")
            _write(d / knob, f"default {limits.io_weight}" if knob == "io.weight" else str(limits.io_weight))
        return paths
    for d in paths.values():
        d.parent.mkdir(exist_ok=True)
        d.mkdir(exist_ok=True)
    _write(paths["memory"] / "memory.limit_in_bytes", str(limits.memory_bytes))
    _write(paths["pids"] / "pids.max", str(limits.pids))
    if limits.cpus is not None and "cpu" in paths:
        _write(paths["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(paths["cpu"] / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))
    if limits.io_weight is not None:
        knob = io_weight_file(h)
        if knob is None or "io" not in paths:
            raise OSError(errno.ENOTSUP, "no I/O weight on this host")
        _write(paths["io"] / knob, str(max(10, min(1000, limits.io_weight // 10))))
    return paths


def procs_files(h: Hierarchy, group: str) -> list[Path]:
    """The ``cgroup.procs`` files a process writes ``0`` to, to join ``group``."""
    return sorted({p / "cgroup.procs" for p in h.paths(group).values()})


def remove(h: Hierarchy, group: str, timeout: float = 2.0) -> bool:
    """Remove ``group`` once no process is left in it; False if one still is."""
    ok = True
    for d in sorted(set(h.paths(group).values())):
        if not d.is_dir():
            continue
        for _ in retry.attempts(timeout):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
        else:
            ok = False
    return ok


def stats(h: Hierarchy, group: str) -> dict[str, Any] | None:
    """Limits and usage of ``group``, or None if it does not exist."""
    p = h.paths(group)
    mem = p["memory"]
    if not mem.is_dir():
        return None

    def num(path: Path) -> int | None:
        v = _read(path)
        if v is None:
            return None
        if v == "max":
            return -1
        try:
            return int(v.split()[0])
        except ValueError:
            return None

    def keyed(path: Path, key: str) -> int | None:
        for line in (_read(path) or "").splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return None

    pids = p["pids"]
    if h.version == 2:
        out: dict[str, Any] = {
            "memory_limit_bytes": num(mem / "memory.max"), "memory_bytes": num(mem / "memory.current"),
            "memory_peak_bytes": num(mem / "memory.peak"), "oom_kills": keyed(mem / "memory.events", "oom_kill"),
            "pids_limit": num(pids / "pids.max"), "pids": num(pids / "pids.current"),
        }
        cpu_max = (_read(mem / "cpu.max") or "max").split()
        out["cpus"] = None if cpu_max[0] == "max" else int(cpu_max[0]) / int(cpu_max[1])
        usage = keyed(mem / "cpu.stat", "usage_usec")
        out["cpu_seconds"] = None if usage is None else usage / 1e6
    else:
        out = {
            "memory_limit_bytes": num(mem / "memory.limit_in_bytes"), "memory_bytes": num(mem / "memory.usage_in_bytes"),
            "memory_peak_bytes": num(mem / "memory.max_usage_in_bytes"),
            "oom_kills": keyed(mem / "memory.oom_control", "oom_kill"),
            "pids_limit": num(pids / "pids.max"), "pids": num(pids / "pids.current"),
        }
        cpu = p.get("cpu")
        quota = num(cpu / "cpu.cfs_quota_us") if cpu else None
        period = num(cpu / "cpu.cfs_period_us") if cpu else None
        out["cpus"] = quota / period if quota and quota > 0 and period else None
        usage = keyed(cpu / "cpu.stat", "usage_usec") if cpu else None
        out["cpu_seconds"] = None if usage is None else usage / 1e6
    knob = io_weight_file(h)
    io = p.get("io")
    out["io_weight"] = _read(io / knob) if knob and io and (io / knob).exists() else None
    out["path"] = str(mem)
    return out
