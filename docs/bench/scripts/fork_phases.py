"""Where the host side of a fork to running goes, below the bench's phases: timers wrapped
around confinement set-up (`prepare_guest`, the cgroup, the starter), the supervised spawn,
and each QMP call; N forks of `base` (made if missing) to running, each removed after.

    PYTHONPATH=src python fork_phases.py DATA_DIR N    # VMFORK_CONFINE=0 to compare unconfined
"""
import os, sys, time, statistics, functools, importlib
from pathlib import Path
os.environ.setdefault("VMFORK_QEMU_THP", "0"); os.environ.setdefault("VMFORK_COWEXTSIZE", "4096")
from vmfork.instances.manager import Manager
T = {}
def wrap(modname, attr):
    mod = importlib.import_module(modname)
    f = getattr(mod, attr)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.monotonic()
        try: return f(*a, **k)
        finally: T.setdefault(f"{modname.split('.')[-1]}.{attr}", []).append((time.monotonic()-t)*1000)
    setattr(mod, attr, w)
    return w
import vmfork.confine, vmfork.hypervisor.base, vmfork.supervisor, vmfork.hypervisor.qmp, vmfork.hypervisor.qemu
for m, a in [("vmfork.confine", "prepare_guest"), ("vmfork.confine.cgroups", "create"), ("vmfork.confine", "starter"),
             ("vmfork.hypervisor.base", "start_supervised"), ("vmfork.hypervisor.base", "spawn_vmm"),
             ("vmfork.hypervisor.qemu", "spawn_vmm"), ("vmfork.hypervisor.thp", "popen_without_ram_thp"),
             ("vmfork.hypervisor.qemu", "_uncache_if_shared"), ("vmfork.confine.launch", "child_setup")]:
    wrap(m, a)
from vmfork.hypervisor.qmp import QMP
for a in ("connect", "execute", "pass_fd", "wait_migration"):
    f = getattr(QMP, a)
    def mk(f, a):
        def w(*x, **k):
            t = time.monotonic()
            try: return f(*x, **k)
            finally: T.setdefault(f"QMP.{a}", []).append((time.monotonic()-t)*1000)
        return w
    setattr(QMP, a, classmethod(mk(f.__func__, a)) if a == "connect" else mk(f, a))
root = Path(sys.argv[1]); n = int(sys.argv[2])
m = Manager(root)
if not any(i.name == "base" for i in m.instances()):
    m.run("base", memory_mib=256); m.standby("base")
T.clear()
ph = {}
for i in range(n):
    _, t = m.fork("base", f"p{i}", target_state="running")
    fr = t["fork_restore"]
    for k in ("lookup_s", "clone_s", "metadata_s", "sync_s"): ph.setdefault(k, []).append(t[k]*1000)
    for k in ("prep_s", "spawn_s", "qmp_s", "load_s", "resume_s"): ph.setdefault(k, []).append(fr[k]*1000)
    ph.setdefault("HOST", []).append((t["total_s"] - fr["agent_s"])*1000)
    m.rm(f"p{i}", force=True)
for k, v in list(ph.items()) + list(T.items()):
    print(f"{k:40} n={len(v):3} med {statistics.median(v):7.2f}  min {min(v):7.2f}")
