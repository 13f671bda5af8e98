"""The lifecycle of instances: run, start, stop, rm, exec, standby, restore, fork.

Rules every operation keeps:
- state is derived (VMM alive? complete snapshot on disk?), metadata is written atomically;
- one vmfork process at a time works on an instance (flock in ``locks/<id>.lock``);
- a new instance (run or fork) is built in ``guests/.tmp-<id>`` and renamed into place,
  so a failure or a crash leaves a whole instance or nothing (``recover`` cleans up);
- a fork never writes to its source's files: it gets copy-on-write clones of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmfork import util
from vmfork.errors import (
    AgentError,
    AlreadyExists,
    HypervisorError,
    InvalidArgument,
    NotFound,
    VmforkError,
    WrongState,
)
from vmfork.forkvm import CopyStats, clone_file, clone_tree
from vmfork.forkvm.copier import fsync_tree
from vmfork.fs import set_cow_extent_size_hint
from vmfork.guest.agent import AgentClient, ExecResult, wait_ready
from vmfork.hypervisor import get_hypervisor, resolve_accel
from vmfork.hypervisor.base import Hypervisor, VMConfig, tail, vmm_record
from vmfork.images import Image, ensure_image, load_image
from vmfork.instances.model import Instance, new_mac
from vmfork.layout import GuestDir, snapshot_complete
from vmfork.locking import file_lock, try_lock
from vmfork.paths import DataDir
from vmfork.procs import ProcRef
from vmfork.space import admission, watchdog
from vmfork.space.admission import Claim, ram_claim
from vmfork.space.pause import clear_mark, read_mark
from vmfork.supervisor import death_cause

Progress = Callable[[str], None]

BOOT_TIMEOUT = float(os.environ.get("VMFORK_BOOT_TIMEOUT", "120"))
RESTORE_TIMEOUT = float(os.environ.get("VMFORK_RESTORE_TIMEOUT", "60"))
LOCK_TIMEOUT = float(os.environ.get("VMFORK_LOCK_TIMEOUT", "60"))
# Copy-on-write extent size hint (bytes) for guests/ on XFS: a fork's mem-file then costs the
# pages it dirties, not 128 KiB (the XFS default) per page. VMFORK_COWEXTSIZE=0 leaves the
# filesystem's default on a new data dir.
COW_EXTSIZE = 4096


@dataclass
class Status:
    state: str
    proc: ProcRef | None


def crashpoint(name: str) -> None:
    """Die here with SIGKILL when VMFORK_CRASHPOINT names this point (crash-recovery tests)."""
    if os.environ.get("VMFORK_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _guest_skip(rel: Path, st: os.stat_result) -> bool:
    """What a fork does not take from its source: runtime files, logs, live RAM, work dirs,
    and the source's metadata (the fork writes its own)."""
    parts = rel.parts
    if not parts:
        return False
    if parts[0] in ("run", "logs", "memory", "instance.json"):
        return True
    if parts[0] == "snapshots" and len(parts) > 1 and (parts[1].startswith(".") or parts[1] == "snapshot-base"):
        return True
    import stat as _stat

    return not (_stat.S_ISREG(st.st_mode) or _stat.S_ISDIR(st.st_mode) or _stat.S_ISLNK(st.st_mode))


class Manager:
    def __init__(self, root: Path, progress: Progress | None = None) -> None:
        self.dd = DataDir(root).ensure()
        self.progress: Progress = progress or (lambda _msg: None)
        cow_extsize = os.environ.get("VMFORK_COWEXTSIZE", "")
        size = int(cow_extsize) if cow_extsize.isdigit() else COW_EXTSIZE
        if size > 0:  # inherited by every guest dir and file created from now on (XFS only)
            set_cow_extent_size_hint(self.dd.guests, size)

    # --- locks ----------------------------------------------------------------------------
    def _global_lock(self) -> Any:
        return file_lock(self.dd.locks / "global.lock", what="the data dir", timeout=LOCK_TIMEOUT)

    def _lock(self, inst: Instance) -> Any:
        return file_lock(self.dd.locks / f"{inst.id}.lock", what=f"instance '{inst.name}'", timeout=LOCK_TIMEOUT)

    # --- lookup ---------------------------------------------------------------------------
    def _load(self, d: Path) -> Instance | None:
        try:
            return Instance.from_json(util.read_json(d / "instance.json"), d)
        except (OSError, ValueError, TypeError):
            return None

    def instances(self) -> list[Instance]:
        out = []
        for d in sorted(self.dd.guests.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            inst = self._load(d)
            if inst is not None:
                out.append(inst)
        return sorted(out, key=lambda i: (i.created_at, i.name))

    def find(self, ref: str) -> Instance:
        for inst in self.instances():
            if ref in (inst.name, inst.id):
                return inst
        raise NotFound(f"instance '{ref}' not found")

    def status(self, inst: Instance) -> Status:
        proc = vmm_record(inst.g)
        if proc is not None:
            return Status("running", proc)
        if inst.g.has_snapshot():
            return Status("standby", None)
        return Status("stopped", None)

    def hypervisor(self, inst: Instance) -> Hypervisor:
        return get_hypervisor(inst.hypervisor)

    def image(self, digest: str) -> Image:
        return load_image(self.dd.images, digest)

    # --- recovery -------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or undo what a crashed vmfork left behind. Safe to run at any time."""
        actions: list[str] = []
        for d in sorted(self.dd.guests.iterdir()) if self.dd.guests.exists() else []:
            if d.name.startswith(".tmp-") or d.name.startswith(".trash-"):
                iid = d.name.split("-", 1)[1]
                fd = try_lock(self.dd.locks / f"{iid}.lock") if d.name.startswith(".tmp-") else -1
                if fd is None:
                    continue  # a live vmfork is building it
                try:
                    self._kill_vmm_of(GuestDir(d))
                    shutil.rmtree(d, ignore_errors=True)
                    actions.append(f"removed unfinished {d.name}")
                finally:
                    if fd >= 0:
                        os.close(fd)
                continue
            if d.name.startswith("."):
                continue
            g = GuestDir(d)
            if not (g.snapshot_tmp.exists() or g.restoring.exists()):
                continue
            fd = try_lock(self.dd.locks / f"{d.name}.lock")
            if fd is None:
                continue
            try:
                actions += self._recover_guest(g)
            finally:
                os.close(fd)
        self._kill_orphan_vmms(actions)
        return actions

    def _recover_guest(self, g: GuestDir) -> list[str]:
        actions = []
        proc = vmm_record(g)
        if g.snapshot_tmp.exists():
            tmp = g.snapshot_tmp
            if proc is None and (tmp / "memory").is_file() and (tmp / "state").is_file() \
                    and (g.run / "config.json").is_file():
                # The VMM finished writing the state and exited, then the RAM file was moved:
                # everything is there but the commit. Roll forward.
                cfg = util.read_json(g.run / "config.json")
                util.atomic_write_json(tmp / "config.json", cfg | {"taken_at": _now()}, durable=False)
                self._commit_snapshot(g)
                actions.append(f"{g.path.name}: completed an interrupted standby")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                actions.append(f"{g.path.name}: removed an unfinished standby")
                if proc is not None:  # the guest may be left paused by the interrupted standby
                    inst = self._load(g.path)
                    try:
                        if inst is not None and self.hypervisor(inst).resume(g, proc):
                            actions.append(f"{g.path.name}: resumed the guest")
                    except VmforkError:
                        pass
        if g.restoring.exists():
            if proc is None and snapshot_complete(g.restoring) and not g.snapshot_latest.exists():
                os.rename(g.restoring, g.snapshot_latest)  # the VMM never took the RAM: still valid
                actions.append(f"{g.path.name}: rolled back an interrupted restore")
            else:
                shutil.rmtree(g.restoring, ignore_errors=True)
                actions.append(f"{g.path.name}: removed a consumed snapshot")
        return actions

    def _kill_vmm_of(self, g: GuestDir) -> None:
        proc = vmm_record(g)
        if proc is not None:
            proc.kill()

    def _kill_orphan_vmms(self, actions: list[str]) -> None:
        """Kill VMMs running in one of our guest dirs that no instance records as its VMM.

        A VMM whose instance lock is held belongs to a vmfork command at work (it may not
        have recorded its pid yet): it is left alone.
        """
        guests = str(self.dd.guests.resolve())
        for pid_s in os.listdir("/proc"):
            if not pid_s.isdigit():
                continue
            pid = int(pid_s)
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
                exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            except OSError:
                continue
            if not cwd.startswith(guests + "/") or not exe.startswith(("qemu-system", "firecracker")):
                continue
            gdir = Path(cwd.removesuffix(" (deleted)"))
            fd: int | None = -1
            if gdir.exists():
                rec = vmm_record(GuestDir(gdir))
                if rec is not None and rec.pid == pid:
                    continue
                iid = gdir.name.removeprefix(".tmp-").removeprefix(".trash-")
                fd = try_lock(self.dd.locks / f"{iid}.lock")
                if fd is None:
                    continue
            try:
                ProcRef.of(pid).kill(timeout=2)
                actions.append(f"killed orphan VMM pid {pid} in {gdir.name}")
            except ProcessLookupError:
                pass
            finally:
                if fd is not None and fd >= 0:
                    os.close(fd)

    # --- create -----------------------------------------------------------------------------
    def _check_name_free(self, name: str) -> None:
        for inst in self.instances():
            if inst.name == name:
                raise AlreadyExists(f"instance '{name}' already exists (id {inst.id})")

    def _free_cid(self) -> int:
        used = {i.cid for i in self.instances()}
        cid = 3
        while cid in used:
            cid += 1
        return cid

    def _new_id(self) -> str:
        while True:
            iid = util.new_id()
            if not (self.dd.guests / iid).exists():
                return iid

    def run(self, name: str, *, memory_mib: int = 256, vcpus: int = 1, hypervisor: str = "qemu",
            accel: str = "auto", overcommit: bool = False) -> Instance:
        util.validate_name(name)
        if not 1 <= vcpus <= 32:
            raise InvalidArgument(f"invalid vcpus '{vcpus}': must be between 1 and 32")
        if accel not in ("auto", "kvm", "tcg"):
            raise InvalidArgument(f"invalid accel '{accel}': use auto, kvm or tcg")
        hv = get_hypervisor(hypervisor)
        problem = hv.available()
        if problem:
            raise HypervisorError(f"hypervisor '{hypervisor}' is not usable here: {problem}")
        self._check_name_free(name)  # fail fast, before any image work
        self._admit(f"'{name}'", hv, [ram_claim(name, memory_mib << 20, None)], overcommit=overcommit)
        image = ensure_image(self.dd.images, self.progress)
        accel_used, why = resolve_accel(hv, image, accel, self.progress)
        iid = self._new_id()
        tmp = self.dd.guests / f".tmp-{iid}"
        with file_lock(self.dd.locks / f"{iid}.lock", what=f"instance '{name}'", timeout=0):
            with self._global_lock():
                self._check_name_free(name)
                inst = Instance(
                    id=iid, name=name, hypervisor=hypervisor, accel=accel_used, memory_mib=memory_mib,
                    vcpus=vcpus, image_digest=image.digest, created_at=_now(), mac=new_mac(),
                    cid=self._free_cid(), dir=tmp,
                )
                try:
                    GuestDir(tmp).ensure_dirs()
                    clone_file(image.overlay_template, inst.g.disk)
                    util.atomic_write_json(inst.g.metadata, inst.to_json())
                    os.rename(tmp, self.dd.guests / iid)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            inst.dir = self.dd.guests / iid
            try:
                self.progress(f"booting '{name}' ({hypervisor}, {accel_used}: {why})")
                self._boot(inst, image)
            except BaseException:
                self._destroy(inst)
                raise
        return inst

    def _config(self, inst: Instance, hv: Hypervisor) -> VMConfig:
        return VMConfig(
            hypervisor=inst.hypervisor, memory_mib=inst.memory_mib, vcpus=inst.vcpus, accel=inst.accel,
            image_digest=inst.image_digest, cmdline=hv.kernel_cmdline(inst.accel, inst.name),
            vmm_version=hv.version(), extra={"id": inst.id},
        )

    def _admit(self, what: str, hv: Hypervisor, new: list[Claim], *, overcommit: bool,
               replacing: tuple[str, ...] = ()) -> None:
        """Admission control (``vmfork.space.admission``): NoSpace unless the free space
        covers the RAM that ``new`` and the other running guests (but ``replacing``) can claim."""
        if overcommit or not hv.capabilities.file_backed_memory:
            return
        running = [ram_claim(i.name, i.memory_mib << 20, i.g.memory) for i in self.instances()
                   if i.id not in replacing and vmm_record(i.g) is not None
                   and self.hypervisor(i).capabilities.file_backed_memory]
        admission.check(what, new, running, self.dd.guests)

    def _boot(self, inst: Instance, image: Image) -> None:
        hv = self.hypervisor(inst)
        cfg = self._config(inst, hv)
        g = inst.g
        util.atomic_write_json(g.run / "config.json", cfg.to_json(), durable=False)
        proc = hv.boot(g, cfg, image)
        watchdog.ensure(self.dd.root)
        self._agent_ready(inst, hv, proc, BOOT_TIMEOUT, "boot")

    def _agent_ready(self, inst: Instance, hv: Hypervisor, proc: ProcRef, timeout: float,
                     what: str) -> dict[str, float]:
        """Wait for the agent, then set the guest clock (and a fork's identity).

        Returns the seconds until the first answer (``agent_ping_s``) and for the rest
        (``agent_setup_s``)."""
        t0 = time.monotonic()
        try:
            with wait_ready(lambda: hv.agent(inst.g, 2.0), timeout, alive=proc.alive) as agent:
                t_ping = time.monotonic()
                agent.set_time()
                if not inst.identity_applied:
                    self._apply_identity(inst, agent)
            return {"agent_ping_s": t_ping - t0, "agent_setup_s": time.monotonic() - t_ping}
        except AgentError as e:
            hv.quit(inst.g, proc)
            console = tail(inst.g.console_log, 6)
            raise AgentError(f"'{inst.name}': guest agent not ready after {what}: {death_cause(inst.g) or e}"
                             + (f" (console: {console})" if console else "")) from None

    def _apply_identity(self, inst: Instance, agent: AgentClient) -> None:
        agent.set_hostname(inst.name)
        inst.identity_applied = True
        util.atomic_write_json(inst.g.metadata, inst.to_json())

    # --- start / stop / rm ----------------------------------------------------------------
    def start(self, ref: str, *, overcommit: bool = False) -> Instance:
        inst = self.find(ref)
        with self._lock(inst):
            st = self.status(inst).state
            if st == "running":
                raise WrongState(f"instance '{inst.name}' is already running")
            if st == "standby":
                raise WrongState(f"instance '{inst.name}' is in standby: use 'vmfork restore {inst.name}'")
            self._admit(f"'{inst.name}'", self.hypervisor(inst),
                        [ram_claim(inst.name, inst.memory_mib << 20, None)], overcommit=overcommit)
            self._boot(inst, self.image(inst.image_digest))
        return inst

    def stop(self, ref: str, *, force: bool = False) -> str:
        """Stop the guest; returns what was done."""
        inst = self.find(ref)
        with self._lock(inst):
            st = self.status(inst)
            if st.state == "stopped":
                return "already stopped"
            if st.state == "standby":
                if not force:
                    raise WrongState(f"instance '{inst.name}' is in standby: 'stop --force' discards its snapshot")
                shutil.rmtree(inst.g.snapshot_latest)
                return "snapshot discarded"
            assert st.proc is not None
            hv = self.hypervisor(inst)
            if not force:
                try:
                    with hv.agent(inst.g, 2.0) as agent:
                        agent.poweroff()
                    if st.proc.wait_exit(15):
                        inst.g.vmm_json.unlink(missing_ok=True)
                        return "powered off"
                except AgentError:
                    pass
            hv.quit(inst.g, st.proc)
            inst.g.vmm_json.unlink(missing_ok=True)
            return "stopped"

    def rm(self, ref: str, *, force: bool = False) -> None:
        inst = self.find(ref)
        with self._lock(inst):
            st = self.status(inst)
            if st.state == "running" and not force:
                raise WrongState(f"instance '{inst.name}' is running: stop it first or use 'rm --force'")
            self._destroy(inst)

    def _destroy(self, inst: Instance) -> None:
        proc = vmm_record(inst.g)
        if proc is not None:
            self.hypervisor(inst).quit(inst.g, proc)
        trash = self.dd.guests / f".trash-{inst.id}"
        if inst.dir.exists():
            os.rename(inst.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        (self.dd.locks / f"{inst.id}.lock").unlink(missing_ok=True)

    # --- exec -----------------------------------------------------------------------------
    def exec(self, ref: str, argv: list[str], *, stdin: bytes = b"", timeout: float | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None) -> ExecResult:
        if not argv:
            raise InvalidArgument("no command given: use 'vmfork exec NAME -- CMD [ARGS...]'")
        inst = self.find(ref)
        with self._lock(inst):
            status = self.status(inst)
            st = status.state
            if st != "running":
                hint = f": use 'vmfork restore {inst.name}'" if st == "standby" else f": use 'vmfork start {inst.name}'"
                raise WrongState(f"instance '{inst.name}' is {st}{hint}")
            if status.proc is not None and (mark := read_mark(inst.g, status.proc)) is not None:
                raise WrongState(f"instance '{inst.name}' is {mark.describe()}")
            try:
                with self.hypervisor(inst).agent(inst.g, 5.0) as agent:  # connecting pings the agent
                    return agent.exec(argv, stdin=stdin, timeout=timeout, env=env, cwd=cwd,
                                      on_stdout=on_stdout, on_stderr=on_stderr)
            except AgentError:
                cause = death_cause(inst.g)
                if cause:
                    raise HypervisorError(f"instance '{inst.name}' died: {cause}; "
                                          "it is stopped and its RAM is lost") from None
                raise

    # --- standby / restore ----------------------------------------------------------------
    def standby(self, ref: str) -> dict[str, Any]:
        inst = self.find(ref)
        with self._lock(inst):
            return self._standby_locked(inst)

    def _standby_locked(self, inst: Instance) -> dict[str, Any]:
        st = self.status(inst)
        if st.state != "running":
            raise WrongState(f"instance '{inst.name}' is {st.state}: only a running instance can be put in standby")
        assert st.proc is not None
        g, hv = inst.g, self.hypervisor(inst)
        t0 = time.monotonic()
        shutil.rmtree(g.snapshot_tmp, ignore_errors=True)
        if g.snapshot_latest.exists():
            shutil.rmtree(g.snapshot_latest)  # stale: the VM ran since it was taken
        g.snapshot_tmp.mkdir(parents=True)
        cfg = VMConfig.from_json(util.read_json(g.run / "config.json"))
        hv.save(g, cfg, st.proc, g.snapshot_tmp)
        crashpoint("standby:saved")
        t_save = time.monotonic()
        util.atomic_write_json(g.snapshot_tmp / "config.json",
                               cfg.to_json() | {"taken_at": _now()}, durable=False)
        self._commit_snapshot(g)
        g.vmm_json.unlink(missing_ok=True)
        t1 = time.monotonic()
        phases = {f"save_{k}": round(v, 4) for k, v in getattr(hv, "last_phases", {}).items()}
        return {"save_s": round(t_save - t0, 4), **phases, "fsync_s": round(t1 - t_save, 4),
                "total_s": round(t1 - t0, 4)}

    def _commit_snapshot(self, g: GuestDir) -> None:
        """Make .snapshot-tmp durable and rename it to snapshot-latest (the commit point)."""
        for f in ("memory", "state", "config.json"):
            util.fsync_file(g.snapshot_tmp / f)  # memory: only the pages dirtied since the last one
        util.fsync_file(g.disk)
        util.fsync_dir(g.snapshot_tmp)
        os.rename(g.snapshot_tmp, g.snapshot_latest)
        util.fsync_dir(g.snapshots)

    def restore(self, ref: str, *, overcommit: bool = False) -> dict[str, Any]:
        inst = self.find(ref)
        with self._lock(inst):
            if self.status(inst).state == "standby":
                self._admit(f"'{inst.name}'", self.hypervisor(inst), [ram_claim(
                    inst.name, inst.memory_mib << 20, inst.g.snapshot_latest / "memory")], overcommit=overcommit)
            return self._restore_locked(inst)

    def resume(self, ref: str, *, overcommit: bool = False) -> str:
        """Resume a running guest that is paused (by the space watchdog, or left paused);
        returns what was done."""
        inst = self.find(ref)
        with self._lock(inst):
            st = self.status(inst)
            if st.proc is None:
                raise WrongState(f"instance '{inst.name}' is {st.state}: only a running instance can be resumed")
            hv = self.hypervisor(inst)
            self._admit(f"'{inst.name}'", hv, [ram_claim(inst.name, inst.memory_mib << 20, inst.g.memory)],
                        overcommit=overcommit, replacing=(inst.id,))
            resumed = hv.resume(inst.g, st.proc)
            clear_mark(inst.g)
            return "resumed" if resumed else "not paused"

    def _restore_locked(self, inst: Instance) -> dict[str, Any]:
        st = self.status(inst).state
        if st != "standby":
            raise WrongState(f"instance '{inst.name}' is {st}: only an instance in standby can be restored")
        g, hv = inst.g, self.hypervisor(inst)
        t0 = time.monotonic()
        cfg = VMConfig.from_json(
            {k: v for k, v in util.read_json(g.snapshot_latest / "config.json").items() if k != "taken_at"}
        )
        hv.check_snapshot_compat(cfg, inst.name)
        cfg.extra["id"] = inst.id
        image = self.image(cfg.image_digest)
        shutil.rmtree(g.restoring, ignore_errors=True)
        os.rename(g.snapshot_latest, g.restoring)  # visible on disk: the snapshot is being consumed
        util.fsync_dir(g.snapshots)
        util.atomic_write_json(g.run / "config.json", cfg.to_json(), durable=False)
        crashpoint("restore:consuming")
        t_prep = time.monotonic()
        try:
            proc = hv.restore(g, cfg, image, g.restoring)
        except BaseException:
            if snapshot_complete(g.restoring):  # not consumed: give it back
                os.rename(g.restoring, g.snapshot_latest)
            raise
        t_vmm = time.monotonic()
        watchdog.ensure(self.dd.root)
        try:
            agent_phases = self._agent_ready(inst, hv, proc, RESTORE_TIMEOUT, "restore")
        except BaseException:
            if not hv.capabilities.restore_consumes_snapshot and snapshot_complete(g.restoring):
                os.rename(g.restoring, g.snapshot_latest)  # never written to: still valid
            else:
                shutil.rmtree(g.restoring, ignore_errors=True)
            raise
        if hv.capabilities.restore_consumes_snapshot:
            shutil.rmtree(g.restoring, ignore_errors=True)
        else:
            shutil.rmtree(g.snapshot_base, ignore_errors=True)
            os.rename(g.restoring, g.snapshot_base)
        t1 = time.monotonic()
        phases = {k: round(v, 4) for k, v in (getattr(hv, "last_phases", {}) | agent_phases).items()}
        return {"prep_s": round(t_prep - t0, 4), **phases, "vmm_s": round(t_vmm - t0, 4),
                "agent_s": round(t1 - t_vmm, 4), "total_s": round(t1 - t0, 4)}

    # --- fork -----------------------------------------------------------------------------
    def fork(self, src_ref: str, name: str, *, from_running: bool = False,
             target_state: str | None = None, overcommit: bool = False) -> tuple[Instance, dict[str, Any]]:
        util.validate_name(name)
        if target_state not in (None, "running", "standby", "stopped"):
            raise InvalidArgument(f"invalid target state '{target_state}': use running, standby or stopped")
        src = self.find(src_ref)
        self._check_name_free(name)
        timings: dict[str, Any] = {}
        t0 = time.monotonic()
        with self._lock(src):
            st = self.status(src).state
            was_running = st == "running"
            if was_running and not from_running:
                raise WrongState(f"instance '{src.name}' is running: use 'fork --from-running' "
                                 "(it is put in standby, forked, and both are restored)")
            if st == "stopped":
                raise WrongState(f"instance '{src.name}' is stopped: only a standby or running instance can be forked")
            ram = src.memory_mib << 20  # a running fork and a running source claim all their RAM
            claims = ([Claim(name, ram, ram)] if target_state == "running" or (target_state is None and was_running)
                      else []) + ([Claim(src.name, ram, ram)] if was_running else [])
            if claims:
                self._admit(f"fork '{name}'", self.hypervisor(src), claims, overcommit=overcommit, replacing=(src.id,))
            if was_running:
                timings["source_standby"] = self._standby_locked(src)
                crashpoint("fork:source-standby")
            try:
                timings["lookup_s"] = round(time.monotonic() - t0, 4)
                fork, stats, phases = self._clone(src, name)
                timings["clone_s"] = round(stats.seconds, 4)
                timings["clone_method"] = stats.method
                timings |= {k: round(v, 4) for k, v in phases.items()}
            finally:
                if was_running:
                    timings["source_restore"] = self._restore_locked(src)
        crashpoint("fork:created")
        target = target_state or ("running" if was_running else "standby")
        if target == "running":
            with self._lock(fork):
                timings["fork_restore"] = self._restore_locked(fork)
        elif target == "stopped":
            with self._lock(fork):
                shutil.rmtree(fork.g.snapshot_latest)
        timings["total_s"] = round(time.monotonic() - t0, 4)
        return fork, timings

    def _clone(self, src: Instance, name: str) -> tuple[Instance, CopyStats, dict[str, float]]:
        """Clone a standby source into a new instance, atomically (tmp dir + rename).

        Returns the fork, the copy stats and the seconds spent after the copy: writing the
        fork's metadata (``metadata_s``) and making the whole fork durable (``sync_s``).
        """
        iid = self._new_id()
        tmp = self.dd.guests / f".tmp-{iid}"
        with file_lock(self.dd.locks / f"{iid}.lock", what=f"instance '{name}'", timeout=0), self._global_lock():
            self._check_name_free(name)
            try:
                stats = clone_tree(src.dir, tmp, skip=_guest_skip)
                crashpoint("fork:cloned")
                t_meta = time.monotonic()
                fork = Instance(
                    id=iid, name=name, hypervisor=src.hypervisor, accel=src.accel,
                    memory_mib=src.memory_mib, vcpus=src.vcpus, image_digest=src.image_digest,
                    created_at=_now(), mac=new_mac(), cid=self._free_cid(), parent_id=src.id,
                    parent_name=src.name, identity_applied=False, dir=tmp,
                )
                fork.g.ensure_dirs()
                util.atomic_write_json(fork.g.metadata, fork.to_json(), durable=False)
                t_sync = time.monotonic()
                fsync_tree(tmp, parent=False)  # the clone and its metadata, in one pass (one log force)
                crashpoint("fork:before-rename")
                os.rename(tmp, self.dd.guests / iid)
                util.fsync_dir(self.dd.guests)
                phases = {"metadata_s": t_sync - t_meta, "sync_s": time.monotonic() - t_sync}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        fork.dir = self.dd.guests / iid
        return fork, stats, phases

    # --- views ----------------------------------------------------------------------------
    def describe(self, inst: Instance, *, detail: bool = False) -> dict[str, Any]:
        st = self.status(inst)
        state = st.state
        if detail and st.proc is not None:
            qs = self.hypervisor(inst).status(inst.g, st.proc)
            state = "paused" if qs in ("paused", "prelaunch", "inmigrate", "postmigrate") else "running"
        mark = read_mark(inst.g, st.proc) if st.proc is not None else None
        if mark is not None:
            state = "paused"
        problem = mark.describe() if mark else death_cause(inst.g) if state == "stopped" else None
        d: dict[str, Any] = {
            "id": inst.id, "name": inst.name, "state": state, "problem": problem, "hypervisor": inst.hypervisor,
            "accel": inst.accel, "memory_mib": inst.memory_mib, "vcpus": inst.vcpus,
            "pid": st.proc.pid if st.proc else None, "dir": str(inst.dir),
            "created_at": inst.created_at, "parent": inst.parent_name,
        }
        if detail:
            from vmfork.fs import allocated_bytes

            snap = inst.g.snapshot_latest
            d |= {
                "parent_id": inst.parent_id, "mac": inst.mac, "vsock_cid": inst.cid,
                "image": inst.image_digest, "disk": str(inst.g.disk),
                "disk_allocated_bytes": allocated_bytes(inst.g.disk) if inst.g.disk.exists() else 0,
                "console_log": str(inst.g.console_log),
                "snapshot": None if not inst.g.has_snapshot() else {
                    "dir": str(snap),
                    "memory_bytes": (snap / "memory").stat().st_size,
                    "memory_allocated_bytes": allocated_bytes(snap / "memory"),
                    "memory_inode": (snap / "memory").stat().st_ino,
                    "taken_at": json.loads((snap / "config.json").read_text()).get("taken_at"),
                },
            }
        return d
