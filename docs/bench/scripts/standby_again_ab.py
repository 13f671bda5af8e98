"""Second standby after 1 MiB dirtied vs the first: vmfork before and after the change that
saves the device state alone, drops a cold boot's page cache once and issues the commit's
fsyncs together (issue 16), interleaved in one process (a fresh 256 MiB guest per round
and variant on one loop XFS; in-process Manager, as the bench's standby part).

    PYTHONPATH=src python docs/bench/scripts/standby_again_ab.py WORK ROUNDS [VARIANT...]

WORK: a scratch dir (a loop XFS is made under it). Variants (default: all three):
- ``before``: the standby as it was (a migration to an fd, no drop, one fsync after another
  at the commit);
- ``after``: device state alone (``xen-save-devices-state``), the commit's fsyncs issued
  together, and the page-cache drop after the first standby (what this vmfork does);
- ``nodrop``: ``after`` without the drop.
Prints one JSON line per run, then medians and ranges. ``first_less_drop`` is the first
standby without its page-cache drop (the drop's cost charged to the next restore instead).
"""

import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("VMFORK_QEMU_THP", "0")
os.environ.setdefault("VMFORK_COWEXTSIZE", "4096")
from vmfork import util
from vmfork.bench import probes
from vmfork.hypervisor import qemu
from vmfork.instances.manager import Manager

work, rounds = Path(sys.argv[1]), int(sys.argv[2])
variants = sys.argv[3:] or ["before", "after", "nodrop"]
new_save_state, new_drop = qemu.QemuHypervisor._save_state, util.drop_page_cache
new_together = util.fsync_together


def one_by_one(paths: list[Path]) -> None:
    for p in paths:
        util.fsync_file(p)


def old_save_state(self, q, g, cfg, proc, into, fd):  # vmfork 1c6e8ab
    if cfg.template or cfg.snapshot_type:
        return new_save_state(self, q, g, cfg, proc, into, fd)
    q.set_migration_capabilities()
    q.pass_fd(fd, "vmfork-state")
    q.execute("migrate", {"uri": "fd:vmfork-state"})
    q.wait_migration()
    cfg.template = ""
    return None


def use(v: str) -> None:
    qemu.QemuHypervisor._save_state = old_save_state if v == "before" else new_save_state
    util.drop_page_cache = new_drop if v == "after" else (lambda p: None)
    util.fsync_together = one_by_one if v == "before" else new_together


DIRTY = ("mkdir -p /tmp/d && mount -t tmpfs -o size=5m d /tmp/d && "
         "dd if=/dev/urandom of=/tmp/d/f bs=1M count=1 2>/dev/null && sync")
res: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
with probes.loop_fs("xfs", 6144, work) as mnt:
    m = Manager(mnt / "data")
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            use(v)
            name = f"{v}-{r}"
            m.run(name, memory_mib=256)
            a = m.standby(name)
            r1 = m.restore(name)
            assert m.exec(name, ["sh", "-c", DIRTY]).exit_code == 0
            dirty = (probes.dirty_bytes(m.find(name).g.memory) or 0) / 2**20
            b = m.standby(name)
            r2 = m.restore(name)
            assert m.exec(name, ["cat", "/tmp/d/f"]).exit_code == 0  # and the guest still works
            m.rm(name, force=True)
            first, again, drop = a["total_s"] * 1000, b["total_s"] * 1000, a.get("uncache_s", 0) * 1000
            row = {"ratio": again / first, "ratio_less_drop": again / (first - drop), "first": first,
                   "first_less_drop": first - drop, "again": again, "again_save": b["save_s"] * 1000,
                   "again_fsync": b["fsync_s"] * 1000, "dirty_mib": dirty, "restore1": r1["total_s"] * 1000,
                   "restore2": r2["total_s"] * 1000}
            res[v].append(row)
            print(v, r, json.dumps({k: round(x, 3 if k.startswith("ratio") else 1) for k, x in row.items()}), flush=True)
print("=== medians [min-max]")
for v, rows in res.items():
    out = {}
    for k in rows[0]:
        xs = [x[k] for x in rows]
        nd = 3 if k.startswith("ratio") else 1
        out[k] = f"{round(statistics.median(xs), nd)} [{round(min(xs), nd)}-{round(max(xs), nd)}]"
    print(v, len(rows), json.dumps(out))
