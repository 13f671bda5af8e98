"""QEMU backend: one qemu-system-x86_64 process per running instance, driven over QMP.

Guest RAM is ``memory-backend-file,share=on`` on ``<guest>/memory``. Standby saves only the
device state (``xen-save-devices-state``) and moves the RAM file into the snapshot (same
inode, no copy); restore moves it back and resumes on it. Facts behind the choices:
shared/notes/qemu-on-these-machines.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork import confine
from vmfork.errors import HypervisorError
from vmfork.fs import has_shared_extents
from vmfork.guest.agent import AgentClient
from vmfork.hypervisor import qemu_bin, shared_ram
from vmfork.hypervisor.base import (
    Capabilities,
    Hypervisor,
    RestoreResult,
    SaveResult,
    Starter,
    VMConfig,
    spawn_vmm,
    tail,
)
from vmfork.hypervisor.thp import popen_without_ram_thp, ram_thp_kept
from vmfork.images import Image
from vmfork.layout import GuestDir, short_path
from vmfork.procs import ProcRef
from vmfork.supervisor import death_cause
from vmfork.util import crashpoint, drop_page_cache

if TYPE_CHECKING:
    from vmfork.hypervisor.qmp import QMP

@functools.cache
def host_tsc_khz() -> int:
    """The host TSC rate; under TCG the guest TSC runs at it (kernel needs tsc_early_khz)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    raise HypervisorError("cannot read the host CPU frequency from /proc/cpuinfo")


#: Kernel start-up work a microVM guest does without (cold boot to agent-ready, 256 MiB, TCG:
#: QEMU's CPU time 4.6 → 3.6 s with tsc=reliable, docs/bench): the crypto self-tests (the
#: largest initcall, ~0.9 s under TCG), the CTR-KDF self-test, kprobe-event and trace-enum
#: set-up, and kernel audit (nothing in the guest reads it). An unknown initcall is ignored.
BOOT_TRIM = ("cryptomgr.notests", "audit=0",
             "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace,trace_eval_init")


#: TCG's translated-code buffer (MiB). QEMU 7.2 reserves 1 GiB and touches what it fills:
#: 4 MiB in an idle fork, 18 MiB after a process-churning workload. A full buffer is flushed
#: and all code translated again, so a buffer below the working set thrashes: 200 rounds of
#: `ls; cat /proc/cpuinfo` in a 256 MiB guest took 82 s at 8 MiB and 147 s at 4 MiB against
#: 2-11 s at 16, 32 MiB and the default (md5sum of 64 MiB: no difference). So the default
#: stays QEMU's. VMFORK_TCG_TB_MIB overrides it (0: QEMU's default); docs/bench/README.md.
TCG_TB_MIB = 0


def tcg_tb_mib() -> int:
    v = os.environ.get("VMFORK_TCG_TB_MIB", "")
    return int(v) if v.isdigit() else TCG_TB_MIB


def boot_args(image: Image, cmdline: str) -> list[str]:
    """What only a cold boot needs: the kernel, initramfs and command line (fw_cfg).

    A restore leaves them out: the guest's kernel is in its RAM already (nothing reads
    fw_cfg after the boot), and QEMU would otherwise keep a private mapping of ``vmlinux`` in
    every fork for nothing (0.06-2.0 MiB PSS, what fault-around mapped of its page cache).
    """
    return ["-kernel", str(image.vmlinux), "-initrd", str(image.initramfs), "-append", cmdline]


class QemuHypervisor(Hypervisor):
    name = "qemu"
    capabilities = Capabilities(file_backed_memory=True, live_snapshot=True, shared_template=True)

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or qemu_bin.default_binary()  # new guests; see qemu_bin

    def available(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found (install Debian's qemu-system-x86: make setup)"
        return None

    def version(self) -> str:
        return qemu_bin.version(self.binary)

    def binary_for(self, cfg: VMConfig) -> str:
        """The QEMU that runs this guest: the one that wrote its snapshot (``vmm_version``)."""
        b = qemu_bin.for_version(self.binary, cfg.vmm_version)
        if b is None:
            raise HypervisorError(f"no installed QEMU is version {cfg.vmm_version} (this guest's snapshot); "
                                  f"{self.binary} is {self.version()}")
        return b

    def check_snapshot_compat(self, cfg: VMConfig, name: str) -> None:
        """Any installed QEMU of the snapshot's version restores it (``qemu_bin.for_version``)."""
        if qemu_bin.for_version(self.binary, cfg.vmm_version) is None:
            super().check_snapshot_compat(cfg, name)

    def readonly_template(self, vmm_version: str) -> bool:
        """True when a guest of this snapshot version runs on a QEMU that opens a shared
        template read-only (``memory-backend-file,readonly=on``): a confined VMM can map it."""
        b = qemu_bin.for_version(self.binary, vmm_version)
        return b is not None and qemu_bin.readonly_ram(b)

    def _template(self, cfg: VMConfig) -> Path | None:
        """The shared template this guest's VMM maps private, if it runs from one."""
        readonly = qemu_bin.readonly_ram(self.binary_for(cfg))
        return shared_ram.usable_template(cfg.template, cfg.memory_mib << 20, readonly=readonly)

    # --- command line -------------------------------------------------------------------
    def kernel_cmdline(self, accel: str, hostname: str) -> str:
        parts = ["console=ttyS0", "quiet", "panic=-1", *BOOT_TRIM, f"vmfork.hostname={hostname}"]
        if accel == "tcg":
            # tsc=reliable: under TCG the guest TSC is the host's, but on a loaded host the
            # clocksource watchdog saw it skew against late jiffies and switched to jiffies
            parts[1:1] = [f"tsc_early_khz={host_tsc_khz()}", "tsc=reliable"]
        return " ".join(parts)

    def argv(self, cfg: VMConfig, image: Image, *, incoming: bool = False,
             qmp_fd: int | None = None, agent_fd: int | None = None) -> list[str]:
        """The QEMU command line; all instance paths are relative to the guest dir (cwd).

        With ``qmp_fd`` QMP listens on that inherited, already listening socket (bound to
        ``run/qmp.sock`` by us) instead of creating ``run/qmp.sock`` itself; ``agent_fd``
        likewise for ``run/agent.sock`` (a confined QEMU cannot create files in ``run/``).
        """
        mem = f"{cfg.memory_mib}M"
        binary = self.binary_for(cfg)
        readonly = qemu_bin.readonly_ram(binary)
        template = self._template(cfg)
        # A fork maps its source's template private (its writes are its own); else its own
        # file. A QEMU that can opens the template read-only (a confined VMM may not write it).
        backing = (f"mem-path={template},share=off" + (",readonly=on,rom=off" if readonly else "")
                   if template else "mem-path=memory,share=on")
        qmp = (["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
               if qmp_fd is not None else ["-qmp", "unix:run/qmp.sock,server=on,wait=off"])
        args = [
            binary, *qemu_bin.data_args(binary),
            "-name", f"vmfork-{cfg.id or 'probe'},debug-threads=on",
            "-accel", cfg.accel + (f",tb-size={tcg_tb_mib()}" if cfg.accel == "tcg" and tcg_tb_mib() else ""),
            *(["-cpu", "host"] if cfg.accel == "kvm" else []),
            "-no-user-config", "-nodefaults", "-display", "none", "-no-reboot",
            "-smp", str(cfg.vcpus), "-m", mem,
            "-object", f"memory-backend-file,id=mem,size={mem},{backing}",
            "-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,memory-backend=mem"
                  + (",acpi=off" if image.manifest.get("kernel") == "source" else ""),
            *(boot_args(image, cfg.cmdline) if not incoming else []),
            "-chardev", "file,id=con,path=logs/console.log,append=on", "-serial", "chardev:con",
            "-device", "virtio-rng-device",  # no RDRAND under TCG: getrandom() would block at boot
            "-device", "virtio-serial-device",
            "-chardev", (f"socket,id=agent,fd={agent_fd},server=on,wait=off" if agent_fd is not None
                         else "socket,id=agent,path=run/agent.sock,server=on,wait=off"),
            "-device", "virtserialport,chardev=agent,name=agent",
            *qmp,
            "-drive", f"file={image.rootfs},format=raw,if=none,id=root,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-drive", "file=disk.raw,format=raw,if=none,id=data,discard=unmap",
            "-device", "virtio-blk-device,drive=data",
        ]
        if cfg.tap:  # the TAP is in the namespace QEMU runs in (vmfork.network)
            args += ["-netdev", f"tap,id=net0,ifname={cfg.tap},script=no,downscript=no",
                     "-device", f"virtio-net-device,netdev=net0,mac={cfg.mac}"]
        if cfg.oci_rootfs:  # an OCI image's root filesystem, shared read-only by its instances
            args += ["-drive", f"file={cfg.oci_rootfs},format=raw,if=none,id=image,readonly=on",
                     "-device", "virtio-blk-device,drive=image"]
        if incoming:  # paused after the load (-S), until 'cont'
            args += ["-S", "-incoming", "defer"]
            if cfg.snapshot_type == shared_ram.DEVICES:  # xen-save-devices-state writes no configuration
                args += ["-global", "migration.send-configuration=off"]
        return args

    # --- process ------------------------------------------------------------------------
    def _spawn(self, g: GuestDir, cfg: VMConfig, image: Image, *, incoming: bool = False) -> ProcRef:
        """Start QEMU in the guest dir.

        We bind and listen on ``run/qmp.sock`` ourselves and hand QEMU the socket: our QMP
        client connects at once and is woken by QEMU's greeting, instead of polling for the
        socket file (the polling cost 5-15 ms per restore). QEMU is started without
        huge-page advice on its RAM file (see ``thp``).
        """
        g.ensure_dirs()
        for sock in ("qmp.sock", "agent.sock"):
            (g.run / sock).unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(short_path(g.run / "qmp.sock"))
            listener.listen(16)
            agent.bind(short_path(g.run / "agent.sock"))
            agent.listen(1)
            argv = self.argv(cfg, image, incoming=incoming, qmp_fd=listener.fileno(), agent_fd=agent.fileno())
            argv += confine.qemu_sandbox_args(g)
            # what a confined VMM must see besides its guest dir and image: the template it
            # maps (read-only), the firmware dir of a QEMU outside /usr
            template, data = self._template(cfg), qemu_bin.data_dir(argv[0])
            ro_paths = tuple(str(p) for p in (template, data) if p)
            start: Starter | None = None
            if not ram_thp_kept():
                def start(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
                    p, problem = popen_without_ram_thp(argv, cfg.memory_mib << 20, **kw)
                    if problem:
                        kw["stderr"].write(f"--- vmfork: guest RAM keeps QEMU's huge-page advice: {problem}\n".encode())
                    return p
            proc = spawn_vmm(g, argv, self.name, pass_fds=(listener.fileno(), agent.fileno()), start=start,
                             netns=cfg.netns, ro_paths=ro_paths)
        finally:
            listener.close()  # QEMU holds the only copy now: if it dies, our connect fails
            agent.close()
        return proc

    def _qmp(self, g: GuestDir, proc: ProcRef, timeout: float = 10.0) -> QMP:
        # Imported here: asyncio + qemu.qmp cost ~19 ms of start-up to every command that
        # never talks to QEMU (fork to standby, ps, exec, ...).
        from vmfork.hypervisor.qmp import QMP

        return QMP.connect(
            g.run / "qmp.sock", timeout=timeout, alive=proc.alive, on_dead=lambda: _why_dead(g)
        )

    def _fail(self, g: GuestDir, proc: ProcRef, what: str, err: Exception) -> HypervisorError:
        proc.kill()
        detail = _why_dead(g)
        return HypervisorError(f"{what}: {err}" + (f" (QEMU: {detail})" if detail and detail not in str(err) else ""))

    def boot(self, g: GuestDir, cfg: VMConfig, image: Image) -> ProcRef:
        g.memory.unlink(missing_ok=True)  # a cold boot gets fresh RAM (and drops any old clone)
        proc = self._spawn(g, cfg, image)
        try:
            with self._qmp(g, proc) as q:
                q.execute("query-status")
        except HypervisorError as e:
            raise self._fail(g, proc, "QEMU did not start", e) from None
        return proc

    def save(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, *,
             state_written: Callable[[], None] | None = None) -> SaveResult:
        t0 = time.monotonic()
        # A VMM that did not start from a device-state snapshot (a cold boot, or a restore of
        # a snapshot of an earlier vmfork) filled the page cache of its mem-file with large
        # folios: QEMU loading the kernel and the boot's first touches of the sparse file ramp
        # the mmap readahead's folio order up. Writeback is per folio, so each 4 KiB page the
        # restored guest then dirties would cost its whole folio at every later standby (1 MiB
        # dirtied: ~14 MiB written back). Dropped once, after this standby, the restored guest
        # faults its pages in as 4 KiB folios and later standbys write back about what it
        # dirtied (~4.6 MiB for 1 MiB: the guest kernel and agent dirty some too); the
        # restore after that reads them from disk instead of the page cache. With QEMU's
        # huge-page advice kept (VMFORK_QEMU_THP=1) the restore makes large folios anyway.
        uncache = cfg.snapshot_type != shared_ram.DEVICES and not cfg.template and not ram_thp_kept()
        fd = os.open(into / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with self._qmp(g, proc) as q:
                t_qmp = time.monotonic()
                q.execute("stop")
                self._save_state(q, g, cfg, proc, into, fd)
                t_state = time.monotonic()
                crashpoint("standby:state-written")
                if state_written is not None:
                    state_written()  # from here on, a crash rolls the standby forward
                crashpoint("standby:marked")
                q.quit()
        except HypervisorError as e:
            # The guest is paused or still running; leave it running rather than lose it.
            try:
                with self._qmp(g, proc, timeout=2) as q:
                    q.execute("cont")
            except HypervisorError:
                pass
            raise HypervisorError(f"standby failed, guest left running: {e}") from None
        finally:
            os.close(fd)
        t_quit = time.monotonic()
        if not proc.wait_exit(10):
            proc.kill()
        t1 = time.monotonic()
        return SaveResult({"qmp_s": t_qmp - t0, "state_s": t_state - t_qmp, "quit_s": t_quit - t_state,
                           "exit_s": t1 - t_quit}, uncache_memory=uncache)

    def _save_state(self, q: QMP, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, fd: int) -> None:
        """Write the stopped guest's ``state`` into ``into`` (``fd`` is ``into/state``): the
        device state alone, with ``xen-save-devices-state`` (one QMP command, no RAM section).

        The RAM needs no stream: a guest on its own mem-file (``share=on``) has it in that file
        already, and a fork running from a template (``shared_ram``) has its own pages written
        first into its own clone ``g.memory``, which is then its whole RAM. A migration to an
        fd (what this was before) walked the RAM blocks to skip them (``x-ignore-shared``) and
        took ~11 ms of QMP round trips and polling against ~3 ms for this one command.
        The snapshot's config says so (``cfg.snapshot_type`` = ``DEVICES``, ``cfg.template``
        cleared): its restore runs with ``migration.send-configuration=off`` (this stream has
        no configuration section). The file is passed by fd (an fd set): a confined VMM
        cannot create a file in snapshots/ (nor see the path). ``cfg`` is the one the VMM was
        started with.
        """
        size = cfg.memory_mib << 20
        m = shared_ram.mapping_of(proc.pid, Path(cfg.template), size) if cfg.template else None
        if m is not None:
            ram = shared_ram.PrivateRam(proc.pid, m.start, shared_ram.private_pages(proc.pid, m.start, size))
            shared_ram.write_private(ram, g.memory, m)
        elif cfg.template:  # named, but not found mapped: the VMM must run on its own file
            shared_ram.check_ram_not_private(proc.pid, size)
        fdset = q.add_fd(fd)
        try:
            q.execute("xen-save-devices-state", {"filename": f"/dev/fdset/{fdset}", "live": False})
        finally:
            q.execute("remove-fd", {"fdset-id": fdset})
        cfg.template, cfg.snapshot_type = "", shared_ram.DEVICES

    def snapshot_live(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, *,
                      while_paused: Callable[[], None]) -> SaveResult:
        """Standby's migration of the device state, then the manager's clone of the RAM file
        (the vCPUs are stopped: it is consistent) and ``cont`` instead of ``quit``."""
        t0 = time.monotonic()
        fd = os.open(into / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with self._qmp(g, proc) as q:
                was_running = q.execute("query-status").get("status") == "running"
                t_stop = time.monotonic()
                q.execute("stop")
                try:
                    self._save_state(q, g, cfg, proc, into, fd)
                    t_state = time.monotonic()
                    crashpoint("snapshot:state-written")
                    while_paused()
                    t_clone = time.monotonic()
                finally:
                    if was_running:  # postmigrate -> running; a guest paused before stays paused
                        q.execute("cont")
                t_cont = time.monotonic()
        except HypervisorError as e:
            with contextlib.suppress(HypervisorError), self._qmp(g, proc, timeout=2) as q2:
                if q2.execute("query-status").get("status") in ("paused", "postmigrate"):
                    q2.execute("cont")
            raise HypervisorError(f"snapshot failed, guest left running: {e}") from None
        finally:
            os.close(fd)
        return SaveResult({"qmp_s": t_stop - t0, "state_s": t_state - t_stop, "clone_s": t_clone - t_state,
                           "cont_s": t_cont - t_clone, "pause_s": t_cont - t_stop})

    def restore(self, g: GuestDir, cfg: VMConfig, image: Image, snap: Path, *,
                before_resume: Callable[[], None] | None = None) -> RestoreResult:
        t0 = time.monotonic()
        _uncache_if_shared(g.memory)
        fd = os.open(snap / "state", os.O_RDONLY | os.O_CLOEXEC)
        try:
            proc = self._spawn(g, cfg, image, incoming=True)
            t_spawn = time.monotonic()
            try:
                with self._qmp(g, proc) as q:
                    t_qmp = time.monotonic()
                    q.set_migration_capabilities()
                    if cfg.tap:
                        # No self-announce after the load: each instance's TAP is its own, in its own
                        # namespace, with the same guest MAC (nothing to re-learn), and the guest
                        # answering it (virtio-net GUEST_ANNOUNCE) delayed its agent by ~40 ms under TCG.
                        q.execute("migrate-set-parameters", {"announce-rounds": 0})
                    q.pass_fd(fd, "vmfork-state")
                    q.execute("migrate-incoming", {"uri": "fd:vmfork-state"})
                    q.wait_migration()  # loaded; -S keeps the guest paused until 'cont'
                    t_load = time.monotonic()
                    crashpoint("restore:loaded")
                    if before_resume is not None:
                        before_resume()  # from here on the guest runs on (and writes) its RAM file
                    q.execute("cont")
                    t_cont = time.monotonic()
                phases = {"spawn_s": t_spawn - t0, "qmp_s": t_qmp - t_spawn,
                          "load_s": t_load - t_qmp, "resume_s": t_cont - t_load}
            except HypervisorError as e:
                raise self._fail(g, proc, "restore failed", e) from None
        finally:
            os.close(fd)
        return RestoreResult(proc, phases)

    # --- a warm pool (vmfork.pool): restore split at the spawn -------------------------------
    def prestart(self, g: GuestDir, cfg: VMConfig, image: Image) -> ProcRef:
        """Start the VMM of a restore ahead of it, on the guest's own files (its mem-file and
        disk already in place), and leave it waiting for the state (``-incoming defer``),
        migration capabilities set. ``restore_prestarted`` completes it."""
        _uncache_if_shared(g.memory)
        proc = self._spawn(g, cfg, image, incoming=True)
        try:
            with self._qmp(g, proc) as q:
                status = q.execute("query-status").get("status")
                if status != "inmigrate":
                    raise HypervisorError(f"the pre-started QEMU is '{status}', not waiting for a state")
                q.set_migration_capabilities()
                if cfg.tap:  # as restore: no self-announce
                    q.execute("migrate-set-parameters", {"announce-rounds": 0})
        except HypervisorError as e:
            raise self._fail(g, proc, "pre-starting QEMU failed", e) from None
        return proc

    def restore_prestarted(self, g: GuestDir, proc: ProcRef, state_fd: int, *,
                           before_resume: Callable[[], None] | None = None) -> RestoreResult:
        """Load the device state ``state_fd`` into the VMM ``prestart`` left waiting, resume."""
        t0 = time.monotonic()
        try:
            with self._qmp(g, proc) as q:
                t_qmp = time.monotonic()
                q.pass_fd(state_fd, "vmfork-state")
                q.execute("migrate-incoming", {"uri": "fd:vmfork-state"})
                q.wait_migration()
                t_load = time.monotonic()
                crashpoint("pool:loaded")
                if before_resume is not None:
                    before_resume()
                q.execute("cont")
                t_cont = time.monotonic()
        except HypervisorError as e:
            raise self._fail(g, proc, "restore failed", e) from None
        return RestoreResult(proc, {"qmp_s": t_qmp - t0, "load_s": t_load - t_qmp, "resume_s": t_cont - t_load})

    def quit(self, g: GuestDir, proc: ProcRef) -> None:
        if not proc.alive():
            return
        try:
            with self._qmp(g, proc, timeout=2) as q:
                q.quit()
        except HypervisorError:
            pass
        if not proc.wait_exit(5):
            proc.kill()

    def resume(self, g: GuestDir, proc: ProcRef) -> bool:
        with self._qmp(g, proc, timeout=2) as q:
            # paused: stopped by a standby that went no further; postmigrate: its state was
            # written (the block devices are handed back by 'cont'). Never 'inmigrate'.
            if q.execute("query-status").get("status") not in ("paused", "postmigrate"):
                return False
            q.execute("cont")
            return True

    def agent(self, g: GuestDir, timeout: float) -> AgentClient:
        return AgentClient.connect_unix(g.run / "agent.sock", timeout)

    def status(self, g: GuestDir, proc: ProcRef) -> str:
        try:
            with self._qmp(g, proc, timeout=2) as q:
                st = q.execute("query-status")
            return str(st.get("status", "running"))
        except HypervisorError:
            return "running"


def _why_dead(g: GuestDir) -> str:
    """How QEMU ended (if it died of something) and its last words."""
    return "; ".join(x for x in (death_cause(g), tail(g.vmm_log, 3)) if x)


def _uncache_if_shared(memory: Path) -> None:
    """Drop the page cache of a mem-file that shares extents with another (a fork or a
    forked source), so that the guest's first touches fill it with 4 KiB folios.

    Without QEMU's huge-page advice the kernel faults guest RAM in as small folios, but a
    page cache filled another way keeps its large folios: the boot-time faults on a fresh
    sparse file, or anyone reading the file (a checksum, a backup). Writeback is per folio,
    so a 4 KiB write by the guest into a 2 MiB folio copies 2 MiB on write (measured: a
    fork generation cost 39 MiB instead of 2 MiB after its mem-file had been read). A fresh
    fork's page cache is empty anyway; what this costs is a cold restore of a source that
    has forks (its pages are read from disk again: 101 instead of 55 ms for a 256 MiB guest
    here, docs/bench).
    """
    if has_shared_extents(memory):
        drop_page_cache(memory)
