"""Density of running forks: the guest RAM they hold together against one fork alone.

A source writes ``STATE_MIB`` of fresh pages into its RAM (a tmpfs file) and stands by; N
forks of it run side by side, and their guest-RAM PSS (the PSS of the VMM's mapping of guest
RAM, from ``/proc/PID/smaps``) is summed:
- ``idle``: right after the restore;
- ``warmed``: each fork has read the state its source wrote (as a forked process reads its
  heap);
- ``dirty16``: each fork has then written 16 MiB of its own.
With a shared template (``hypervisor.shared_ram``, mode ``shared``) against each fork on its
own clone (mode ``clone``, ``VMFORK_SHARED_RAM=0``); VMMs confined as by default (as root),
which the shared template needs a QEMU >= 8.2 for (the 10.0.2 of ``.tools/qemu``; on 7.2 a
confined fork maps its own clone: both modes measure the same). The VMM's own PSS
(everything but guest RAM) is recorded alongside.

``python -m vmfork.bench.density [--n 1,4,16] [--modes shared,clone] [--unconfined]
[--source instance|snapshot]``
measures this alone on a fresh loop XFS and writes ``OUT/density.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmfork.bench.runner import Bench
    from vmfork.bench.stats import Record
    from vmfork.instances.manager import Manager

MiB = 1 << 20
STATE_MIB = 64
DIRTY_MIB = 16
MODES = {"shared": {"VMFORK_SHARED_RAM": "auto"}, "clone": {"VMFORK_SHARED_RAM": "0"}}


def ram_and_vmm_pss(pid: int, ram_bytes: int) -> tuple[int, int]:
    """(PSS of the guest-RAM mapping, PSS of everything else) of a VMM, in bytes. The guest
    RAM mapping is the file mapping of exactly the guest's RAM size."""
    ram = other = 0
    size = 0
    is_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        f = line.split()
        if not f:
            continue
        if not f[0].endswith(":"):  # a mapping's header: start-end perms offset dev inode [path]
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            size = hi - lo
            is_ram = size == ram_bytes and len(f) >= 6 and f[5].startswith("/")
        elif f[0] == "Pss:":
            kb = int(f[1]) * 1024
            if is_ram:
                ram += kb
            else:
                other += kb
    return ram, other


def density(bench: Bench, modes: tuple[str, ...] = tuple(MODES), source: str = "instance") -> None:
    """``source``: the forks are of a standby instance (``instance``) or of a named snapshot
    of it (``snapshot``: the template is the snapshot's own mem-file)."""
    from vmfork import confine
    from vmfork.bench.runner import env
    from vmfork.hypervisor.qemu import QemuHypervisor

    fs = "xfs" if "xfs" in bench.mounts else next(iter(bench.mounts))
    mib = bench.plan.base_mib
    state_mib = min(STATE_MIB, mib // 4)  # room for the guest's own use (a 128 MiB smoke guest)
    dirty_mib = min(DIRTY_MIB, mib // 8)
    for mode in modes:
        with env(MODES[mode]):
            confined = confine.enabled()
            qemu = QemuHypervisor().version()
            m = _manager(bench, fs, mode)
            if not any(i.name == "dsrc" for i in m.instances()):
                bench.say(f"[8] density/{mode}: source with {state_mib} MiB of state")
                bench.boot(m, "dsrc", mib)
                bench.write_in_guest(m, "dsrc", state_mib, "state")
                m.standby("dsrc")
            if source == "snapshot":
                from vmfork.errors import NotFound
                from vmfork.instances.snapshot_ops import store

                try:
                    store(m).find("dsnap")
                except NotFound:
                    m.snapshot_create("dsrc", "dsnap")
            single: dict[str, Record] = {}
            for n in bench.plan.density:
                bench.say(f"[8] density/{mode}: {n} forks running")
                names = [f"dn-{k}" for k in range(n)]
                for name in names:
                    if source == "snapshot":
                        m.snapshot_fork("dsnap", name, target_state="running")
                    else:
                        m.fork("dsrc", name, target_state="running")
                for phase in ("idle", "warmed", "dirty16"):
                    if phase == "warmed":
                        for name in names:
                            bench.sh(m, name, "md5sum /tmp/state/f")  # reads it (cat to /dev/null may splice)
                    elif phase == "dirty16":
                        for name in names:
                            bench.write_in_guest(m, name, dirty_mib, "dirty")
                    time.sleep(0.5)
                    ram, vmm = _pss(m, names, mib << 20)
                    p: dict[str, Any] = {"fs": fs, "mode": mode, "phase": phase, "n": n, "guest_mib": mib,
                                         "state_mib": state_mib, "dirty_mib": dirty_mib, "confined": confined,
                                         "qemu": qemu, "source": source}
                    total = bench.add("density_ram_pss_sum_mib", [sum(ram) / MiB], "MiB", **p)
                    bench.add("density_ram_pss_per_fork_mib", [x / MiB for x in ram], "MiB", **p)
                    bench.add("density_vmm_pss_per_fork_mib", [x / MiB for x in vmm], "MiB", **p)
                    if n == 1:
                        single[phase] = total
                    elif phase in single:
                        bench.ratio("density_sum_over_single", total, single[phase], **p)
                bench.rm_all(m, "dn-")


def _manager(bench: Bench, fs: str, mode: str) -> Manager:
    from vmfork.instances.manager import Manager

    key = (fs, f"density-{mode}")
    if key not in bench.managers:
        bench.managers[key] = Manager(bench.mounts[fs] / f"data-density-{mode}")
    return bench.managers[key]


def _pss(m: Manager, names: list[str], ram_bytes: int) -> tuple[list[int], list[int]]:
    ram: list[int] = []
    vmm: list[int] = []
    for name in names:
        pid = m.describe(m.find(name))["pid"]
        if pid:
            r, o = ram_and_vmm_pss(int(pid), ram_bytes)
            ram.append(r)
            vmm.append(o)
    return ram, vmm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmfork.bench.density", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1,4,16", help="how many forks run side by side, comma-separated [1,4,16]")
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)} [all]")
    ap.add_argument("--memory", type=int, default=256, help="guest MiB [256]")
    ap.add_argument("--unconfined", action="store_true", help="VMMs unconfined (VMFORK_CONFINE=0)")
    ap.add_argument("--source", choices=("instance", "snapshot"), default="instance",
                    help="fork a standby instance, or a named snapshot of it [instance]")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"), help="where density.json goes [docs/bench]")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"), help="scratch dir for the loop XFS [/var/tmp]")
    args = ap.parse_args(argv)
    modes = tuple(x for x in args.modes.split(",") if x)
    if not modes or any(x not in MODES for x in modes):
        ap.error(f"--modes: use some of {', '.join(MODES)}")
    try:
        ns = [int(x) for x in args.n.split(",")]
    except ValueError:
        ap.error(f"--n: not a list of numbers: {args.n}")
    import os
    import shlex
    from datetime import UTC, datetime

    from vmfork.bench import probes, report
    from vmfork.bench.runner import Bench, Plan, env
    from vmfork.hypervisor.qemu import QemuHypervisor

    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    plan = Plan.for_mode("full")
    plan.density, plan.base_mib = ns, args.memory
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    with env({"VMFORK_CONFINE": "0"} if args.unconfined else {"VMFORK_CONFINE": os.environ.get("VMFORK_CONFINE", "auto")}), \
            tempfile.TemporaryDirectory(prefix="vmfork-bench-density-", dir=args.work) as work:
        bench = Bench(plan, Path(work), say)
        bench.host = probes.host_facts(QemuHypervisor().version())
        bench.host["load_at_start"] = round(probes.loadavg(), 2)
        with probes.loop_fs("xfs", plan.loop_mib, Path(work)) as mnt:
            bench.mounts["xfs"] = mnt
            try:
                density(bench, modes, args.source)
            finally:
                bench.cleanup()
        bench.host["load_at_end"] = round(probes.loadavg(), 2)
    for r in bench.records:
        r["host"] = dict(bench.host)
    command = "python -m vmfork.bench.density" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    report.write_json(args.out / "density.json", {
        "schema": "vmfork-bench-density/1", "command": command, "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1), "host": bench.host, "records": bench.records})
    for r in bench.records:
        if r["metric"] in ("density_ram_pss_sum_mib", "density_sum_over_single"):
            p = r["params"]
            print(f"{p['source']:8} {p['mode']:7} confined={p['confined']!s:5} {p['phase']:8} n={p['n']:<3} "
                  f"{r['metric']:26} {r['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
