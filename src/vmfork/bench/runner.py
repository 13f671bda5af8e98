"""The measurements. Each scenario appends records (see ``stats.record``) to ``Bench.records``.

Every number comes from real VMs (QEMU, the accel vmfork picks) on real filesystems: an
XFS with reflink and an ext4, both loop-mounted from sparse images the bench creates under
its work dir (so statvfs deltas see nothing but the bench).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork import util
from vmfork.bench import probes
from vmfork.bench.bare import BareRestore, bare_quit, bare_restore, claim, prestart
from vmfork.bench.density import density
from vmfork.bench.stats import Record, median, ratio_record, record
from vmfork.forkvm import clone_file
from vmfork.forkvm.copier import default_skip
from vmfork.fs import filesystem_type
from vmfork.hypervisor.base import VMConfig, vmm_record
from vmfork.hypervisor.qemu import QemuHypervisor
from vmfork.instances.manager import Manager, _guest_skip
from vmfork.layout import GuestDir

MiB = 1 << 20

#: The configurations compared for the copy-on-write lever (environment of the VMM spawn and
#: of the data dir's creation). "vmfork" is what vmfork does; "qemu-default" is QEMU's
#: huge-page advice on guest RAM and the filesystem's default CoW extent size (as before).
CONFIGS: dict[str, dict[str, str]] = {
    "vmfork": {"VMFORK_QEMU_THP": "0", "VMFORK_COWEXTSIZE": "4096"},
    "qemu-default": {"VMFORK_QEMU_THP": "1", "VMFORK_COWEXTSIZE": "0"},
    "no-thp-only": {"VMFORK_QEMU_THP": "0", "VMFORK_COWEXTSIZE": "0"},
    "cowext-only": {"VMFORK_QEMU_THP": "1", "VMFORK_COWEXTSIZE": "4096"},
}


#: The parts of a run, in order (``--only`` picks some): name → method of ``Bench``.
PARTS: dict[str, str] = {
    "breakdown": "fork_breakdown",  # 1. fork to running vs a bare restore, per timing config
    "cli": "cli_overhead",  # 1b/1c. vmfork fork as a command; CLI start-up
    "memory": "fork_vs_memory",  # 2. fork vs guest memory, vs cp
    "standby": "standby_cost",  # 3. standby cost vs dirtied memory
    "fanout": "fanout",  # 4. N forks at once (+ the VMMs' memory)
    "disk": "disk_per_fork",  # 5. disk per fork generation (+ 6. memory of running forks)
    "confine": "confinement_cost",  # 7. confinement on/off
    "pool": "pool_prototype",  # 1d. a pre-started VMM made a fork vs the bare restore
    "pooled": "pooled_fork",  # 1e. fork to running from a warm pool's slot vs unpooled vs bare restore
    "density": "density_part",  # guest-RAM sharing of running forks, and the VMM's own PSS
}


@dataclass
class Plan:
    mode: str
    runs: int  # repetitions of each timing
    breakdown_runs: int  # fork breakdown and CLI overhead (cheap, noisy: more runs)
    sizes: list[int]  # guest MiB, fork vs guest memory
    fanout: list[int]
    fanout_runs: int
    standby_runs: int  # fresh boots for the standby scenario
    lifecycle_runs: int
    configs: list[str]  # lever comparison on XFS
    running_forks: int  # memory per running fork
    timing_configs: list[str] = field(default_factory=lambda: ["vmfork", "qemu-default"])  # breakdown, standby
    base_mib: int = 256
    fill: float = 0.45
    dirty: list[int] = field(default_factory=lambda: [1, 64])
    loop_mib: int = 12288
    root_ext4: bool = True  # also fork vs copy on the host's ext4 (where the work dir is)
    density: list[int] = field(default_factory=lambda: [1, 4, 16])  # forks running side by side

    @classmethod
    def for_mode(cls, mode: str) -> Plan:
        if mode == "full":
            return cls(mode, runs=5, breakdown_runs=11, sizes=[128, 512, 2048], fanout=[1, 4, 16],
                       fanout_runs=2, standby_runs=3, lifecycle_runs=4, configs=list(CONFIGS), running_forks=8)
        if mode == "quick":
            return cls(mode, runs=3, breakdown_runs=5, sizes=[128, 512], fanout=[1, 4], fanout_runs=1,
                       standby_runs=1, lifecycle_runs=3, configs=["vmfork", "qemu-default"], running_forks=4, loop_mib=6144,
                       density=[1, 4])
        if mode == "smoke":
            return cls(mode, runs=2, breakdown_runs=2, sizes=[128], fanout=[1, 2], fanout_runs=1, standby_runs=1,
                       lifecycle_runs=1, configs=["vmfork", "qemu-default"], running_forks=2,
                       base_mib=128, dirty=[1, 8], loop_mib=4096, timing_configs=["vmfork"], root_ext4=False,
                       density=[1, 2])
        raise ValueError(f"unknown mode {mode!r}")


@contextlib.contextmanager
def env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ms(seconds: float) -> float:
    return seconds * 1000.0


class Bench:
    def __init__(self, plan: Plan, work: Path, say: Callable[[str], None], only: tuple[str, ...] = ()) -> None:
        self.plan = plan
        self.only = only  # parts to run (PARTS); empty: all
        self.work = work
        self.say = say
        self.records: list[Record] = []
        self.skipped: list[str] = []
        self.host: dict[str, Any] = {}
        self.mounts: dict[str, Path] = {}
        self.mounts_extra: dict[str, Path] = {}  # plain dirs on the host's filesystems
        self.managers: dict[tuple[str, str], Manager] = {}
        self.boots: dict[tuple[str, int], list[float]] = {}
        self.boot_cpu: dict[tuple[str, int], list[float]] = {}

    # --- plumbing -----------------------------------------------------------------------------
    def add(self, metric: str, samples: list[float], unit: str, **params: Any) -> Record:
        r = record(metric, samples, unit, params, host=self.host)
        self.records.append(r)
        return r

    def ratio(self, metric: str, num: Record, den: Record, *, scale: float = 1.0, **params: Any) -> Record:
        r = ratio_record(metric, num, den, params, scale=scale, host=self.host)
        self.records.append(r)
        return r

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        self.say(f"SKIPPED {what}: {why}")

    def manager(self, fs: str, config: str = "vmfork") -> Manager:
        key = (fs, config)
        if key not in self.managers:
            root = (self.mounts | self.mounts_extra)[fs] / f"data-{config}"
            with env(CONFIGS[config]):
                self.managers[key] = Manager(root)
        return self.managers[key]

    @contextlib.contextmanager
    def config(self, config: str) -> Iterator[None]:
        with env(CONFIGS[config]):
            yield

    def cli_env(self) -> dict[str, str]:
        """The environment of ``vmfork`` commands: as a user's, with Python's bytecode cache on
        (kept under the work dir, so nothing is written next to the sources)."""
        e = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        e["PYTHONPYCACHEPREFIX"] = str(self.work / "pycache")
        return e

    def cli(self, m: Manager, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "vmfork.cli", "--data-dir", str(m.dd.root), "-q", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.cli_env())

    def boot(self, m: Manager, name: str, mib: int) -> None:
        t0 = time.monotonic()
        inst = m.run(name, memory_mib=mib)
        dt = time.monotonic() - t0
        if not self.host.get("accel"):
            self.host["accel"] = inst.accel
        config = m.dd.root.name.removeprefix("data-")
        self.boots.setdefault((config, mib), []).append(ms(dt))
        ref = vmm_record(inst.g)  # CPU time of the VMM to agent-ready: TCG boot work, less the host's load
        if ref is not None:
            self.boot_cpu.setdefault((config, mib), []).append(ms(probes.cpu_seconds(ref.pid)))
        self.say(f"  booted {name} ({mib} MiB, {inst.accel}) in {dt:.1f}s")

    def sh(self, m: Manager, name: str, script: str, timeout: float = 600) -> str:
        r = m.exec(name, ["sh", "-c", script], timeout=timeout)
        if r.exit_code != 0:
            raise RuntimeError(f"{name}: `{script}` exited {r.exit_code}: {r.stderr.decode(errors='replace')}")
        return r.stdout.decode(errors="replace")

    def write_in_guest(self, m: Manager, name: str, mib: int, tag: str) -> None:
        """Have the guest write ``mib`` MiB of fresh pages: a file in a tmpfs of that size.

        Random bytes, not zeros: ``cp`` turns runs of zeros into holes, which would make the
        plain copy it is compared with unrealistically cheap (~60 MB/s under TCG)."""
        d = f"/tmp/{tag}"
        self.sh(m, name, f"mkdir -p {d} && mount -t tmpfs -o size={mib + 4}m {tag} {d} && "
                         f"dd if=/dev/urandom of={d}/f bs=1M count={mib} 2>/dev/null && sync")

    @staticmethod
    def used_settled(mnt: Path) -> int:
        """Bytes in use once the filesystem has finished freeing what was just removed (XFS
        frees removed inodes' blocks in the background): two equal readings in a row."""
        last = probes.used_bytes(mnt)
        for _ in range(20):
            time.sleep(0.1)
            now = probes.used_bytes(mnt)
            if now == last:
                return now
            last = now
        return last

    def source(self, fs: str, config: str = "vmfork") -> Manager:
        """The manager of ``fs``/``config`` with a ``base`` guest in standby in it."""
        m = self.manager(fs, config)
        if not any(i.name == "base" for i in m.instances()):
            with self.config(config):
                self.say(f"[setup] {fs}/{config}: base source")
                self.boot(m, "base", self.plan.base_mib)
                m.standby("base")
        return m

    def rm_all(self, m: Manager, prefix: str) -> None:
        for inst in m.instances():
            if inst.name.startswith(prefix):
                m.rm(inst.name, force=True)

    def cleanup(self) -> None:
        """Stop every VMM the bench started (whatever state it was left in)."""
        for mnt in [*self.mounts.values(), *self.mounts_extra.values()]:
            for data in mnt.glob("data-*"):
                guests = data / "guests"
                for g in guests.iterdir() if guests.exists() else []:
                    ref = vmm_record(GuestDir(g))
                    if ref is not None:
                        ref.kill(timeout=2)

    # --- scenarios ----------------------------------------------------------------------------
    def fork_breakdown(self, config: str = "vmfork") -> None:
        """Fork (standby source → running fork, agent answering), phase by phase, against a
        bare restore of the same snapshot with QEMU's own command line."""
        fs = "xfs" if "xfs" in self.mounts else next(iter(self.mounts))
        m = self.source(fs, config)
        mnt = self.mounts[fs]
        with self.config(config):
            self._fork_breakdown(m, fs, mnt, config)

    def _fork_breakdown(self, m: Manager, fs: str, mnt: Path, config: str) -> None:
        phases: dict[str, list[float]] = {}
        host, total, bare, bare_qmp, bare_load = [], [], [], [], []
        self.say(f"[1] fork breakdown on {fs}/{config} ({self.plan.breakdown_runs} runs)")
        for i in range(self.plan.breakdown_runs):
            _, t = m.fork("base", f"bd-{i}", target_state="running")
            fr = t.get("fork_restore", {})
            for k in ("lookup_s", "clone_s", "metadata_s", "sync_s"):
                if k in t:
                    phases.setdefault(k, []).append(ms(t[k]))
            for k in ("prep_s", "spawn_s", "qmp_s", "load_s", "resume_s", "agent_ping_s", "agent_setup_s"):
                if k in fr:
                    phases.setdefault(f"restore_{k}", []).append(ms(fr[k]))
            host.append(ms(t["total_s"] - fr["agent_s"]))
            total.append(ms(t["total_s"]))
            m.rm(f"bd-{i}", force=True)
            r = self._bare(m, mnt, i)  # the floor
            bare.append(ms(r.total_s))
            bare_qmp.append(ms(r.spawn_to_qmp_s))
            bare_load.append(ms(r.load_s))
        names = {"lookup_s": "lookup+lock", "clone_s": "clone", "metadata_s": "metadata", "sync_s": "fsync",
                 "restore_prep_s": "restore prep", "restore_spawn_s": "VMM spawn",
                 "restore_qmp_s": "QMP handshake", "restore_load_s": "state load", "restore_resume_s": "resume",
                 "restore_agent_ping_s": "agent ready", "restore_agent_setup_s": "clock+hostname"}
        prm = {"fs": fs, "config": config, "guest_mib": self.plan.base_mib}
        for k, v in phases.items():
            self.add("fork_phase_ms", v, "ms", **prm, phase=names.get(k, k))
        ours = self.add("fork_host_ms", host, "ms", **prm)
        self.add("fork_running_ms", total, "ms", **prm)
        floor = self.add("bare_restore_ms", bare, "ms", **prm)
        self.add("bare_restore_phase_ms", bare_qmp, "ms", **prm, phase="spawn to QMP greeting")
        self.add("bare_restore_phase_ms", bare_load, "ms", **prm, phase="load+resume")
        self.ratio("fork_host_over_bare_restore", ours, floor, fs=fs, config=config)

    def pool_prototype(self) -> None:
        """Would a pool of pre-started VMMs pay? Alternating with the bare restore of the same
        snapshot: a QEMU pre-started on placeholder files (vmfork's restore argv, unconfined
        like the floor) is made a fork (clone into its open inodes, rename, load, cont); the
        guest's agent must answer on it. Also the memory an idle pre-started VMM holds."""
        fs = "xfs" if "xfs" in self.mounts else next(iter(self.mounts))
        if fs != "xfs":
            self.skip("pool prototype", "needs reflinks (FICLONE into the open placeholder)")
            return
        m = self.source(fs)
        mnt = self.mounts[fs]
        src = m.find("base")
        snap = src.g.snapshot_latest
        cfg = VMConfig.from_json({k: v for k, v in util.read_json(snap / "config.json").items() if k != "taken_at"})
        image = m.image(cfg.image_digest)
        hv = QemuHypervisor()
        files = {"memory": snap / "memory", "disk.raw": src.g.disk}
        sizes = {k: v.stat().st_size for k, v in files.items()}
        bare, pooled, pclone, start, pss, uss = [], [], [], [], [], []
        self.say(f"[1d] pool prototype on {fs} ({self.plan.breakdown_runs} runs)")
        from vmfork.guest.agent import AgentClient

        for i in range(self.plan.breakdown_runs):
            bare.append(ms(self._bare(m, mnt, i).total_s))
            stage, final = mnt / f"pool-stage-{i}", mnt / f"pooled-{i}"
            cfg.id = f"pooled{i}"
            pre = prestart(hv.argv(cfg, image, incoming=True), stage, sizes)
            try:
                os.sync()
                time.sleep(0.5)  # settled: what it holds while it waits
                rollup = probes.smaps_rollup(pre.proc.pid)
                pss.append(rollup.get("Pss", 0) / MiB)
                uss.append((rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)) / MiB)
                start.append(ms(pre.start_s))
                r = claim(pre, stage, final, files, snap / "state")
                pooled.append(ms(r.total_s))
                pclone.append(ms(r.phases["clone_s"]))
                if os.stat(final / "memory").st_ino == os.stat(snap / "memory").st_ino:
                    raise RuntimeError("pooled fork runs on its source's mem-file")
                with AgentClient.connect_unix(final / "run" / "agent.sock", 30) as a:
                    a.ping()
            finally:
                pre.qmp.close()
                bare_quit(pre.proc, final if final.exists() else stage)
                shutil.rmtree(final, ignore_errors=True)
                shutil.rmtree(stage, ignore_errors=True)
        prm = {"fs": fs, "guest_mib": self.plan.base_mib}
        floor = self.add("bare_restore_ms", bare, "ms", **prm, how="pool comparison")
        claim_rec = self.add("pool_claim_ms", pooled, "ms", **prm)
        self.add("pool_claim_clone_ms", pclone, "ms", **prm)
        self.add("pool_prestart_ms", start, "ms", **prm)
        self.add("pool_vmm_idle_pss_mib", pss, "MiB", **prm)
        self.add("pool_vmm_idle_uss_mib", uss, "MiB", **prm)
        self.ratio("pool_claim_over_bare_restore", claim_rec, floor, fs=fs)

    def _bare(self, m: Manager, mnt: Path, i: int) -> BareRestore:
        """One bare restore of ``base``'s snapshot (QEMU's command line, a raw QMP socket) on
        clones of its files in a dir of its own, quit and removed after: the floor."""
        src = m.find("base")
        snap = src.g.snapshot_latest
        cfg = VMConfig.from_json({k: v for k, v in util.read_json(snap / "config.json").items() if k != "taken_at"})
        b = mnt / f"bare-{i}"
        (b / "run").mkdir(parents=True)
        (b / "logs").mkdir()
        clone_file(snap / "memory", b / "memory")
        clone_file(src.g.disk, b / "disk.raw")
        os.sync()
        cfg.id = f"bare{i}"
        r, p = bare_restore(QemuHypervisor().argv(cfg, m.image(cfg.image_digest), incoming=True), b, snap / "state")
        bare_quit(p, b)
        shutil.rmtree(b)
        return r

    def pooled_fork(self) -> None:
        """Issue 16, wired in: ``Manager.fork(target_state="running")`` claiming a slot of a
        warm pool (``vmfork.pool``, filled before and settled, untimed) against the same fork
        without a pool and a bare restore of the same snapshot, alternating in one run; the
        host side of each (the agent's answer excluded). Also each idle slot's PSS and what
        filling one costs."""
        for fs in self.mounts:  # XFS: slots are reflinks; ext4: copies (made at fill, off the path)
            self._pooled_fork(fs)

    def _pooled_fork(self, fs: str) -> None:
        from vmfork.pool import ops as pool_ops

        m = self.source(fs)
        mnt = self.mounts[fs]
        pooled, plain, bare, claim_ms, fill_ms, pss, space = [], [], [], [], [], [], []
        phases: dict[str, list[float]] = {}
        self.say(f"[1e] fork from a warm pool on {fs} ({self.plan.breakdown_runs} runs)")
        for i in range(self.plan.breakdown_runs):
            _, t = m.fork("base", f"unpooled-{i}", target_state="running")
            plain.append(ms(t["total_s"] - t["fork_restore"]["agent_s"]))
            m.rm(f"unpooled-{i}", force=True)
            fill_ms.append(ms(pool_ops.fill(m, "base", 1)["seconds"]))
            os.sync()
            time.sleep(0.5)  # settled: what an idle slot holds
            pss += [r["pss_mib"] for r in pool_ops.ls(m) if r["pss_mib"] is not None]
            slot_dirs = [s.dir for s in pool_ops.slots(m)]
            space.append(sum(probes.extents(d / f).exclusive_bytes for d in slot_dirs for f in ("memory", "disk.raw")) / MiB)
            _, t = m.fork("base", f"pooled-{i}", target_state="running")
            if t.get("clone_method") != "pool":
                raise RuntimeError(f"the fork did not take the pool's slot: {t}")
            pooled.append(ms(t["total_s"] - t["fork_restore"]["agent_s"]))
            claim_ms.append(ms(t["clone_s"]))
            for k in ("qmp_s", "load_s", "resume_s"):
                phases.setdefault(k, []).append(ms(t["fork_restore"][k]))
            m.rm(f"pooled-{i}", force=True)
            bare.append(ms(self._bare(m, mnt, i).total_s))
        prm = {"fs": fs, "guest_mib": self.plan.base_mib}
        floor = self.add("bare_restore_ms", bare, "ms", **prm, how="pooled fork comparison")
        rec_pool = self.add("pool_fork_host_ms", pooled, "ms", **prm, pool="slot")
        rec_plain = self.add("pool_fork_host_ms", plain, "ms", **prm, pool="none")
        self.add("pool_fork_claim_commit_ms", claim_ms, "ms", **prm)
        for k, v in phases.items():
            self.add("pool_fork_phase_ms", v, "ms", **prm, phase=k.removesuffix("_s"))
        self.add("pool_fill_one_slot_ms", fill_ms, "ms", **prm)
        self.add("pool_slot_idle_pss_mib", pss, "MiB", **prm)
        self.add("pool_slot_disk_exclusive_mib", space, "MiB", **prm)
        self.ratio("pool_fork_host_over_bare_restore", rec_pool, floor, fs=fs, pool="slot")
        self.ratio("pool_fork_host_over_bare_restore", rec_plain, floor, fs=fs, pool="none")
        self.ratio("pool_fork_host_pooled_over_unpooled", rec_pool, rec_plain, fs=fs)

    def cli_overhead(self) -> None:
        """``vmfork fork`` as a command against the same call in-process (fork to standby)."""
        fs = "xfs" if "xfs" in self.mounts else next(iter(self.mounts))
        m = self.source(fs)
        self.say(f"[1b] CLI overhead ({self.plan.breakdown_runs} runs)")
        cli, inproc = [], []
        # warm up: Python's bytecode cache of vmfork, page cache of the interpreter
        subprocess.run([sys.executable, "-m", "vmfork.cli", "--version"], check=True, capture_output=True,
                       env=self.cli_env())
        p = self.cli(m, "fork", "base", "cli-warmup")
        p.communicate(timeout=120)
        self.rm_all(m, "cli-")
        for i in range(self.plan.breakdown_runs):
            t0 = time.monotonic()
            p = self.cli(m, "fork", "base", f"cli-{i}")
            _, err = p.communicate(timeout=120)
            cli.append(ms(time.monotonic() - t0))
            if p.returncode != 0:
                raise RuntimeError(f"vmfork fork failed: {err.decode(errors='replace')}")
            t0 = time.monotonic()
            m.fork("base", f"inp-{i}")
            inproc.append(ms(time.monotonic() - t0))
            self.rm_all(m, "cli-")
            self.rm_all(m, "inp-")
        a = self.add("cli_fork_standby_ms", cli, "ms", fs=fs, how="vmfork fork (new process)")
        b = self.add("inprocess_fork_standby_ms", inproc, "ms", fs=fs, how="Manager.fork in-process")
        self.add("cli_overhead_ms", [x - y for x, y in zip(cli, inproc, strict=True)], "ms", fs=fs)
        self.ratio("cli_over_inprocess_fork", a, b, fs=fs)
        self.startup(m)

    def startup(self, m: Manager) -> None:
        """``vmfork --version`` and ``vmfork ps --json`` (a data dir with one instance) against
        ``python -c pass``, interleaved, with the bytecode cache on as a user has it. ``python -m
        vmfork`` is what the ``vmfork`` script runs."""
        runs = max(self.plan.breakdown_runs, 11)
        self.say(f"[1c] CLI start-up ({runs} runs)")
        import importlib.util

        entry = "vmfork" if importlib.util.find_spec("vmfork.__main__") else "vmfork.cli"  # older vmfork: cli
        cmds = {"python -c pass": ["-c", "pass"], "vmfork --version": ["-m", entry, "--version"],
                "vmfork ps --json": ["-m", entry, "--data-dir", str(m.dd.root), "ps", "--json"]}
        for argv in cmds.values():  # warm up: bytecode cache, page cache
            subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=self.cli_env())
        t: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(runs):
            for k, argv in cmds.items():
                t0 = time.monotonic()
                subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=self.cli_env())
                t[k].append(ms(time.monotonic() - t0))
        py = self.add("python_startup_ms", t["python -c pass"], "ms", how="python -c pass")
        ver = self.add("cli_startup_ms", t["vmfork --version"], "ms", how="vmfork --version")
        ps = self.add("cli_ps_json_ms", t["vmfork ps --json"], "ms", how="vmfork ps --json",
                      instances=len(m.instances()))
        self.ratio("cli_version_over_python", ver, py)
        self.ratio("cli_ps_json_over_python", ps, py)

    def fork_vs_memory(self) -> None:
        """Fork to standby of guests with ~45 % of RAM written, against ``cp`` of the mem-file
        and (fair) against ``cp -a`` + ``sync -f`` of the same files the fork copies. On the
        loop filesystems and, where the work dir is on one, on the host's own ext4."""
        forks: dict[str, list[Record]] = {}
        mounts = dict(self.mounts)
        if self.plan.root_ext4 and filesystem_type(self.work) == "ext4":
            mounts["ext4-root"] = self.work / "root-ext4"
            mounts["ext4-root"].mkdir(exist_ok=True)
            self.mounts_extra["ext4-root"] = mounts["ext4-root"]
        for fs in mounts:
            m = self.manager(fs)
            mnt = mounts[fs]
            for mib in self.plan.sizes:
                name = f"mem-{mib}"
                self.boot(m, name, mib)
                # ~45 % of RAM, but no more than the guest can hold (a 128 MiB guest has ~60 MiB free)
                avail = int(self.sh(m, name, "awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo"))
                fill = min(int(mib * self.plan.fill), avail - 16)
                self.say(f"[2] {fs}: {mib} MiB guest, writing {fill} MiB in it")
                self.write_in_guest(m, name, fill, "fill")
                m.standby(name)
                memf = m.find(name).g.snapshot_latest / "memory"
                ext = probes.extents(memf)
                self.add("memfile_data_mib", [ext.bytes / MiB], "MiB", fs=fs, guest_mib=mib, written_mib=fill)
                self.add("memfile_extents", [ext.count], "count", fs=fs, guest_mib=mib)
                fork_t, cp_t, cp_sync_t, same_t = [], [], [], []
                src_dir = m.find(name).dir
                same = fork_files(src_dir)
                for i in range(self.plan.runs):
                    os.sync()
                    t0 = time.monotonic()
                    m.fork(name, f"{name}-f{i}")
                    fork_t.append(ms(time.monotonic() - t0))
                    m.rm(f"{name}-f{i}", force=True)
                    os.sync()
                    dst = mnt / "cp-memory"
                    t0 = time.monotonic()
                    subprocess.run(["cp", "--reflink=never", str(memf), str(dst)], check=True)
                    cp_t.append(ms(time.monotonic() - t0))
                    util.fsync_file(dst)
                    cp_sync_t.append(ms(time.monotonic() - t0))
                    dst.unlink()
                    # fair: the files the fork copies (mem-file, device state, config, data disk),
                    # made durable (syncfs; the fork fsyncs each file and directory)
                    os.sync()
                    dst = mnt / "cp-guest"
                    dst.mkdir()
                    t0 = time.monotonic()
                    subprocess.run(["cp", "-a", "--reflink=never", "--parents", *same, str(dst)], check=True,
                                   cwd=src_dir)
                    subprocess.run(["sync", "-f", str(dst)], check=True)
                    same_t.append(ms(time.monotonic() - t0))
                    shutil.rmtree(dst)
                m.rm(name, force=True)
                f = self.add("fork_standby_ms", fork_t, "ms", fs=fs, guest_mib=mib)
                c = self.add("copy_memfile_ms", cp_t, "ms", fs=fs, guest_mib=mib, tool="cp --reflink=never")
                self.add("copy_memfile_ms", cp_sync_t, "ms", fs=fs, guest_mib=mib, tool="cp --reflink=never + fsync")
                fair = self.add("copy_guest_ms", same_t, "ms", fs=fs, guest_mib=mib, files=len(same),
                                tool="cp -a --reflink=never (the fork's files) + sync -f")
                self.ratio("fork_over_copy", f, c, fs=fs, guest_mib=mib)
                self.ratio("fork_over_copy_same_files", f, fair, fs=fs, guest_mib=mib)
                forks.setdefault(fs, []).append(f)
        for fs, recs in forks.items():
            if len(recs) > 1:
                self.ratio("fork_growth_largest_over_smallest", recs[-1], recs[0], fs=fs,
                           guest_mib=f"{self.plan.sizes[-1]}/{self.plan.sizes[0]}")

    def standby_cost(self) -> None:
        """First standby after boot, then restore, dirty D MiB, standby again."""
        fs = "xfs" if "xfs" in self.mounts else next(iter(self.mounts))
        for config in self.plan.timing_configs:
            m = self.manager(fs, config)
            first: list[float] = []
            again: dict[int, list[float]] = {d: [] for d in self.plan.dirty}
            dirty: dict[str, list[float]] = {}
            restore: dict[str, list[float]] = {"not forked": [], "forked": []}
            with self.config(config):
                for r in range(self.plan.standby_runs):
                    name = f"sb-{r}"
                    self.say(f"[3] {fs}/{config}: standby after boot, then after dirtying {self.plan.dirty} MiB")
                    self.boot(m, name, self.plan.base_mib)
                    first.append(self._standby_measured(m, name, dirty, "boot"))
                    for d in self.plan.dirty:
                        restore["not forked"].append(ms(m.restore(name)["total_s"]))
                        self.write_in_guest(m, name, d, f"dirty{d}")
                        again[d].append(self._standby_measured(m, name, dirty, f"{d} MiB"))
                    # a source with forks shares its RAM file's extents: vmfork restores it cold
                    m.fork(name, f"{name}-fork")
                    restore["forked"].append(ms(m.restore(name)["total_s"]))
                    m.rm(name, force=True)
                    m.rm(f"{name}-fork", force=True)
            for label, v in restore.items():
                self.add("restore_ms", v, "ms", fs=fs, config=config, guest_mib=self.plan.base_mib, source=label)
            f = self.add("standby_ms", first, "ms", fs=fs, config=config, guest_mib=self.plan.base_mib, dirtied="boot")
            for d, v in again.items():
                s = self.add("standby_ms", v, "ms", fs=fs, config=config, guest_mib=self.plan.base_mib, dirtied=f"{d} MiB")
                self.ratio("standby_again_over_first", s, f, fs=fs, config=config, dirtied=f"{d} MiB")
            for label, v in dirty.items():
                self.add("standby_memfile_dirty_mib", v, "MiB", fs=fs, config=config, dirtied=label)

    @staticmethod
    def _standby_measured(m: Manager, name: str, dirty: dict[str, list[float]], label: str) -> float:
        """Standby ``name``; note how much of its mem-file was dirty in the page cache just before."""
        d = probes.dirty_bytes(m.find(name).g.memory)
        if d is not None:
            dirty.setdefault(label, []).append(d / MiB)
        return ms(m.standby(name)["total_s"])

    def fanout(self) -> None:
        """N forks of one snapshot started together (N ``vmfork fork`` processes)."""
        fs = "xfs" if "xfs" in self.mounts else next(iter(self.mounts))
        m = self.source(fs)
        for target in ("standby", "running"):
            single: Record | None = None
            for n in self.plan.fanout:
                walls = []
                for r in range(self.plan.fanout_runs):
                    self.say(f"[4] fan-out: {n} forks to {target} at once")
                    os.sync()
                    t0 = time.monotonic()
                    procs = [self.cli(m, "fork", "base", f"fo-{k}", "--target-state", target) for k in range(n)]
                    errs = [p.communicate(timeout=300)[1] for p in procs]
                    walls.append(ms(time.monotonic() - t0))
                    bad = [e.decode(errors="replace") for p, e in zip(procs, errs, strict=True) if p.returncode]
                    if bad:
                        raise RuntimeError(f"fan-out fork failed: {bad[0]}")
                    if target == "running" and n == max(self.plan.fanout) and r == 0:
                        self._vmm_memory(m, [f"fo-{k}" for k in range(n)], "fanout_vmm", n=n, config="vmfork")
                    self.rm_all(m, "fo-")
                w = self.add("fanout_wall_ms", walls, "ms", fs=fs, target=target, n=n)
                if n == 1:
                    single = w
                elif single is not None:
                    self.ratio("fanout_wall_over_n_single", w, single, scale=float(n), fs=fs, target=target, n=n)

    def _vmm_memory(self, m: Manager, names: list[str], metric: str, **params: Any) -> None:
        time.sleep(1.0)
        rows = []
        for name in names:
            pid = m.describe(m.find(name))["pid"]
            if pid:
                rows.append(probes.smaps_rollup(int(pid)))
        if not rows:
            return
        for key, label in (("Rss", "rss"), ("Pss", "pss"), ("Pss_Anon", "pss_anon"), ("Pss_File", "pss_file"),
                           ("Pss_Shmem", "pss_shmem")):
            self.add(f"{metric}_{label}_mib", [r.get(key, 0) / MiB for r in rows], "MiB", **params)

    def disk_per_fork(self) -> None:
        """What a fork's lifecycle (fork, restore, a little work, standby) adds on disk, over a
        chain of generations (each fork is forked from the previous one)."""
        cases = [("xfs", c) for c in self.plan.configs] if "xfs" in self.mounts else []
        cases += [("ext4", "vmfork")] if "ext4" in self.mounts else []
        gens = self.plan.lifecycle_runs
        for fs, config in cases:
            m = self.source(fs, config)
            mnt = self.mounts[fs]
            with self.config(config):
                delta: list[float] = []
                clone: list[float] = []
                files: dict[str, dict[str, list[float]]] = {}
                prev = "base"
                for r in range(1, gens + 1):
                    self.say(f"[5] {fs}/{config}: fork generation {r}/{gens}")
                    name = f"lc-{r}"
                    u0 = self.used_settled(mnt)
                    _, t = m.fork(prev, name)
                    clone.append(ms(t["clone_s"]))
                    m.restore(name)
                    self.sh(m, name, f"echo generation {r} > /run/lc && sync")
                    m.standby(name)
                    delta.append((self.used_settled(mnt) - u0) / MiB)
                    g = m.find(name).g
                    for label, path in (("memory", g.snapshot_latest / "memory"), ("disk.raw", g.disk),
                                        ("state", g.snapshot_latest / "state")):
                        d = files.setdefault(label, {"allocated": [], "exclusive": [], "extents": []})
                        d["allocated"].append(probes.allocated_bytes(path) / MiB)
                        try:
                            ext = probes.extents(path)
                            d["exclusive"].append(ext.exclusive_bytes / MiB)
                            d["extents"].append(ext.count)
                        except OSError:
                            pass
                    prev = name
                self.rm_all(m, "lc-")
                p = {"fs": fs, "config": config, "guest_mib": self.plan.base_mib}
                self.add("fork_lifecycle_disk_mib", delta, "MiB", **p, generations=gens)
                self.add("fork_chain_clone_ms", clone[:1], "ms", **p, generation=1)
                if gens > 1:
                    self.add("fork_chain_clone_ms", clone[-1:], "ms", **p, generation=gens)
                for label, d in files.items():
                    self.add("fork_file_allocated_mib", d["allocated"], "MiB", fs=fs, config=config, file=label)
                    if d["exclusive"]:
                        self.add("fork_file_exclusive_mib", d["exclusive"], "MiB", fs=fs, config=config, file=label)
                        self.add("fork_file_extents", d["extents"][-1:], "count", fs=fs, config=config,
                                 file=label, generation=gens)
                if fs == "xfs" and config in ("vmfork", "qemu-default"):
                    self._running_memory(m, config)

    def _running_memory(self, m: Manager, config: str) -> None:
        """RSS/PSS of the VMMs of N forks running side by side."""
        k = self.plan.running_forks
        self.say(f"[6] {config}: memory of {k} running forks")
        names = [f"rm-{i}" for i in range(k)]
        for name in names:
            m.fork("base", name, target_state="running")
        self._vmm_memory(m, names, "vmm", n=k, config=config)
        self.rm_all(m, "rm-")

    def confinement_cost(self) -> None:
        """Fork to running and cold boot with VMM confinement on and off (``VMFORK_CONFINE``),
        interleaved in one run so that load drifts hit both alike."""
        fs = "xfs" if "xfs" in self.mounts else next(iter(self.mounts))
        m = self.source(fs)
        modes = {"on": "auto", "off": "0"}
        host: dict[str, list[float]] = {k: [] for k in modes}
        spawn: dict[str, list[float]] = {k: [] for k in modes}
        total: dict[str, list[float]] = {k: [] for k in modes}
        boot: dict[str, list[float]] = {k: [] for k in modes}
        self.say(f"[7] confinement cost on {fs} ({self.plan.breakdown_runs} forks, {self.plan.lifecycle_runs} boots each)")
        for i in range(self.plan.breakdown_runs):
            for label, value in modes.items():
                with env({"VMFORK_CONFINE": value}):
                    _, t = m.fork("base", f"cf-{label}-{i}", target_state="running")
                fr = t["fork_restore"]
                host[label].append(ms(t["total_s"] - fr["agent_s"]))
                spawn[label].append(ms(fr["spawn_s"]))
                total[label].append(ms(t["total_s"]))
                m.rm(f"cf-{label}-{i}", force=True)
        for i in range(self.plan.lifecycle_runs):
            for label, value in modes.items():
                with env({"VMFORK_CONFINE": value}):
                    t0 = time.monotonic()
                    m.run(f"cb-{label}-{i}", memory_mib=self.plan.base_mib)
                    boot[label].append(ms(time.monotonic() - t0))
                m.rm(f"cb-{label}-{i}", force=True)
        prm: dict[str, Any] = {"fs": fs, "guest_mib": self.plan.base_mib}
        recs = {}
        for label in modes:
            recs[label] = (self.add("confine_fork_host_ms", host[label], "ms", **prm, confined=label),
                           self.add("confine_fork_running_ms", total[label], "ms", **prm, confined=label),
                           self.add("confine_boot_ms", boot[label], "ms", **prm, confined=label))
            self.add("confine_vmm_spawn_ms", spawn[label], "ms", **prm, confined=label)
        for j, what in enumerate(("fork_host", "fork_running", "boot")):
            self.ratio(f"confine_{what}_on_over_off", recs["on"][j], recs["off"][j], **prm)

    def density_part(self) -> None:
        density(self)

    # --- whole run ----------------------------------------------------------------------------
    def run(self) -> None:
        self.host = probes.host_facts(QemuHypervisor().version())
        self.host["load_at_start"] = round(probes.loadavg(), 2)
        with contextlib.ExitStack() as stack:
            stack.enter_context(env(CONFIGS["vmfork"]))
            for fs in ("xfs", "ext4"):
                problem = probes.loop_fs_problem(fs)
                if problem:
                    self.skip(f"{fs} measurements", problem)
                    continue
                try:
                    self.mounts[fs] = stack.enter_context(probes.loop_fs(fs, self.plan.loop_mib, self.work))
                except (OSError, subprocess.CalledProcessError) as e:
                    self.skip(f"{fs} measurements", f"cannot create a loop-mounted {fs}: {e}")
            if not self.mounts:
                raise RuntimeError("no filesystem to measure on: " + "; ".join(self.skipped))
            stack.callback(self.cleanup)
            for part in PARTS:
                if self.only and part not in self.only:
                    continue
                if part == "breakdown":
                    for config in self.plan.timing_configs:
                        self.fork_breakdown(config)
                else:
                    getattr(self, PARTS[part])()
        for (config, mib), v in sorted(self.boots.items()):
            self.add("boot_ms", v, "ms", config=config, guest_mib=mib)
        for (config, mib), v in sorted(self.boot_cpu.items()):
            self.add("boot_vmm_cpu_ms", v, "ms", config=config, guest_mib=mib)
        self.host["load_at_end"] = round(probes.loadavg(), 2)
        for r in self.records:
            r["host"] = dict(self.host)


def fork_files(src: Path) -> list[str]:
    """The regular files (relative paths) a fork of the guest dir ``src`` copies."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        dirnames[:] = [d for d in dirnames if not _guest_skip(rel_dir / d, os.lstat(Path(dirpath) / d))]
        for f in filenames:
            st = os.lstat(Path(dirpath) / f)
            if not _guest_skip(rel_dir / f, st) and not default_skip(rel_dir / f, st):
                out.append(str(rel_dir / f))
    return sorted(out)


def medians_by(records: list[Record], metric: str, key: str, **params: Any) -> dict[Any, float]:
    """{params[key]: value} of the records of ``metric`` matching ``params``."""
    out = {}
    for r in records:
        if r["metric"] == metric and all(r["params"].get(k) == v for k, v in params.items()):
            out[r["params"][key]] = float(r["value"])
    return out


__all__ = ["CONFIGS", "PARTS", "Bench", "Plan", "median", "medians_by"]
