"""The lifecycle of instances: run, start, stop, rm, exec, standby, restore, fork.

Rules every operation keeps:
- state is derived (VMM alive? complete snapshot on disk?), metadata is written atomically;
- one vmfork process at a time works on an instance (flock in ``locks/<id>.lock``);
- a new instance (run or fork) is built in ``guests/.tmp-<id>`` and renamed into place,
  so a failure or a crash leaves a whole instance or nothing (``recover`` cleans up); one
  still being brought to its target state carries ``pending`` until it is there, and a
  crash before that rolls it back;
- an operation re-reads its instance once it holds the lock (it may have gone meanwhile);
- standby and restore have one commit point each (the snapshot's manifest, written once the
  VMM wrote everything; the restore's ``resumed`` mark, made just before the guest runs):
  a crash before it is undone, a crash after it is finished, never left half;
- a fork never writes to its source's files: it gets copy-on-write clones of them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork import confine, pool, util
from vmfork.errors import (
    AgentError,
    AlreadyExists,
    ExecAborted,
    HypervisorError,
    InvalidArgument,
    NotFound,
    VmforkError,
    WrongState,
)
from vmfork.forkvm import CopyStats, clone_file, clone_tree
from vmfork.forkvm.copier import fsync_tree
from vmfork.fs import set_cow_extent_size_hint
from vmfork.guest.agent import MAX_BUFFERED_OUTPUT, ExecResult, ExecStdin, wait_ready
from vmfork.hypervisor import get_hypervisor, resolve_accel
from vmfork.hypervisor.base import Hypervisor, VMConfig, tail, vmm_record
from vmfork.hypervisor.shared_ram import TEMPLATES, ensure_template
from vmfork.instances import integrity, snapshot_ops, view
from vmfork.instances.model import Instance, new_mac
from vmfork.layout import GuestDir
from vmfork.locking import file_lock, release, try_lock, unlink_held
from vmfork.paths import DataDir
from vmfork.procs import ProcRef
from vmfork.space import admission, watchdog
from vmfork.space.admission import Claim, ram_claim
from vmfork.space.pause import clear_mark, read_mark
from vmfork.supervisor import death_cause
from vmfork.util import crashpoint

if TYPE_CHECKING:  # images and the exec mux are imported where used (read-only commands start fast)
    from vmfork.images import Image
    from vmfork.network import NetSpec

Progress = Callable[[str], None]

BOOT_TIMEOUT = float(os.environ.get("VMFORK_BOOT_TIMEOUT", "120"))
RESTORE_TIMEOUT = float(os.environ.get("VMFORK_RESTORE_TIMEOUT", "60"))
LOCK_TIMEOUT = float(os.environ.get("VMFORK_LOCK_TIMEOUT", "60"))
# Copy-on-write extent size hint (bytes) for guests/ on XFS: a fork's mem-file then costs the
# pages it dirties, not 128 KiB (the XFS default) per page. VMFORK_COWEXTSIZE=0 leaves the
# filesystem's default on a new data dir.
COW_EXTSIZE = 4096
# Made in .restoring just before the restored guest is resumed: from then on it writes its RAM.
RESUMED = "resumed"


Status = view.Status


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _guest_skip(rel: Path, st: os.stat_result) -> bool:
    """What a fork does not take from its source: runtime files, logs, live RAM, work dirs,
    and the source's metadata (the fork writes its own)."""
    parts = rel.parts
    if not parts:
        return False
    if parts[0] in ("run", "logs", "memory", "instance.json", TEMPLATES):
        return True
    if parts[0] == "snapshots" and len(parts) > 1 and (parts[1].startswith(".") or parts[1] == "snapshot-base"):
        return True
    import stat as _stat

    return not (_stat.S_ISREG(st.st_mode) or _stat.S_ISDIR(st.st_mode) or _stat.S_ISLNK(st.st_mode))


class Manager:
    def __init__(self, root: Path, progress: Progress | None = None, *, create: bool = True) -> None:
        """``create=False`` (read-only commands): the data dir is taken as it is, nothing is made."""
        self.dd = DataDir(root).ensure() if create else DataDir(root)
        self.progress: Progress = progress or (lambda _msg: None)
        # Runs the refill of a warm pool after a fork took a slot (vmfork.pool): at once by
        # default (the CLI, after the fork is done), in the background under 'vmfork serve'.
        self.refill: Callable[[Callable[[], None]], None] = lambda job: job()
        cow_extsize = os.environ.get("VMFORK_COWEXTSIZE", "")
        size = int(cow_extsize) if cow_extsize.isdigit() else COW_EXTSIZE
        if size > 0 and create:  # inherited by every guest dir and file created from now on (XFS only)
            set_cow_extent_size_hint(self.dd.guests, size)

    # --- locks ----------------------------------------------------------------------------
    def _global_lock(self) -> Any:
        return file_lock(self.dd.locks / "global.lock", what="the data dir", timeout=LOCK_TIMEOUT)

    def _lock_path(self, iid: str) -> Path:
        return self.dd.locks / f"{iid}.lock"

    @contextmanager
    def _instance_lock(self, iid: str, name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """The lock of instance ``iid``; its lock file goes when the instance is gone."""
        path = self._lock_path(iid)
        with file_lock(path, what=f"instance '{name}'", timeout=timeout) as fd:
            try:
                yield
            finally:
                if not (self.dd.guests / iid).exists() and not (self.dd.guests / f".tmp-{iid}").exists():
                    unlink_held(fd, path)

    @contextmanager
    def _locked(self, ref: str | Instance) -> Iterator[Instance]:
        """Find the instance, lock it, and yield it as it is now that the lock is held."""
        inst = ref if isinstance(ref, Instance) else self.find(ref)
        with self._instance_lock(inst.id, inst.name):
            d = self.dd.guests / inst.id
            if not d.is_dir():
                raise NotFound(f"instance '{inst.name}' not found (it was removed meanwhile)")
            yield Instance.load(d)

    # --- lookup ---------------------------------------------------------------------------
    def instances(self) -> list[Instance]:
        """Every instance, those with unreadable metadata included (with their ``problem``)."""
        return view.instances(self.dd.guests)

    def find(self, ref: str) -> Instance:
        for inst in self.instances():
            if ref in (inst.name, inst.id):
                return inst
        raise NotFound(f"instance '{ref}' not found")

    def status(self, inst: Instance) -> Status:
        return view.status(inst)

    def _usable(self, inst: Instance, st: Status) -> None:
        if st.state == "error":
            raise WrongState(f"instance '{inst.name}' is broken: {st.problem} "
                             f"('vmfork rm {inst.name}' removes it)")

    def hypervisor(self, inst: Instance) -> Hypervisor:
        return get_hypervisor(inst.hypervisor)

    def image(self, digest: str) -> Image:
        from vmfork.images import load_image

        return load_image(self.dd.images, digest)

    def _set_metadata(self, inst: Instance, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(inst, k, v)
        util.atomic_write_json(inst.g.metadata, inst.to_json())

    # --- recovery -------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or undo what a crashed vmfork left behind. Safe to run at any time: it
        touches only what no live vmfork holds the lock of."""
        actions: list[str] = []
        if not self.dd.guests.is_dir():
            return actions  # a data dir not made yet (read-only view): nothing to recover
        if pool.slot_dirs(self.dd.guests):
            from vmfork.pool import ops as pool_ops

            actions += pool_ops.recover(self)
        for d in sorted(self.dd.guests.iterdir()):
            if d.name.startswith((".tmp-", ".trash-")):
                iid = d.name.split("-", 1)[1]
                with self._try_instance_lock(iid) as free:
                    if free:
                        self._kill_vmm_of(GuestDir(d))
                        shutil.rmtree(d, ignore_errors=True)
                        confine.release(self.dd.root, iid)
                        actions.append(f"removed unfinished {d.name}")
                continue
            if d.name.startswith(".") or not d.is_dir() or pool.is_slot(d):
                continue
            inst = Instance.load(d)
            if not (view.unfinished(inst) or snapshot_ops.batch_open(self, inst)):
                continue
            with self._try_instance_lock(d.name) as free:
                if free:
                    actions += self._recover_guest(Instance.load(d))
        actions += snapshot_ops.recover(self)
        actions += self.oci_store().recover()  # an interrupted image pull's temp dir
        self._kill_orphan_vmms(actions)
        self._remove_stale_locks(actions)
        live = {d.name.split("-", 1)[-1] for d in self.dd.guests.iterdir()}
        actions += confine.clean(self.dd.root, live)
        if (self.dd.root / "network" / "leases").is_dir():
            from vmfork import network

            actions += network.clean(self.dd.root, live)
        return actions

    @contextmanager
    def _try_instance_lock(self, iid: str) -> Iterator[bool]:
        path = self._lock_path(iid)
        fd = try_lock(path, create=True)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                gone = not (self.dd.guests / iid).exists() and not (self.dd.guests / f".tmp-{iid}").exists()
                release(fd, path, remove=gone)

    def _recover_guest(self, inst: Instance) -> list[str]:
        g, label = inst.g, inst.name
        if not inst.problem and snapshot_ops.batch_open(self, inst):
            self._destroy(inst)  # all or none: its batch was never committed
            return [f"{label}: rolled back an unfinished fork --count"]
        if inst.pending and not inst.problem:
            what = "fork" if inst.parent_id else "run"
            self._destroy(inst)
            return [f"{label}: rolled back an unfinished {what} (it was to end {inst.pending})"]
        actions = snapshot_ops.recover_guest(self, inst)
        if g.snapshot_tmp.exists():
            actions.append(f"{label}: {self._recover_standby(inst)}")
        if g.restoring.exists():
            actions.append(f"{label}: {self._recover_restore(inst)}")
        return actions

    def _recover_standby(self, inst: Instance) -> str:
        g, hv, tmp = inst.g, self.hypervisor(inst), inst.g.snapshot_tmp
        proc = vmm_record(g)
        if integrity.has_manifest(tmp):
            # The VMM had written everything: roll forward, wherever the RAM file is now.
            if proc is not None:
                hv.quit(g, proc)
            if hv.capabilities.file_backed_memory and not (tmp / "memory").exists() and g.memory.exists():
                os.rename(g.memory, tmp / "memory")
            self._commit_snapshot(g)
            g.vmm_json.unlink(missing_ok=True)
            return "completed an interrupted standby"
        shutil.rmtree(tmp, ignore_errors=True)
        if proc is None:
            return "removed an unfinished standby (the VMM was gone)"
        if read_mark(g, proc) is not None:  # paused by the space watchdog: it stays so
            return "undid an interrupted standby (the guest stays paused: the filesystem is nearly full)"
        try:
            resumed = hv.resume(g, proc)  # an interrupted standby may have paused the guest
        except VmforkError as e:
            return f"undid an interrupted standby, but could not resume the guest: {e}"
        return "undid an interrupted standby" + ("; resumed the guest" if resumed else "")

    def _recover_restore(self, inst: Instance) -> str:
        g, hv, r = inst.g, self.hypervisor(inst), inst.g.restoring
        proc = vmm_record(g)
        if (r / RESUMED).exists():  # the guest ran on the snapshot's RAM
            if proc is not None:
                with contextlib.suppress(VmforkError):
                    hv.resume(g, proc)
                self._finish_restore(g, hv)
                return "finished an interrupted restore"
            if hv.capabilities.restore_consumes_snapshot:
                shutil.rmtree(r, ignore_errors=True)
                return "removed a snapshot consumed by a restore whose VMM is gone"
            (r / RESUMED).unlink()
        elif proc is not None:
            hv.quit(g, proc)  # loaded at most, never resumed: the RAM is untouched
        if hv.capabilities.file_backed_memory and not (r / "memory").exists() and g.memory.exists():
            os.rename(g.memory, r / "memory")
        if g.snapshot_latest.exists():
            shutil.rmtree(r, ignore_errors=True)
            return "removed a stale restore"
        os.rename(r, g.snapshot_latest)
        util.fsync_dir(g.snapshots)
        return "rolled back an interrupted restore"

    def _kill_vmm_of(self, g: GuestDir) -> None:
        proc = vmm_record(g)
        if proc is not None:
            proc.kill()

    def _kill_orphan_vmms(self, actions: list[str]) -> None:
        """Kill VMMs running in one of our guest dirs that no instance records as its VMM.

        A VMM whose instance lock is held belongs to a vmfork command at work (it may not
        have recorded its pid yet): it is left alone.
        """
        for pid, gdir in list(view.unrecorded_vmms(self.dd.guests)):
            iid = gdir.name.removeprefix(".tmp-").removeprefix(".trash-")
            with self._try_instance_lock(iid) as free:
                if not free:
                    continue
                try:
                    ProcRef.of(pid).kill(timeout=2)
                    actions.append(f"killed orphan VMM pid {pid} in {gdir.name}")
                except ProcessLookupError:
                    pass

    def _remove_stale_locks(self, actions: list[str]) -> None:
        """Lock files of instances that do not exist (left by a crash) go."""
        for f in view.stale_locks(self.dd.root):
            with self._try_instance_lock(f.name.removesuffix(".lock")):
                pass  # released with remove=True when free (the instance is gone)

    # --- create -----------------------------------------------------------------------------
    def _check_name_free(self, name: str) -> None:
        for inst in self.instances():
            if inst.name == name:
                raise AlreadyExists(f"instance '{name}' already exists (id {inst.id})")

    def _free_cid(self) -> int:
        used = {i.cid for i in self.instances()} | pool.cids(self.dd.guests)
        cid = 3
        while cid in used:
            cid += 1
        return cid

    def _new_id(self) -> str:
        while True:
            iid = util.new_id()
            if not (self.dd.guests / iid).exists() and not self._lock_path(iid).exists():
                return iid

    def run(self, name: str, *, memory_mib: int = 256, vcpus: int = 1, hypervisor: str = "qemu",
            accel: str = "auto", limits: dict[str, Any] | None = None,
            overcommit: bool = False, network: NetSpec | None = None, oci_image: str | None = None,
            main: dict[str, Any] | None = None) -> Instance:
        """Create and boot ``name``; with ``oci_image`` (an OCI ref or digest, pulled if absent) its
        Entrypoint/Cmd runs as the main process, ``main`` holding the overrides (env, workdir,
        entrypoint, args: ``images.main.resolve``)."""
        util.validate_name(name)
        limits = {k: v for k, v in (limits or {}).items() if v is not None} or None
        confine.validate_limits(**{k: (limits or {}).get(k) for k in confine.LIMIT_KEYS})
        if not 1 <= vcpus <= 32:
            raise InvalidArgument(f"invalid vcpus '{vcpus}': must be between 1 and 32")
        if accel not in ("auto", "kvm", "tcg"):
            raise InvalidArgument(f"invalid accel '{accel}': use auto, kvm or tcg")
        hv = get_hypervisor(hypervisor)
        problem = hv.available()
        if problem:
            raise HypervisorError(f"hypervisor '{hypervisor}' is not usable here: {problem}")
        self._check_name_free(name)  # fail fast, before any image work
        oci = self._oci_for_run(oci_image, hypervisor, main or {}) if oci_image is not None else None
        self._admit(f"'{name}'", hv, [ram_claim(name, memory_mib << 20, None)], overcommit=overcommit)
        from vmfork.images import ensure_image

        image = ensure_image(self.dd.images, self.progress)
        accel_used, why = resolve_accel(hv, image, accel, self.progress)
        iid = self._new_id()
        tmp = self.dd.guests / f".tmp-{iid}"
        with self._instance_lock(iid, name, timeout=0):
            with self._global_lock():
                self._check_name_free(name)
                inst = Instance(
                    id=iid, name=name, hypervisor=hypervisor, accel=accel_used, memory_mib=memory_mib,
                    vcpus=vcpus, image_digest=image.digest, created_at=_now(), mac=new_mac(),
                    cid=self._free_cid(), pending="running", dir=tmp, limits=limits, oci=oci,
                    network=network.to_json() if network is not None and network.enabled else None,
                )
                try:
                    GuestDir(tmp).ensure_dirs()
                    clone_file(image.overlay_template, inst.g.disk)
                    os.chmod(inst.g.disk, 0o600)  # the clone has the template's mode
                    util.atomic_write_json(inst.g.metadata, inst.to_json())
                    os.rename(tmp, self.dd.guests / iid)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            inst.dir = self.dd.guests / iid
            try:
                self.progress(f"booting '{name}' ({hypervisor}, {accel_used}: {why})")
                self._boot(inst, image)
                self._start_main(inst)
                crashpoint("run:booted")
                self._set_metadata(inst, pending=None)
            except BaseException as e:
                kept = self._keep_failed_log(inst)
                self._destroy(inst)
                if kept is not None and isinstance(e, VmforkError):
                    e.args = (f"{e} (VMM log kept in {kept})",)
                raise
        return inst

    def _keep_failed_log(self, inst: Instance) -> Path | None:
        """Copy a failed run's VMM log out of the instance about to be removed (the last 10 kept)."""
        if not inst.g.vmm_log.is_file() or inst.g.vmm_log.stat().st_size == 0:
            return None
        failed = self.dd.root / "failed-runs"
        try:
            failed.mkdir(exist_ok=True)
            dst = failed / f"{inst.name}-{inst.id}.vmm.log"
            shutil.copyfile(inst.g.vmm_log, dst)
            for old in sorted(failed.glob("*.vmm.log"), key=lambda f: f.stat().st_mtime)[:-10]:
                old.unlink(missing_ok=True)
        except OSError:
            return None
        return dst

    def _config(self, inst: Instance, hv: Hypervisor) -> VMConfig:
        cfg = VMConfig(
            hypervisor=inst.hypervisor, memory_mib=inst.memory_mib, vcpus=inst.vcpus, accel=inst.accel,
            image_digest=inst.image_digest, cmdline=hv.kernel_cmdline(inst.accel, inst.name),
            vmm_version=hv.version(), id=inst.id, cid=inst.cid, mac=inst.mac,
        )
        if inst.oci:  # one more disk: the OCI image's root, mounted by the guest's stage-1 init
            im = self.oci_store().by_digest(str(inst.oci["digest"]))
            cfg.oci_rootfs, cfg.oci_digest = str(im.rootfs), im.digest
            cfg.cmdline += f" vmfork.image={im.fs}"
        return cfg

    # --- OCI images (vmfork run --image) --------------------------------------------------
    def oci_store(self) -> Any:
        from vmfork.images.store import Store

        return Store(self.dd.images, self.progress)

    def _oci_for_run(self, ref: str, hypervisor: str, overrides: dict[str, Any]) -> dict[str, Any]:
        from vmfork.images import main as image_main

        if hypervisor != "qemu":
            raise InvalidArgument(f"--image is not supported with --hypervisor {hypervisor} yet: use qemu")
        store = self.oci_store()
        try:
            im = store.get(ref)
        except NotFound:
            im = store.pull(ref)
        return {"ref": ref, "digest": im.digest, "fs": im.fs, "main": image_main.resolve(im.spec, **overrides)}

    def _guest_command(self, inst: Instance, proc: ProcRef, argv: list[str], timeout: float) -> ExecResult:
        """Run a command of vmfork's own in the guest (through the exec mux; lock held)."""
        from vmfork.guest import muxctl

        hv = self.hypervisor(inst)
        with muxctl.connect(inst.g, proc, lambda: hv.agent(inst.g, 5.0)) as conn:
            req = conn.start_exec(argv, stdin=b"", timeout=timeout, env=None, cwd=None)
            return conn.wait_exec(req, argv, timeout=timeout, on_stdout=None, on_stderr=None,
                                  max_output=64 << 10)

    def _start_main(self, inst: Instance) -> None:
        """Start an image guest's main process (after a cold boot: run, start)."""
        if not inst.oci:
            return
        from vmfork.images import main as image_main

        proc = vmm_record(inst.g)
        assert proc is not None
        r = self._guest_command(inst, proc, image_main.start_argv(inst.oci["main"]), 60.0)
        if not r.ok:
            said = util.one_line(r.stderr[:300].decode(errors="replace").strip())
            raise AgentError(f"'{inst.name}': the main process did not start (exit {r.exit_code}): {said}")

    def main_state(self, inst: Instance) -> dict[str, Any] | None:
        """The main process of an image guest, as its guest says (bounded, escaped)."""
        if not inst.oci:
            return None
        from vmfork.images import main as image_main

        st = self.status(inst)
        if st.state != "running" or st.proc is None or read_mark(inst.g, st.proc) is not None:
            return {"state": "unknown" if st.state == "running" else st.state, "pid": None,
                    "exit_code": None, "argv": inst.oci["main"]["argv"]}
        try:
            r = self._guest_command(inst, st.proc, image_main.STATE_CMD, 10.0)
            state = image_main.parse_state(r.stdout.decode(errors="replace"))
        except VmforkError as e:
            state = {"state": "unknown", "pid": None, "exit_code": None, "problem": str(e)[:200]}
        return state | {"argv": inst.oci["main"]["argv"]}

    def image_users(self, digest: str) -> list[str]:
        """Instances and named snapshots that use the OCI image ``digest``."""
        users = [f"instance '{i.name}'" for i in self.instances() if i.oci and i.oci.get("digest") == digest]
        snaps = self.dd.root / "snapshots"
        for meta in sorted(snaps.glob("*/snapshot.json")) if snaps.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                d = json.loads(meta.read_text())
                if (d.get("oci") or {}).get("digest") == digest:
                    users.append(f"snapshot '{d.get('name')}'")
        return users

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
        shutil.rmtree(g.snapshot_base, ignore_errors=True)  # a cold boot has no base for a Diff
        self._confine(inst, image)
        net_done = self._attach_network(inst, cfg, boot=True)
        util.atomic_write_json(g.run / "config.json", cfg.to_json(), durable=False)
        with self._explain_vmm_death(inst):
            proc = hv.boot(g, cfg, image)
            try:
                net_done()
            except BaseException:
                hv.quit(g, proc)
                raise
            watchdog.ensure(self.dd.root)
            self._agent_ready(inst, hv, proc, BOOT_TIMEOUT, "boot")

    def _confine(self, inst: Instance, image: Image) -> None:
        """Plan the confinement of the next VMM of ``inst``: its own uid (allocated once),
        its cgroup limits, what it may see (its guest dir and the image)."""
        if not confine.enabled():
            confine.clear_plan(inst.g)
            return
        tun = inst.network is not None
        if inst.uid is None:
            self._set_metadata(inst, uid=confine.ids.allocate(self.dd.root, inst.id))
        assert inst.uid is not None
        limits = confine.default_limits(inst.memory_mib, inst.accel, **(inst.limits or {}))
        oci_dirs = [self.oci_store().root / str(inst.oci["digest"]).removeprefix("sha256:")] if inst.oci else []
        confine.write_plan(inst.g, data_dir=self.dd.root, iid=inst.id, uid=inst.uid, limits=limits,
                           hypervisor=inst.hypervisor, accel=inst.accel, ro_dirs=[image.dir, *oci_dirs], tun=tun)

    def _attach_network(self, inst: Instance, cfg: VMConfig, *, boot: bool = False) -> Callable[[], None]:
        """Give the next VMM of ``inst`` its network (vmfork.network): its own namespace and
        address, made if missing, and the guest NIC, the same in every instance. A snapshot
        taken with a NIC is restored with one (a fork of a named snapshot: default policy).
        Returns what completes the namespace: call it while the VMM starts, before the guest runs."""
        if inst.network is None and not cfg.tap:
            return lambda: None
        from vmfork import network

        spec = network.NetSpec.from_json(inst.network or {"mode": "default"})
        if inst.network is None:
            self._set_metadata(inst, network=spec.to_json())
        lease, complete = network.begin(self.dd.root, inst.id, spec, inst.uid)
        cfg.tap, cfg.netns, cfg.mac = network.TAP, lease.netns, network.GUEST_MAC
        if boot:
            cfg.cmdline += " " + network.guest_cmdline()
        return complete

    def _fork_network(self, src: Instance, publish: tuple[Any, ...]) -> dict[str, Any] | None:
        """A fork's network: its source's policy with its own published ports (``fork -p``)."""
        if src.network is None:
            if publish:
                raise InvalidArgument(f"-p: instance '{src.name}' has no network, so neither has its fork")
            return None
        from vmfork.network import NetSpec

        return NetSpec.from_json(src.network).for_fork(tuple(publish)).to_json()

    @contextmanager
    def _explain_vmm_death(self, inst: Instance) -> Iterator[None]:
        """A VMM that died while starting: say so if its cgroup killed it (memory limit)."""
        try:
            yield
        except VmforkError as e:
            cause = confine.exit_cause(self.dd.root, inst.id)
            if cause is None:
                raise
            raise HypervisorError(f"'{inst.name}': the VMM was killed by its cgroup: {cause}; {e}") from None

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
                    agent.set_hostname(inst.name)
                    self._set_metadata(inst, identity_applied=True)
            return {"agent_ping_s": t_ping - t0, "agent_setup_s": time.monotonic() - t_ping}
        except AgentError as e:
            died = not proc.alive()
            hv.quit(inst.g, proc)
            if died:  # the VMM's own last words say why
                vmm = hv.vmm_log_tail(inst.g)
                raise AgentError(f"'{inst.name}': the {hv.name} VMM stopped before the guest agent answered "
                                 f"after {what}" + (f": {vmm}" if vmm else "")) from None
            console = tail(inst.g.console_log, 6)
            raise AgentError(f"'{inst.name}': guest agent not ready after {what}: {death_cause(inst.g) or e}"
                             + (f" (console: {console})" if console else "")) from None

    # --- start / stop / rm ----------------------------------------------------------------
    def start(self, ref: str, *, overcommit: bool = False) -> Instance:
        with self._locked(ref) as inst:
            st = self.status(inst)
            self._usable(inst, st)
            if st.state == "running":
                raise WrongState(f"instance '{inst.name}' is already running")
            if st.state == "standby":
                raise WrongState(f"instance '{inst.name}' is in standby: use 'vmfork restore {inst.name}'")
            self._admit(f"'{inst.name}'", self.hypervisor(inst),
                        [ram_claim(inst.name, inst.memory_mib << 20, None)], overcommit=overcommit)
            self._boot(inst, self.image(inst.image_digest))
            self._start_main(inst)
        return inst

    def stop(self, ref: str, *, force: bool = False) -> str:
        """Stop the guest; returns what was done."""
        with self._locked(ref) as inst:
            st = self.status(inst)
            if st.state == "error" and force and not inst.problem and st.proc is None \
                    and inst.g.snapshot_latest.exists():
                shutil.rmtree(inst.g.snapshot_latest)  # asked for: never silently
                return "broken snapshot discarded"
            self._usable(inst, st)
            if st.state == "stopped":
                return "already stopped"
            if st.state == "standby":
                if not force:
                    raise WrongState(f"instance '{inst.name}' is in standby: 'stop --force' discards its snapshot")
                shutil.rmtree(inst.g.snapshot_latest)
                return "snapshot discarded"
            assert st.proc is not None
            hv = self.hypervisor(inst)
            from vmfork.guest import muxctl

            muxctl.end_execs(inst.g, "the instance was stopped")  # frees the agent channel too
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
        with self._locked(ref) as inst:
            st = self.status(inst)
            if st.proc is not None and not force:
                raise WrongState(f"instance '{inst.name}' is running: stop it first or use 'rm --force'")
            self._destroy(inst)
            if pool.slot_dirs(self.dd.guests):  # its warm pool goes with it
                from vmfork.pool import ops as pool_ops

                pool_ops.drain_of(self, inst.id)

    def _destroy(self, inst: Instance) -> None:
        """Remove the instance: renamed out of sight first (the commit point), then its VMM
        is stopped and its files deleted; recovery finishes a crashed removal."""
        from vmfork.guest import muxctl

        muxctl.end_execs(inst.g, "the instance was removed")
        trash = self.dd.guests / f".trash-{inst.id}"
        if inst.dir.exists():
            os.rename(inst.dir, trash)
            util.fsync_dir(self.dd.guests)
        crashpoint("rm:renamed")
        self._kill_vmm_of(GuestDir(trash))
        confine.release(self.dd.root, inst.id)
        if inst.network is not None or (self.dd.root / "network" / "leases" / f"{inst.id}.json").exists():
            from vmfork import network

            network.release(self.dd.root, inst.id)
        crashpoint("rm:vmm-stopped")
        shutil.rmtree(trash, ignore_errors=True)

    # --- exec -----------------------------------------------------------------------------
    def exec(self, ref: str, argv: list[str], *, stdin: bytes = b"", timeout: float | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None,
             max_output: int = MAX_BUFFERED_OUTPUT, in_image: bool = True,
             on_start: Callable[[Callable[[], None]], None] | None = None,
             on_stdin: Callable[[ExecStdin], None] | None = None, tty: bool = False,
             rows: int = 0, cols: int = 0) -> ExecResult:
        """Run a command in the guest. The instance lock is held only to start it (through
        the instance's exec mux, so execs run concurrently); standby, stop and rm end it
        with ExecAborted. Output without a callback is kept up to ``max_output`` bytes
        per stream (``ExecResult.stdout_dropped`` counts the rest). ``on_start`` gets, once
        the command runs, a function that aborts it from any thread (the mux kills it).

        With ``on_stdin`` the command's stdin stays open after ``stdin``: ``on_stdin`` gets,
        once it runs, its :class:`ExecStdin` (write, close, resize; usable from any thread
        while this call relays the output). ``tty`` (with ``on_stdin``) runs it on a PTY of
        ``rows`` x ``cols``; its stdout and stderr then both come to ``on_stdout``."""
        if not argv:
            raise InvalidArgument("no command given: use 'vmfork exec NAME -- CMD [ARGS...]'")
        with self._locked(ref) as inst:
            st = self.status(inst)
            self._usable(inst, st)
            if st.state != "running":
                hint = f": use 'vmfork restore {inst.name}'" if st.state == "standby" else f": use 'vmfork start {inst.name}'"
                raise WrongState(f"instance '{inst.name}' is {st.state}{hint}")
            assert st.proc is not None
            if (mark := read_mark(inst.g, st.proc)) is not None:
                raise WrongState(f"instance '{inst.name}' is {mark.describe()}")
            hv = self.hypervisor(inst)
            if inst.oci and in_image:  # inside the image root, with its Env, User, WorkingDir
                from vmfork.images import main as image_main

                argv, env, cwd = image_main.exec_argv(inst.oci["main"], argv, env, cwd), None, None
            from vmfork.guest import muxctl

            if tty and on_stdin is None:
                raise InvalidArgument("a tty exec needs its stdin open (on_stdin)")
            conn = muxctl.connect(inst.g, st.proc, lambda: hv.agent(inst.g, 5.0))
            try:
                req_id = conn.start_exec(argv, stdin=stdin, timeout=timeout, env=env, cwd=cwd,
                                         interactive=on_stdin is not None, tty=tty, rows=rows, cols=cols)
                if on_start is not None:
                    on_start(conn.abort)
                if on_stdin is not None:
                    on_stdin(conn.stdin_of(req_id))
            except BaseException:
                conn.close()
                raise
        with conn, self._explain_vmm_death(inst):
            try:
                return conn.wait_exec(req_id, argv, timeout=timeout, on_stdout=on_stdout,
                                      on_stderr=on_stderr, max_output=max_output)
            except AgentError as e:  # ExecAborted included: the VMM may have died under it
                cause = death_cause(inst.g) if not st.proc.alive() else None
                if cause:
                    raise HypervisorError(f"instance '{inst.name}' died: {cause}; "
                                          "it is stopped and its RAM is lost") from None
                if isinstance(e, ExecAborted):
                    raise ExecAborted(f"'{inst.name}': {argv[0]!r} did not finish: {e}") from None
                if on_stdin is not None and "unknown request type 'U'" in str(e):
                    raise AgentError(f"the guest agent of '{inst.name}' predates interactive exec "
                                     "(streamed stdin, tty): recreate the instance from a current "
                                     "image ('vmfork image build')") from None
                raise

    # --- standby / restore ----------------------------------------------------------------
    def standby(self, ref: str) -> dict[str, Any]:
        with self._locked(ref) as inst:
            return self._standby_locked(inst)

    def _standby_locked(self, inst: Instance) -> dict[str, Any]:
        st = self.status(inst)
        self._usable(inst, st)
        if st.state != "running":
            raise WrongState(f"instance '{inst.name}' is {st.state}: only a running instance can be put in standby")
        assert st.proc is not None
        g, hv = inst.g, self.hypervisor(inst)
        t_execs = time.monotonic()
        from vmfork.guest import muxctl

        muxctl.end_execs(g, "the instance was put in standby", wait_s=2.0)  # kills its commands
        t0 = time.monotonic()
        tmp = g.snapshot_tmp
        shutil.rmtree(tmp, ignore_errors=True)
        if g.snapshot_latest.exists():
            shutil.rmtree(g.snapshot_latest)  # stale: the VM ran since it was taken
        tmp.mkdir(parents=True)
        crashpoint("standby:begun")
        cfg = VMConfig.from_json(util.read_json(g.run / "config.json"))

        def state_written() -> None:  # the commit point: from here on a crash rolls forward
            util.atomic_write_json(tmp / "config.json", cfg.to_json() | {"taken_at": _now()}, durable=False)
            integrity.write_manifest(tmp, inst.memory_mib << 20)

        saved = hv.save(g, cfg, st.proc, tmp, state_written=state_written)
        crashpoint("standby:vmm-stopped")
        shutil.rmtree(g.snapshot_base, ignore_errors=True)  # merged into this snapshot, or superseded
        t_save = time.monotonic()
        if hv.capabilities.file_backed_memory:
            os.rename(g.memory, tmp / "memory")  # same inode: no copy
        crashpoint("standby:memory-moved")
        self._commit_snapshot(g)
        crashpoint("standby:committed")
        g.vmm_json.unlink(missing_ok=True)
        t_commit = time.monotonic()
        if saved.uncache_memory:  # clean now (fsynced), and mapped by no VMM
            util.drop_page_cache(g.snapshot_latest / "memory")
        t1 = time.monotonic()
        phases = {f"save_{k}": round(v, 4) for k, v in saved.phases.items()}
        return {"save_s": round(t_save - t0, 4), **phases, "fsync_s": round(t_commit - t_save, 4),
                "uncache_s": round(t1 - t_commit, 4), "total_s": round(t1 - t0, 4),
                "end_execs_s": round(t0 - t_execs, 4)}

    def _commit_snapshot(self, g: GuestDir) -> None:
        """Make .snapshot-tmp durable and rename it to snapshot-latest (the commit point)."""
        integrity.fsync_snapshot(g.snapshot_tmp, g.disk)  # memory: only the pages dirtied since the last one
        os.rename(g.snapshot_tmp, g.snapshot_latest)
        util.fsync_dir(g.snapshots)

    def _check_snapshot(self, inst: Instance, what: str) -> None:
        problem = integrity.problem(inst.g.snapshot_latest, inst.memory_mib << 20)
        if problem:
            raise WrongState(f"instance '{inst.name}' cannot be {what}: {problem} "
                             f"('vmfork rm {inst.name}' removes it)")

    def restore(self, ref: str, *, overcommit: bool = False) -> dict[str, Any]:
        with self._locked(ref) as inst:
            if self.status(inst).state == "standby":
                self._admit(f"'{inst.name}'", self.hypervisor(inst), [ram_claim(
                    inst.name, inst.memory_mib << 20, inst.g.snapshot_latest / "memory")], overcommit=overcommit)
            return self._restore_locked(inst)

    def resume(self, ref: str, *, overcommit: bool = False) -> str:
        """Resume a running guest that is paused (by the space watchdog, or left paused);
        returns what was done."""
        with self._locked(ref) as inst:
            st = self.status(inst)
            self._usable(inst, st)
            if st.proc is None:
                raise WrongState(f"instance '{inst.name}' is {st.state}: only a running instance can be resumed")
            hv = self.hypervisor(inst)
            self._admit(f"'{inst.name}'", hv, [ram_claim(inst.name, inst.memory_mib << 20, inst.g.memory)],
                        overcommit=overcommit, replacing=(inst.id,))
            resumed = hv.resume(inst.g, st.proc)
            clear_mark(inst.g)
            return "resumed" if resumed else "not paused"

    def _restore_locked(self, inst: Instance) -> dict[str, Any]:
        st = self.status(inst)
        self._usable(inst, st)
        if st.state != "standby":
            raise WrongState(f"instance '{inst.name}' is {st.state}: only an instance in standby can be restored")
        g, hv = inst.g, self.hypervisor(inst)
        t0 = time.monotonic()
        self._check_snapshot(inst, "restored")
        cfg = VMConfig.from_json(
            {k: v for k, v in util.read_json(g.snapshot_latest / "config.json").items() if k != "taken_at"}
        )
        hv.check_snapshot_compat(cfg, inst.name)
        cfg.id, cfg.cid, cfg.mac = inst.id, inst.cid, inst.mac  # a fork's own, not its source's
        image = self.image(cfg.image_digest)
        r = g.restoring
        shutil.rmtree(r, ignore_errors=True)
        os.rename(g.snapshot_latest, r)  # visible on disk: the snapshot is being consumed
        util.fsync_dir(g.snapshots)
        util.atomic_write_json(g.run / "config.json", cfg.to_json(), durable=False)
        crashpoint("restore:consuming")
        file_backed = hv.capabilities.file_backed_memory
        if file_backed:
            os.rename(r / "memory", g.memory)  # the guest RAM is this file while the VMM runs
        crashpoint("restore:memory-moved")
        self._confine(inst, image)
        t_net = time.monotonic()
        try:
            net_done = self._attach_network(inst, cfg)
        except BaseException:
            self._give_back(g, file_backed)
            raise
        net_s = time.monotonic() - t_net
        util.atomic_write_json(g.run / "config.json", cfg.to_json(), durable=False)
        resumed = False

        net_wait_s = 0.0

        def before_resume() -> None:  # the commit point: from here on the guest writes its RAM
            nonlocal resumed, net_wait_s
            t = time.monotonic()
            net_done()  # made while the VMM started and loaded; in place before the guest runs
            net_wait_s = time.monotonic() - t
            (r / RESUMED).touch()
            resumed = True

        t_prep = time.monotonic()
        try:
            shutil.rmtree(g.snapshot_base, ignore_errors=True)  # only this snapshot can become the base
            with self._explain_vmm_death(inst):
                restored = hv.restore(g, cfg, image, r, before_resume=before_resume)
            proc = restored.proc
        except BaseException:
            if not resumed or not hv.capabilities.restore_consumes_snapshot:
                self._give_back(g, file_backed)
            else:
                shutil.rmtree(r, ignore_errors=True)
            raise
        crashpoint("restore:resumed")
        t_vmm = time.monotonic()
        watchdog.ensure(self.dd.root)
        try:
            agent_phases = self._agent_ready(inst, hv, proc, RESTORE_TIMEOUT, "restore")
        except BaseException:
            if hv.capabilities.restore_consumes_snapshot:
                shutil.rmtree(r, ignore_errors=True)
            else:
                self._give_back(g, file_backed)  # never written to: still valid
            raise
        crashpoint("restore:ready")
        self._finish_restore(g, hv)
        t1 = time.monotonic()
        phases = {k: round(v, 4) for k, v in (restored.phases | agent_phases).items()}
        if inst.network is not None:  # what the network added to the restore's critical path:
            phases["network_s"] = round(net_s + net_wait_s, 4)  # made before the VMM started, and
            phases["network_wait_s"] = round(net_wait_s, 4)  # waited for before the guest resumed
        return {"prep_s": round(t_prep - t0, 4), **phases, "vmm_s": round(t_vmm - t0, 4),
                "agent_s": round(t1 - t_vmm, 4), "total_s": round(t1 - t0, 4)}

    def _give_back(self, g: GuestDir, file_backed: bool) -> None:
        """A restore that did not take: the snapshot is whole again, as snapshot-latest."""
        r = g.restoring
        (r / RESUMED).unlink(missing_ok=True)
        if file_backed and not (r / "memory").exists() and g.memory.exists():
            os.rename(g.memory, r / "memory")
        os.rename(r, g.snapshot_latest)
        util.fsync_dir(g.snapshots)

    def _finish_restore(self, g: GuestDir, hv: Hypervisor) -> None:
        """The restored guest runs: its snapshot was consumed (QEMU), or becomes the base the
        next Diff snapshot is merged into (Firecracker)."""
        if hv.capabilities.restore_consumes_snapshot:
            shutil.rmtree(g.restoring, ignore_errors=True)
        else:
            (g.restoring / RESUMED).unlink(missing_ok=True)
            shutil.rmtree(g.snapshot_base, ignore_errors=True)
            os.rename(g.restoring, g.snapshot_base)

    # --- fork -----------------------------------------------------------------------------
    def fork(self, src_ref: str, name: str, *, from_running: bool = False,
             target_state: str | None = None, overcommit: bool = False,
             publish: tuple[Any, ...] = ()) -> tuple[Instance, dict[str, Any]]:
        util.validate_name(name)
        if target_state not in (None, "running", "standby", "stopped"):
            raise InvalidArgument(f"invalid target state '{target_state}': use running, standby or stopped")
        src = self.find(src_ref)
        self._check_name_free(name)
        self._fork_network(src, publish)  # refused before any work
        timings: dict[str, Any] = {}
        t0 = time.monotonic()
        # The fork's lock is held from its clone until it is in its target state, so that
        # no recovery takes it for the leftover of a crash meanwhile. A fork to running
        # takes a ready slot of its source's warm pool if there is one (vmfork.pool): the
        # slot's lock is the fork's.
        with contextlib.ExitStack() as locked:
            slot = None
            if target_state == "running" and not publish and pool.slot_dirs(self.dd.guests):
                from vmfork.pool import ops as pool_ops

                slot = pool_ops.reserve(self, src, name, locked)
            iid = slot.iid if slot is not None else self._new_id()
            if slot is None:
                locked.enter_context(self._instance_lock(iid, name, timeout=0))
            if slot is not None:
                pooled = self._fork_from_slot(src, name, slot, overcommit, timings, t0)
                if pooled is not None:
                    return pooled
            return self._fork_locked(src, name, iid, from_running, target_state, overcommit, publish,
                                     timings, t0)
        raise AssertionError("unreachable")

    def _fork_from_slot(self, src: Instance, name: str, slot: pool.Slot, overcommit: bool,
                        timings: dict[str, Any], t0: float) -> tuple[Instance, dict[str, Any]] | None:
        """A fork to running made of a ready slot of its source's warm pool (its lock held).
        None if the slot does not fit the source as it is now: the slot is removed and the
        caller forks the usual way, under the same id and lock."""
        from vmfork.pool import ops as pool_ops

        with self._locked(src) as src:
            st = self.status(src)
            self._usable(src, st)
            if st.state != "standby":  # a running source (--from-running) gets a new snapshot
                pool_ops._discard(self, slot)
                return None
            self._check_snapshot(src, "forked")
            ram = src.memory_mib << 20
            self._admit(f"fork '{name}'", self.hypervisor(src), [Claim(name, ram, ram)], overcommit=overcommit,
                        replacing=(src.id,))
            timings["lookup_s"] = round(time.monotonic() - t0, 4)
            t_claim = time.monotonic()
            claimed = pool_ops.claim(self, src, slot, name)
            if claimed is None:
                return None
            fork, fd = claimed
            timings |= {"clone_s": round(time.monotonic() - t_claim, 4), "clone_method": "pool",
                        "pool_slot": slot.iid}
        try:
            crashpoint("fork:created")
            try:
                timings["fork_restore"] = self._restore_prestarted(fork, fd)
                crashpoint("fork:target-reached")
                self._set_metadata(fork, pending=None)
            except BaseException:
                self._destroy(fork)  # all or nothing, as any fork
                raise
        finally:
            os.close(fd)
        timings["total_s"] = round(time.monotonic() - t0, 4)
        if pool_ops.kept(self, src.id):  # off the fork's path: it runs already
            self.refill(functools.partial(pool_ops.refill, self, src.id))
        return fork, timings

    def _restore_prestarted(self, fork: Instance, state_fd: int) -> dict[str, Any]:
        """Bring a claimed slot's waiting VMM to running: load its source's device state."""
        g, hv = fork.g, self.hypervisor(fork)
        t0 = time.monotonic()
        proc = vmm_record(g)
        if proc is None:
            raise HypervisorError(f"'{fork.name}': the pre-started VMM of its pool slot is gone")
        with self._explain_vmm_death(fork):
            restored = hv.restore_prestarted(g, proc, state_fd)
        t_vmm = time.monotonic()
        watchdog.ensure(self.dd.root)
        agent_phases = self._agent_ready(fork, hv, proc, RESTORE_TIMEOUT, "restore")
        t1 = time.monotonic()
        phases = {k: round(v, 4) for k, v in (restored.phases | agent_phases).items()}
        return {"pool": True, **phases, "vmm_s": round(t_vmm - t0, 4), "agent_s": round(t1 - t_vmm, 4),
                "total_s": round(t1 - t0, 4)}

    def _fork_locked(self, src: Instance, name: str, iid: str, from_running: bool, target_state: str | None,
                     overcommit: bool, publish: tuple[Any, ...], timings: dict[str, Any],
                     t0: float) -> tuple[Instance, dict[str, Any]]:
        """``fork`` the usual way (clone, then restore), the fork's lock held."""
        with self._locked(src) as src:
            was_running = self._check_forkable(src, self.status(src), from_running)
            target = target_state or ("running" if was_running else "standby")
            ram = src.memory_mib << 20  # a running fork and a running source claim all their RAM
            claims = ([Claim(name, ram, ram)] if target == "running" else []) \
                + ([Claim(src.name, ram, ram)] if was_running else [])
            if claims:
                self._admit(f"fork '{name}'", self.hypervisor(src), claims, overcommit=overcommit,
                            replacing=(src.id,))
            if was_running:
                timings["source_standby"] = self._standby_locked(src)
                crashpoint("fork:source-standby")
            try:
                self._check_snapshot(src, "forked")
                timings["lookup_s"] = round(time.monotonic() - t0, 4)
                fork, stats, phases = self._clone(src, name, iid, None if target == "standby" else target,
                                                  publish=publish)
                timings["clone_s"] = round(stats.seconds, 4)
                timings["clone_method"] = stats.method
                timings |= {k: round(v, 4) for k, v in phases.items()}
            finally:
                if was_running:
                    timings["source_restore"] = self._restore_locked(src)
        crashpoint("fork:created")
        try:
            if fork.network is not None and target != "running":  # its own namespace and
                t_net = time.monotonic()  # address from its creation (running: by its restore)
                from vmfork import network

                network.ensure(self.dd.root, fork.id, network.NetSpec.from_json(fork.network), fork.uid)
                timings["network_s"] = round(time.monotonic() - t_net, 4)
            if target == "running":
                timings["fork_restore"] = self._restore_locked(fork)
            elif target == "stopped":
                shutil.rmtree(fork.g.snapshot_latest)
            crashpoint("fork:target-reached")
            if fork.pending:
                self._set_metadata(fork, pending=None)
        except BaseException:
            self._destroy(fork)  # all or nothing: a fork that cannot reach its state goes
            raise
        timings["total_s"] = round(time.monotonic() - t0, 4)
        return fork, timings

    def _check_forkable(self, src: Instance, st: Status, from_running: bool) -> bool:
        """Refuse a source that cannot be forked as asked; True if it is running."""
        self._usable(src, st)
        was_running = st.state == "running"
        if was_running and not from_running:
            raise WrongState(f"instance '{src.name}' is running: use 'fork --from-running' "
                             "(it is put in standby, forked, and both are restored)")
        if st.state == "stopped":
            raise WrongState(f"instance '{src.name}' is stopped: only a standby or running instance can be forked")
        return was_running

    def _clone(self, src: Instance, name: str, iid: str, pending: str | None,
               publish: tuple[Any, ...] = ()) -> tuple[Instance, CopyStats, dict[str, float]]:
        """Clone a standby source into new instance ``iid``, atomically (tmp dir + rename).

        Returns the fork, the copy stats and the seconds spent after the copy: writing the
        fork's metadata (``metadata_s``) and making the whole fork durable (``sync_s``).
        """
        tmp = self.dd.guests / f".tmp-{iid}"
        with self._global_lock():
            self._check_name_free(name)
            try:
                stats = clone_tree(src.dir, tmp, skip=_guest_skip)
                for d in (tmp, tmp / "logs"):  # not the source VMM's 0710 root:<its gid>: its own, later
                    if d.is_dir():
                        os.chmod(d, 0o700)
                snap = GuestDir(tmp).snapshot_latest
                if self.hypervisor(src).prepare_fork(GuestDir(self.dd.guests / iid), snap):
                    integrity.write_manifest(snap, src.memory_mib << 20)  # its own state now
                snapshot_ops.name_template(self.hypervisor(src), snap, lambda: ensure_template(
                    src.g.snapshot_latest / "memory", src.dir), src.memory_mib << 20)
                crashpoint("fork:cloned")
                t_meta = time.monotonic()
                fork = Instance(
                    id=iid, name=name, hypervisor=src.hypervisor, accel=src.accel,
                    memory_mib=src.memory_mib, vcpus=src.vcpus, image_digest=src.image_digest,
                    created_at=_now(), mac=new_mac(), cid=self._free_cid(), parent_id=src.id,
                    parent_name=src.name, identity_applied=False, pending=pending, dir=tmp,
                    limits=src.limits,  # resource limits, not credentials: the fork gets its own uid
                    network=self._fork_network(src, publish),
                    oci=src.oci,  # its image and main process (which runs on in the fork)
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

    # --- named snapshots (instances/snapshot_ops.py) ------------------------------------------
    def snapshot_create(self, ref: str, name: str) -> tuple[Any, dict[str, Any]]:
        return snapshot_ops.create(self, ref, name)

    def snapshot_fork(self, ref: str, name: str, **kw: Any) -> tuple[list[Instance], dict[str, Any]]:
        return snapshot_ops.fork_snapshot(self, ref, name, **kw)

    def fork_count(self, src_ref: str, name: str, **kw: Any) -> tuple[list[Instance], dict[str, Any]]:
        return snapshot_ops.fork_instance(self, src_ref, name, **kw)

    def rollback(self, ref: str, snapshot: str, *, overcommit: bool = False) -> tuple[Instance, dict[str, Any]]:
        return snapshot_ops.rollback(self, ref, snapshot, overcommit=overcommit)

    # --- views ----------------------------------------------------------------------------
    def _confinement(self, inst: Instance) -> dict[str, Any]:
        """The VMM's uid, its limits as asked, and its cgroup as it is (limits set, usage)."""
        limits = confine.default_limits(inst.memory_mib, inst.accel, **(inst.limits or {}))
        return {"confined": (inst.g.run / confine.PLAN).exists(), "uid": inst.uid, "gid": inst.uid,
                "limits": limits.to_json(), "cgroup": confine.usage(self.dd.root, inst.id)}

    def describe(self, inst: Instance, *, detail: bool = False) -> dict[str, Any]:
        """``ps``'s row (``view.row``, which ``vmfork ps --json`` prints without the CLI too);
        with ``detail``, ``inspect``'s view."""
        st = self.status(inst)
        state = st.state
        if detail and st.proc is not None and state == "running":
            qs = self.hypervisor(inst).status(inst.g, st.proc)
            state = "paused" if qs in ("paused", "prelaunch", "inmigrate", "postmigrate") else "running"
        d = view.row(self.dd.root, inst, st, state)
        state = d["state"]
        if detail and not inst.problem:
            from vmfork.fs import allocated_bytes

            snap = inst.g.snapshot_latest
            snapshot: dict[str, Any] | None = None
            if state in ("standby", "error") and (snap / "memory").is_file():
                snapshot = {
                    "dir": str(snap),
                    "memory_bytes": (snap / "memory").stat().st_size,
                    "memory_allocated_bytes": allocated_bytes(snap / "memory"),
                    "memory_inode": (snap / "memory").stat().st_ino,
                    "taken_at": _taken_at(snap),
                    "problem": integrity.problem(snap, inst.memory_mib << 20),
                }
            d |= {
                "parent_id": inst.parent_id, "mac": inst.mac, "vsock_cid": inst.cid,
                "image": inst.image_digest, "disk": str(inst.g.disk),
                "disk_allocated_bytes": allocated_bytes(inst.g.disk) if inst.g.disk.exists() else 0,
                "console_log": str(inst.g.console_log), "pending": inst.pending,
                "snapshot": snapshot, "confinement": self._confinement(inst),
            }
            if inst.oci:
                d |= {"image_ref": inst.oci.get("ref"), "image_oci_digest": inst.oci.get("digest"),
                      "main": self.main_state(inst)}
        return d


def _taken_at(snap: Path) -> str | None:
    try:
        v = json.loads((snap / "config.json").read_text()).get("taken_at")
    except (OSError, ValueError, AttributeError):
        return None
    return str(v) if v is not None else None
