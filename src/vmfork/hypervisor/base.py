"""The small interface every backend implements, with capability flags."""

from __future__ import annotations

import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmfork.errors import HypervisorError
from vmfork.layout import GuestDir
from vmfork.logfile import read_tail
from vmfork.paths import PRIVATE_FILE, PRIVATE_UMASK
from vmfork.procs import ProcRef, recorded
from vmfork.supervisor import start_supervised
from vmfork.util import atomic_write_json

if TYPE_CHECKING:  # annotations only: kept off the import path of read-only commands
    from vmfork.guest.agent import AgentClient
    from vmfork.images import Image


@dataclass(frozen=True)
class Capabilities:
    # True (QEMU): the guest RAM is the file ``memory`` in the guest dir while the VMM runs;
    # the manager moves it into a snapshot at standby (same inode, no copy) and back at restore.
    file_backed_memory: bool
    # True (QEMU, shared file-backed RAM): the restored VM writes its RAM into the snapshot's
    # mem-file, so the snapshot is gone once the guest runs. False (Firecracker, MAP_PRIVATE):
    # the manager keeps the restored snapshot as snapshots/snapshot-base, the base that the
    # next Diff snapshot is merged into.
    restore_consumes_snapshot: bool = True
    # True: ``snapshot_live`` takes a snapshot of a running guest and leaves it running.
    live_snapshot: bool = False
    # True (QEMU): a fork can run from its source's shared, read-only template mem-file
    # (``VMConfig.template``, see ``hypervisor.shared_ram``).
    shared_template: bool = False


@dataclass
class VMConfig:
    """Everything a VMM needs to start this guest; saved with every snapshot, restored identically."""

    hypervisor: str
    memory_mib: int
    vcpus: int
    accel: str
    image_digest: str
    cmdline: str
    vmm_version: str = ""
    id: str = ""  # the instance's id (names the VMM process); set anew for a fork
    cid: int = 0  # the guest's vsock context id (Firecracker)
    mac: str = ""  # the guest NIC's MAC address (none yet)
    # The guest NIC (vmfork.network): the TAP to attach it to ("" = no NIC) and the network
    # namespace the VMM runs in (it holds the TAP; the same TAP name in every namespace).
    tap: str = ""
    netns: str = ""
    # An OCI image guest: the image's read-only root filesystem (one more disk) and its digest
    oci_rootfs: str = ""
    oci_digest: str = ""
    # Written by the backend into a snapshot's config: the VMM's snapshot data format version
    # and the kind of snapshot (Firecracker: "Full" or "Diff").
    snapshot_version: str = ""
    snapshot_type: str = ""
    # A fork's snapshot: the immutable mem-file of its source it may run from (mapped
    # private, shared with the other forks of that source); its own ``memory`` is a clone of it.
    template: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VMConfig:
        """Read a saved config, those of earlier vmfork versions (an ``extra`` dict) too."""
        d = dict(d)
        extra = d.pop("extra", None) or {}
        legacy = {"id": extra.get("id"), "snapshot_version": extra.get("fc_snapshot_version"),
                  "snapshot_type": extra.get("fc_snapshot_type")}
        d |= {k: v for k, v in legacy.items() if v is not None and k not in d}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class SaveResult:
    """What ``Hypervisor.save`` did: seconds per phase (for timings and the bench)."""

    phases: dict[str, float] = field(default_factory=dict)
    # True: the mem-file's page cache is left in a shape that makes the next standby write
    # back more than the guest dirtied (a cold boot's large folios, ``QemuHypervisor.save``):
    # the manager drops it once the snapshot is durable.
    uncache_memory: bool = False


@dataclass
class RestoreResult:
    """The VMM running the restored guest, and seconds per phase of the restore."""

    proc: ProcRef
    phases: dict[str, float] = field(default_factory=dict)


Starter = Callable[..., "subprocess.Popen[bytes]"]


def spawn_vmm(g: GuestDir, argv: list[str], hypervisor: str, *, pass_fds: tuple[int, ...] = (),
              start: Starter | None = None, netns: str = "", ro_paths: tuple[str, ...] = ()) -> ProcRef:
    """Start a VMM detached (own session) in the guest dir, its output appended to
    ``logs/vmm.log``, and record it in ``run/vmm.json`` (pid + start time, and its
    supervisor: a shell that records how it ends in ``run/vmm-exit``, see ``supervisor``).

    ``start`` replaces ``subprocess.Popen`` (same arguments), e.g. to add a seccomp filter.
    With ``netns`` the VMM (and its supervisor) run in that network namespace (``/run/netns/``).
    ``ro_paths``: files and dirs a confined VMM sees read-only, at their paths (a shared template).
    """
    g.ensure_dirs()
    from vmfork.confine import starter  # the guest's confinement plan, if it has one

    confined = starter(g, hypervisor, argv[0], start, netns=netns, ro_paths=ro_paths)
    if confined is None and netns:
        from vmfork.confine.launch import join_netns

        start = join_netns(netns, start)
    start = confined or start
    with open(os.open(g.vmm_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE), "ab") as log:
        log.write(f"--- {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc, shell = start_supervised(argv, g.path, start=start, stdin=subprocess.DEVNULL, stderr=log,
                                           start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                           umask=PRIVATE_UMASK)  # the RAM file, console log, sockets
        except (OSError, subprocess.SubprocessError) as e:
            raise HypervisorError(f"cannot start {argv[0]}: {getattr(e, 'strerror', None) or e}"
                                  + (f" ({tail(g.vmm_log, 1)})" if isinstance(e, subprocess.SubprocessError) else "")) from None
    atomic_write_json(g.vmm_json, {"pid": proc.pid, "start": proc.start, "hypervisor": hypervisor,
                                   "supervisor": {"pid": shell.pid, "start": shell.start}}, durable=False)
    return proc


def vmm_record(g: GuestDir) -> ProcRef | None:
    """The VMM recorded for this guest, if it is still that process."""
    return recorded(g.vmm_json)


def tail(path: Path, lines: int = 8) -> str:
    """The last ``lines`` non-empty lines of a log, joined on one line, read from its end.

    Lines starting with ``--- `` are vmfork's own notes in ``vmm.log`` (the VMM's command
    line, watchdog events), not what the VMM said: they are left out.
    """
    raw = read_tail(path, lines + 16, max_bytes=64 << 10).decode(errors="replace")
    kept = [x for x in raw.splitlines() if x.strip() and not x.startswith("--- ")]
    return " | ".join(kept[-lines:])


class Hypervisor(ABC):
    name: str
    capabilities: Capabilities

    @abstractmethod
    def available(self) -> str | None:
        """None when usable here, else the reason it is not (e.g. binary missing)."""

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def kernel_cmdline(self, accel: str, hostname: str) -> str:
        """The guest kernel command line for a cold boot."""

    @abstractmethod
    def boot(self, g: GuestDir, cfg: VMConfig, image: Image) -> ProcRef:
        """Start a VMM that cold-boots the guest; return once the VMM answers its API."""

    @abstractmethod
    def save(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, *,
             state_written: Callable[[], None] | None = None) -> SaveResult:
        """Pause the guest, write its ``state`` (and its ``memory``, unless the guest RAM is
        the file ``g.memory`` -- ``capabilities.file_backed_memory``: the manager moves that
        one) into ``into``, call ``state_written`` once all the VMM writes is complete, then
        stop the VMM. A failure before ``state_written`` resumes the guest and raises."""

    @abstractmethod
    def restore(self, g: GuestDir, cfg: VMConfig, image: Image, snap: Path, *,
                before_resume: Callable[[], None] | None = None) -> RestoreResult:
        """Start a VMM on the snapshot in ``snap`` (with ``file_backed_memory`` its RAM is
        already at ``g.memory``), load it paused, call ``before_resume``, resume it."""

    def snapshot_live(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, *,
                      while_paused: Callable[[], None]) -> SaveResult:
        """Pause the running guest, write its ``state`` (and its ``memory``, unless
        ``file_backed_memory``) into ``into`` (a directory inside ``g``), call ``while_paused``
        (the manager clones the RAM file and the disk), resume the guest. The guest runs on
        afterwards, also on failure. ``phases["pause_s"]`` is how long it was paused."""
        raise HypervisorError(f"{self.name} cannot snapshot a running guest: put it in standby first")

    def prepare_fork(self, fork: GuestDir, snap: Path) -> bool:
        """Make the freshly cloned snapshot in ``snap`` (in the fork's dir ``fork``) the fork's
        own, before the fork is committed; True if a file of it was rewritten. Default: nothing
        to do (relative paths already name the fork's files)."""
        return False

    def prestart(self, g: GuestDir, cfg: VMConfig, image: Image) -> ProcRef:
        """Start the VMM of a restore ahead of it, waiting for its state (a warm pool's slot)."""
        raise HypervisorError(f"{self.name}: no warm pool for this backend")

    def restore_prestarted(self, g: GuestDir, proc: ProcRef, state_fd: int, *,
                           before_resume: Callable[[], None] | None = None) -> RestoreResult:
        """Load the state ``state_fd`` into the VMM ``prestart`` left waiting, and resume."""
        raise HypervisorError(f"{self.name}: no warm pool for this backend")

    @abstractmethod
    def quit(self, g: GuestDir, proc: ProcRef) -> None:
        """Stop the VMM now (no guest shutdown)."""

    @abstractmethod
    def agent(self, g: GuestDir, timeout: float) -> AgentClient:
        """Open one connection to the guest agent."""

    def check_snapshot_compat(self, cfg: VMConfig, name: str) -> None:
        """Refuse (WrongState) a snapshot this VMM version cannot restore. Default: same version."""
        from vmfork.errors import WrongState

        if cfg.vmm_version and cfg.vmm_version != self.version():
            raise WrongState(f"instance '{name}': its snapshot was written by {cfg.hypervisor} "
                             f"{cfg.vmm_version}, this is {self.version()}; restoring it is not supported")

    def readonly_template(self, vmm_version: str) -> bool:
        """True when the VMM that runs a guest of this snapshot version opens a shared
        template read-only (``shared_ram``: a confined VMM can then map it). Default: no."""
        return False

    @abstractmethod
    def resume(self, g: GuestDir, proc: ProcRef) -> bool:
        """Resume a paused guest (left paused by an interrupted standby); True if it was paused."""

    def status(self, g: GuestDir, proc: ProcRef) -> str:
        """Fine-grained VMM status (running/paused); default: running."""
        return "running"

    def vmm_log_tail(self, g: GuestDir) -> str:
        """The VMM's own last words (why it stopped), for an error message."""
        return tail(g.vmm_log, 3)
