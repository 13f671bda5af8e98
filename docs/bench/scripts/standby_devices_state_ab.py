"""One 256 MiB guest, standby/restore cycles alternating how the device state is saved:
migration to an fd (what vmfork does) vs ``xen-save-devices-state`` (one QMP command).

    VMFORK_CONFINE=0 PYTHONPATH=src python standby_devices_state_ab.py DATA_DIR CYCLES
"""

import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("VMFORK_QEMU_THP", "0")
os.environ.setdefault("VMFORK_COWEXTSIZE", "4096")
from vmfork.hypervisor import qemu, shared_ram
from vmfork.instances.manager import Manager

root, cycles = Path(sys.argv[1]), int(sys.argv[2])
m = Manager(root)
orig = qemu.QemuHypervisor._save_state


def dev(self, q, g, cfg, proc, into, fd):
    q.execute("xen-save-devices-state", {"filename": str(into.resolve() / "state"), "live": False})
    cfg.template, cfg.snapshot_type = "", shared_ram.DEVICES


name = "qmpab"
m.run(name, memory_mib=256)
m.standby(name)
m.restore(name)
res = {"migrate": [], "devices": []}
for i in range(cycles):
    for v in ("migrate", "devices") if i % 2 == 0 else ("devices", "migrate"):
        qemu.QemuHypervisor._save_state = dev if v == "devices" else orig
        e = m.exec(name, ["sh", "-c", "echo x > /tmp/x"])
        assert e.exit_code == 0
        r = m.standby(name)
        res[v].append(
            {
                k: r[k] * 1000
                for k in (
                    "save_s",
                    "save_qmp_s",
                    "save_state_s",
                    "save_quit_s",
                    "save_exit_s",
                    "fsync_s",
                    "total_s",
                )
            }
        )
        m.restore(name)
    print(
        i,
        json.dumps({v: {k: round(x, 1) for k, x in rows[-1].items()} for v, rows in res.items()}),
        flush=True,
    )
assert m.exec(name, ["cat", "/tmp/x"]).exit_code == 0
m.rm(name, force=True)
for v, rows in res.items():
    print(v, json.dumps({k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}))
