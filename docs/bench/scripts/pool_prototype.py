"""Prototype figures for a pool of pre-started VMMs, by hand (the bench's `pool` part is the
maintained version): alternating, the bench's floor (bare restore, vmfork's restore argv),
the same with the old -kernel/-initrd/-append, and a QEMU pre-started on placeholder files
made a fork (FICLONE into its open inodes, rename, migrate-incoming, cont); the agent must
answer on it and its mem-file must not be the source's inode.

    PYTHONPATH=src python pool_prototype.py DATA_DIR RUNS    # DATA_DIR on XFS, with a standby `base`
"""
import fcntl, os, shutil, statistics, subprocess, sys, time
from pathlib import Path

from vmfork import util
from vmfork.bench.bare import RawQMP, bare_quit, bare_restore
from vmfork.forkvm import clone_file
from vmfork.guest.agent import AgentClient
from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.qemu import QemuHypervisor, boot_args
from vmfork.instances.manager import Manager
FICLONE = 0x40049409
root = Path(sys.argv[1]); n = int(sys.argv[2]); mnt = root.parent
m = Manager(root); src = m.find("base"); snap = src.g.snapshot_latest
cfg = VMConfig.from_json({k: v for k, v in util.read_json(snap / "config.json").items() if k != "taken_at"})
image = m.image(cfg.image_digest); hv = QemuHypervisor()
def smaps_kb(pid, field):
    tot = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith(field + ":"): tot += int(line.split()[1])
    return tot / 1024
res = {"floor": [], "floor_kernel": [], "floor_kernel_qmp": [], "floor_qmp": [], "pooled": [], "pooled_clone": [], "pool_wait": [], "idle_pss": [], "idle_uss": []}
for i in range(n):
    for kind in ("floor", "floor_kernel"):
        b = mnt / f"bare-{i}"; (b / "run").mkdir(parents=True); (b / "logs").mkdir()
        clone_file(snap / "memory", b / "memory"); clone_file(src.g.disk, b / "disk.raw"); os.sync()
        cfg.id = f"bare{i}"
        argv = hv.argv(cfg, image, incoming=True)
        if kind == "floor_kernel":
            k = argv.index("-smp"); argv[k:k] = boot_args(image, cfg.cmdline)
        r, p = bare_restore(argv, b, snap / "state")
        res[kind].append(r.total_s * 1000); res[kind + "_qmp"].append(r.spawn_to_qmp_s * 1000)
        bare_quit(p, b); shutil.rmtree(b)
    # pooled
    s = mnt / f"pool-stage-{i}"; f = mnt / f"pooled-{i}"
    (s / "run").mkdir(parents=True); (s / "logs").mkdir()
    with open(s / "memory", "wb") as fh: fh.truncate((snap / "memory").stat().st_size)
    with open(s / "disk.raw", "wb") as fh: fh.truncate(src.g.disk.stat().st_size)
    os.sync()
    cfg.id = f"pooled{i}"
    t_start = time.monotonic()
    p = subprocess.Popen(hv.argv(cfg, image, incoming=True), cwd=s, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(s / "logs" / "vmm.log", "ab"), start_new_session=True)
    q = RawQMP.connect(s / "run" / "qmp.sock", time.monotonic() + 30, alive=lambda: p.poll() is None)
    q.execute("qmp_capabilities")
    res["pool_wait"].append((time.monotonic() - t_start) * 1000)
    time.sleep(0.5)
    res["idle_pss"].append(smaps_kb(p.pid, "Pss")); res["idle_uss"].append(smaps_kb(p.pid, "Private_Clean") + smaps_kb(p.pid, "Private_Dirty"))
    fd_state = os.open(snap / "state", os.O_RDONLY)
    t0 = time.monotonic()
    for a, b_ in ((snap / "memory", s / "memory"), (src.g.disk, s / "disk.raw")):
        sfd = os.open(a, os.O_RDONLY); dfd = os.open(b_, os.O_RDWR)
        try: fcntl.ioctl(dfd, FICLONE, sfd)
        finally: os.close(sfd); os.close(dfd)
    t_clone = time.monotonic()
    os.rename(s, f)
    q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]})
    q.execute("getfd", {"fdname": "state"}, fds=[fd_state])
    q.execute("migrate-incoming", {"uri": "fd:state"})
    while True:
        st = q.wait_event("MIGRATION").get("data", {}).get("status")
        if st == "completed": break
        if st in ("failed", "cancelled"): raise SystemExit(f"pooled: migration {st}")
    q.execute("cont")
    t1 = time.monotonic()
    os.close(fd_state)
    res["pooled"].append((t1 - t0) * 1000); res["pooled_clone"].append((t_clone - t0) * 1000)
    with AgentClient.connect_unix(f / "run" / "agent.sock", 30) as a:
        a.ping()
        out = a.exec(["sh", "-c", "echo pooled-ok; cat /proc/uptime"], timeout=30)
    assert os.stat(f / "memory").st_ino != os.stat(snap / "memory").st_ino
    if i == 0: print("agent on the pooled VMM:", out.stdout.decode().split())
    q.close(); bare_quit(p, f); shutil.rmtree(f)
for k, v in res.items():
    print(f"{k:18} med {statistics.median(v):7.1f}  {[round(x, 1) for x in v]}")
