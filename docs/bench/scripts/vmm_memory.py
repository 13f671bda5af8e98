"""The VMM's own memory per mapping (smaps: PSS, USS) of one running fork, idle and after a
workload (md5sum of 64 MiB in a tmpfs, then 200 rounds of `ls /; cat /proc/cpuinfo`, which
churns translated code), with its speed, per TCG buffer size (`VMFORK_TCG_TB_MIB`, 0 = QEMU's
default) and environment given to the VMM.

    PYTHONPATH=src python vmm_memory.py DATA_DIR TB[,TB...] [RUNS] [VAR=VALUE ...]

DATA_DIR gets a 256 MiB `base` guest in standby if it has none (on XFS: forks are reflinks).
Run it with `PYTHONPATH` at two checkouts to compare before and after.
"""
import os, sys, time, statistics, json
from pathlib import Path
from collections import defaultdict
os.environ.setdefault("VMFORK_QEMU_THP", "0"); os.environ.setdefault("VMFORK_COWEXTSIZE", "4096")
from vmfork.instances.manager import Manager
MiB = 1 << 20
def smaps(pid, ram):
    out = defaultdict(lambda: [0, 0, 0, 0])  # pss, rss, size kB, private (uss) kB
    key = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        f = line.split()
        if not f[0].endswith(":"):
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            name = f[5] if len(f) >= 6 else "[anon]"
            size = hi - lo
            if size == ram and name.startswith("/"): name = "GUEST RAM"
            elif name == "[anon]" and size >= 2 * MiB and f[1].startswith("rwx"): name = "[anon rwx: TCG buffer]"
            elif name == "[anon]" and size >= 60 * MiB: name = "[anon big: arenas]"
            elif name.startswith("/"): name = os.path.basename(name)
            key = name
            out[key][2] += size >> 10
        elif f[0] == "Pss:": out[key][0] += int(f[1])
        elif f[0] == "Rss:": out[key][1] += int(f[1])
        elif f[0] in ("Private_Clean:", "Private_Dirty:"): out[key][3] += int(f[1])
    return out
root = Path(sys.argv[1]); tbs = [int(x) for x in sys.argv[2].split(",")]; runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
extra_env = dict(kv.split("=", 1) for kv in sys.argv[4:])
m = Manager(root)
if not any(i.name == "base" for i in m.instances()):
    m.run("base", memory_mib=256); m.standby("base")
res = {}
for tb in tbs:
    os.environ["VMFORK_TCG_TB_MIB"] = str(tb)
    os.environ.update(extra_env)
    name = f"tb{tb}"
    m.fork("base", name, target_state="running")
    pid = int(m.describe(m.find(name))["pid"])
    time.sleep(1)
    idle = smaps(pid, 256 * MiB)
    m.exec(name, ["sh", "-c", "mkdir -p /tmp/w && mount -t tmpfs -o size=70m w /tmp/w && dd if=/dev/urandom of=/tmp/w/f bs=1M count=64 2>/dev/null"], timeout=300)
    ts = []
    for _ in range(runs):
        t = time.monotonic(); m.exec(name, ["md5sum", "/tmp/w/f"], timeout=300); ts.append(time.monotonic() - t)
    # a mixed workload: many small processes (code translation churn)
    t = time.monotonic(); m.exec(name, ["sh", "-c", "for i in $(seq 200); do ls / >/dev/null; cat /proc/cpuinfo > /dev/null; done"], timeout=300); churn = time.monotonic() - t
    warm = smaps(pid, 256 * MiB)
    tot = lambda d, i=0: sum(v[i] for k, v in d.items() if k != "GUEST RAM") / 1024
    print(f"tb={tb} env={extra_env}: md5 64MiB {statistics.median(ts):.2f}s {[round(x,2) for x in ts]} churn {churn:.2f}s; VMM PSS idle {tot(idle):.1f} warmed {tot(warm):.1f} MiB; USS idle {tot(idle,3):.1f} warmed {tot(warm,3):.1f}", flush=True)
    top = sorted(((k, v) for k, v in warm.items() if k != "GUEST RAM"), key=lambda kv: -kv[1][0])[:40]
    for k, v in top:
        print(f"    {k[:40]:40} pss {v[0]/1024:6.2f} (idle {idle.get(k,[0])[0]/1024:6.2f}) uss {v[3]/1024:6.2f} (idle {idle.get(k,[0,0,0,0])[3]/1024:6.2f}) rss {v[1]/1024:6.2f} size {v[2]/1024:8.1f}")
    res[tb] = {"md5": ts, "churn": churn, "idle": tot(idle), "warm": tot(warm), "maps": {k: v for k, v in warm.items()}, "maps_idle": dict(idle)}
    m.rm(name, force=True)
json.dump(res, open(f"vmm-memory-{int(time.time())}.json", "w"))
