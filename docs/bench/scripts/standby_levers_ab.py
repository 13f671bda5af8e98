"""Second standby after 1 MiB dirtied vs the first, with and without two levers, interleaved
(a fresh 256 MiB guest per round and variant; in-process Manager, as the bench does).

    VMFORK_CONFINE=0 PYTHONPATH=src python standby_levers_ab.py DATA_DIR ROUNDS base dontneed devices devices+dontneed

DATA_DIR: a data dir on a loop XFS with its image built (``vmfork image build``).
- ``dontneed``: POSIX_FADV_DONTNEED of the snapshot's mem-file after the first standby (the
  boot's large page-cache folios go; the restore faults the pages in again as small ones);
- ``devices``: the device state saved with ``xen-save-devices-state`` instead of a migration
  (one QMP command; QEMU opens the path itself, so only unconfined VMMs: VMFORK_CONFINE=0).
Prints per run: both standbys (ms), their save and fsync phases, the mem-file's dirty page
cache (MiB, cachestat) before each, the restores; then the medians.
"""

import ctypes
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("VMFORK_QEMU_THP", "0")
os.environ.setdefault("VMFORK_COWEXTSIZE", "4096")
from vmfork.hypervisor import qemu, shared_ram
from vmfork.instances.manager import Manager

root, rounds, variants = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
m = Manager(root)
orig_save_state = qemu.QemuHypervisor._save_state


def dev_save_state(self, q, g, cfg, proc, into, fd):
    if cfg.template:
        return orig_save_state(self, q, g, cfg, proc, into, fd)
    q.execute("xen-save-devices-state", {"filename": str(into.resolve() / "state"), "live": False})
    cfg.template, cfg.snapshot_type = "", shared_ram.DEVICES


def cachestat(path):
    libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, 0)
    out = (ctypes.c_uint64 * 5)()
    fd = os.open(path, os.O_RDONLY)
    try:
        libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(out), 0)
    finally:
        os.close(fd)
    return int(out[1]) * 4096 / 2**20


res = {v: [] for v in variants}
for r in range(rounds):
    for v in variants:
        qemu.QemuHypervisor._save_state = dev_save_state if "devices" in v else orig_save_state
        name = "ab-" + v.replace("+", "-") + f"-{r}"
        m.run(name, memory_mib=256)
        d1 = cachestat(m.find(name).g.memory)
        a = m.standby(name)
        if "dontneed" in v:
            fd = os.open(m.find(name).g.snapshot_latest / "memory", os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        rr = m.restore(name)
        e = m.exec(
            name,
            [
                "sh",
                "-c",
                "mkdir -p /tmp/d && mount -t tmpfs -o size=5m d /tmp/d && dd if=/dev/urandom of=/tmp/d/f bs=1M count=1 2>/dev/null && sync",
            ],
        )
        assert e.exit_code == 0, e
        d2 = cachestat(m.find(name).g.memory)
        b = m.standby(name)
        rr2 = m.restore(name)  # and the guest still works
        assert m.exec(name, ["cat", "/tmp/d/f"]).exit_code == 0
        m.rm(name, force=True)
        row = {
            "first": a["total_s"] * 1000,
            "again": b["total_s"] * 1000,
            "ratio": b["total_s"] / a["total_s"],
            "again_save": b["save_s"] * 1000,
            "again_fsync": b["fsync_s"] * 1000,
            "first_save": a["save_s"] * 1000,
            "dirty1": d1,
            "dirty2": d2,
            "restore1": rr["total_s"] * 1000,
            "restore1_vmm": rr.get("vmm_s", 0) * 1000,
            "restore2": rr2["total_s"] * 1000,
        }
        res[v].append(row)
        print(
            v,
            r,
            json.dumps({k: round(x, 3 if k == "ratio" else 1) for k, x in row.items()}),
            flush=True,
        )
print("=== medians")
for v, rows in res.items():
    print(
        v,
        json.dumps(
            {
                k: round(statistics.median(x[k] for x in rows), 3 if k == "ratio" else 1)
                for k in rows[0]
            }
        ),
    )
