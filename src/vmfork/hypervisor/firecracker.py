"""Firecracker backend: one ``firecracker --api-sock run/fc.sock`` process per running instance.

Speaks Firecracker 1.12 to 1.16: each VMM process is asked ``GET /version`` once, and sent
the request shapes its version takes (``firecracker_api.Dialect``; the tests validate every
request against the v1.12.1 and v1.16.1 API descriptions). Run against the real v1.12.1
binary here; see the README's Firecracker section for what is and is not verified.

The binary: ``--firecracker-bin`` / ``VMFORK_FIRECRACKER_BIN``, else the project's tools dir
(``.tools/bin/firecracker``, installed by ``make setup``), else ``firecracker`` on PATH.

Files, all relative to the guest dir, which is the VMM's working directory::

    run/fc.sock         API socket            run/vsock.sock   hybrid vsock (agent, port 52)
    logs/vmm.log        stdout/stderr         logs/console.log serial console (PUT /serial, v1.14+;
    disk.raw            data drive                             before v1.14 it is in logs/vmm.log)
    run/fc-base.json    what the running VM was restored from

Guest RAM is anonymous (boot) or a MAP_PRIVATE mapping of the snapshot's mem-file (restore),
so there is no RAM file to move: standby writes ``memory`` + ``state`` with
``PUT /snapshot/create``. The first standby after a cold boot is ``Full``. After a restore the
manager keeps the snapshot the VM came from as ``snapshots/snapshot-base``; the next standby
moves its mem-file into the new snapshot and lets Firecracker write only the pages dirtied
since the restore into it (``Diff``: Firecracker merges into an existing mem-file of the
guest's size), which gives a complete mem-file for the cost of the dirty pages. A mem-file is
never diff-written while it has another link or another process maps it: it is unshared first
(reflink or sparse copy, renamed over).

Fork identity. The state file embeds the paths the VM was configured with: the drives'
``path_on_host`` and the vsock ``uds_path``. vmfork configures them relative to the guest dir
(``disk.raw``, ``run/vsock.sock``), so the state names no instance at all and a fork's VMM,
running in the fork's dir, opens the fork's own disk and binds the fork's own socket; the
source is never touched. Firecracker documents that restored resources must be reachable "at
the same relative paths" by the new process. The read-only rootfs, kernel and initrd are
absolute paths into the shared, content-addressed image dir, the same for every fork. On top
of that, every restore passes ``vsock_override`` where it exists (v1.16+; the only device
override besides ``network_overrides``, which is not needed until vmfork has networking).
Before v1.16 the fallback is the relative ``uds_path`` itself: the VMM binds it in its own
working directory, the fork's dir; the restore checks afterwards that the socket is there
(and the VMM-level test proves, with SO_PEERCRED, that the fork's VMM is the one listening on
it). Diff snapshots of guests over 3 GiB are not taken before v1.15 (Firecracker wrote them
corrupt, #5705): such a standby writes a Full snapshot instead. Should a state
nevertheless name another instance's dir by absolute path (written by something else, or by a
future change), restore rewrites ``guests/<other id>/`` to ``guests/<own id>/`` (ids have one
length) in a private copy of the state, checksum verified before and after (fc_vmstate.py).
The guest CID is not in any override; with hybrid vsock it is private to each VMM (no host
vhost-vsock namespace), so forks sharing their source's CID cannot collide.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from vmfork import retry
from vmfork.errors import HypervisorError, VmforkError, WrongState
from vmfork.guest.agent import AgentClient
from vmfork.hypervisor import fc_vmstate
from vmfork.hypervisor.base import (
    Capabilities,
    Hypervisor,
    RestoreResult,
    SaveResult,
    VMConfig,
    spawn_vmm,
)
from vmfork.hypervisor.firecracker_api import (
    CONFIG_TIMEOUT,
    SUPPORTED,
    Dialect,
    FirecrackerAPI,
    FirecrackerUnreachable,
    dialect_for,
)
from vmfork.images import Image
from vmfork.layout import GuestDir, short_path
from vmfork.procs import ProcRef
from vmfork.util import ID_LEN, atomic_write_json

BINARY = "firecracker"
ENV_BINARY = "VMFORK_FIRECRACKER_BIN"
API_SOCK = "run/fc.sock"
VSOCK_UDS = "run/vsock.sock"
CONSOLE = "logs/console.log"
DATA_DISK = "disk.raw"
BASE_RECORD = "fc-base.json"  # in run/
AGENT_PORT = 52  # the guest agent's AF_VSOCK port (agent.c: vmfork.agent_port, default 52)
API_READY_TIMEOUT = 10.0
# The project's tools dir (make setup installs the pinned Firecracker there): <repo>/.tools/bin
TOOLS_BIN = Path(__file__).resolve().parents[3] / ".tools" / "bin"


def find_binary(requested: str | None = None) -> tuple[str, str]:
    """(the binary to run, where it came from): explicit > env > tools dir > PATH."""
    if requested:
        return requested, "--firecracker-bin"
    env = os.environ.get(ENV_BINARY)
    if env:
        return env, ENV_BINARY
    tools = TOOLS_BIN / BINARY
    if os.access(tools, os.X_OK):
        return str(tools), "the project's tools dir"
    return BINARY, "PATH"


class FirecrackerHypervisor(Hypervisor):
    name = "firecracker"
    capabilities = Capabilities(file_backed_memory=False, restore_consumes_snapshot=False, live_snapshot=True)

    def __init__(self, binary: str | None = None) -> None:
        self.requested, self.source = find_binary(binary)
        found = shutil.which(self.requested)
        # The VMM runs in the guest dir: a relative binary path must be made absolute here.
        self.binary = os.path.abspath(found) if found else self.requested
        self._dialects: dict[tuple[int, int], Dialect] = {}  # per VMM process (pid, start)

    def available(self) -> str | None:
        if shutil.which(self.requested) is None:
            return (f"{self.requested} ({self.source}) not found or not executable: run 'make setup' "
                    f"(installs Firecracker into {TOOLS_BIN}), or point --firecracker-bin or "
                    f"{ENV_BINARY} at a Firecracker {SUPPORTED}")
        try:
            dialect_for(self.version())
        except HypervisorError as e:
            return f"{self.binary}: {e}"
        return None

    def version(self) -> str:
        return _fc_version(self.binary)

    def dialect(self) -> Dialect:
        """The dialect of this binary (from ``--version``); refuses one outside the range."""
        return dialect_for(self.version())

    def snapshot_version(self) -> str:
        """The snapshot data format version this binary writes (``firecracker --snapshot-version``)."""
        return _fc_snapshot_version(self.binary)

    def kernel_cmdline(self, accel: str, hostname: str) -> str:
        return " ".join(["console=ttyS0", "reboot=k", "panic=1", "pci=off", "quiet",
                         f"vmfork.hostname={hostname}", f"vmfork.agent_port={AGENT_PORT}"])

    def check_snapshot_compat(self, cfg: VMConfig, name: str) -> None:
        """Refuse what Firecracker refuses: another major snapshot format, or a newer minor one."""
        written = cfg.snapshot_version
        if not written:  # not recorded: fall back to "same Firecracker version"
            super().check_snapshot_compat(cfg, name)
            return
        ours = self.snapshot_version()
        w, o = _semver(written), _semver(ours)
        by = f"Firecracker {cfg.vmm_version}" if cfg.vmm_version else "Firecracker"
        if w is None or o is None:
            raise WrongState(f"instance '{name}': cannot compare snapshot format versions "
                             f"'{written}' ({by}) and '{ours}' (Firecracker {self.version()})")
        if w[0] != o[0]:
            raise WrongState(
                f"instance '{name}': its snapshot was written by {by} in snapshot format v{written}; "
                f"this Firecracker {self.version()} reads format v{ours}, and a different major "
                "format version cannot be restored"
            )
        if w[1] > o[1]:
            raise WrongState(
                f"instance '{name}': its snapshot was written by {by} in snapshot format v{written}, "
                f"newer than the v{ours} this Firecracker {self.version()} reads; use that Firecracker "
                "or a newer one to restore it"
            )

    # --- process and API ------------------------------------------------------------------
    def _spawn(self, g: GuestDir, cfg: VMConfig) -> ProcRef:
        g.ensure_dirs()
        for rel in (API_SOCK, VSOCK_UDS):
            (g.path / rel).unlink(missing_ok=True)
        argv = [self.binary, "--api-sock", API_SOCK, "--id", f"vmfork-{cfg.id or 'probe'}"]
        proc = spawn_vmm(g, argv, self.name, netns=cfg.netns)
        return proc

    def _api(self, g: GuestDir, timeout: float = CONFIG_TIMEOUT) -> FirecrackerAPI:
        return FirecrackerAPI(short_path(g.path / API_SOCK), timeout)

    def _api_ready(self, g: GuestDir, proc: ProcRef, timeout: float = API_READY_TIMEOUT) -> FirecrackerAPI:
        """A client once ``GET /`` answers; polls with a short backoff, fails fast if the VMM died."""
        api = self._api(g)
        last: Exception | None = None
        for _ in retry.attempts(timeout):
            if not proc.alive():
                api.close()
                detail = self.vmm_log_tail(g)
                raise HypervisorError("Firecracker exited before its API socket answered"
                                      + (f": {detail}" if detail else ""))
            try:
                api.describe_instance()
            except FirecrackerUnreachable as e:
                last = e
                continue
            try:  # once per VMM process: the request shapes of its version
                self._dialects[(proc.pid, proc.start)] = api.negotiate()
            except HypervisorError:
                api.close()
                raise
            return api
        api.close()
        raise HypervisorError(f"Firecracker's API socket did not answer within {timeout:.0f}s: {last}")

    def _api_of(self, g: GuestDir, proc: ProcRef, timeout: float = CONFIG_TIMEOUT) -> FirecrackerAPI:
        """A client of a running VMM, with the dialect it told (asked once per process)."""
        api = self._api(g, timeout)
        api.dialect = self._dialects.get((proc.pid, proc.start))
        if api.dialect is None:
            try:
                self._dialects[(proc.pid, proc.start)] = api.negotiate()
            except HypervisorError:
                api.close()
                raise
        return api

    def _fail(self, g: GuestDir, proc: ProcRef, what: str, err: Exception) -> HypervisorError:
        proc.kill()
        detail = self.vmm_log_tail(g)
        return HypervisorError(f"{what}: {err}" + (f" (Firecracker: {detail})" if detail and detail not in str(err) else ""))

    def vmm_log_tail(self, g: GuestDir, lines: int = 4) -> str:
        """The last error lines of the last Firecracker process in ``logs/vmm.log``."""
        return vmm_error_lines(g.vmm_log, lines)

    def _cid(self, g: GuestDir) -> int:
        try:
            return int(json.loads(g.metadata.read_text())["cid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HypervisorError(f"cannot read the vsock CID from {g.metadata}: {e}") from None

    # --- lifecycle ------------------------------------------------------------------------
    def boot(self, g: GuestDir, cfg: VMConfig, image: Image) -> ProcRef:
        _forget_base(g)  # a cold boot has no base for a Diff snapshot
        cid = cfg.cid or self._cid(g)
        proc = self._spawn(g, cfg)
        try:
            with self._api_ready(g, proc) as api:
                if api.known_dialect().serial_endpoint:  # before v1.14: the console goes to stdout (vmm.log)
                    api.put_serial(serial_out_path=CONSOLE)
                api.put_boot_source(_abs(image.vmlinux), initrd_path=_abs(image.initramfs), boot_args=cfg.cmdline)
                api.put_machine_config(vcpu_count=cfg.vcpus, mem_size_mib=cfg.memory_mib, track_dirty_pages=True)
                # The guest finds its disks by filesystem label; neither is "the root device"
                # for Firecracker (that would add root=/dev/vda to the command line).
                api.put_drive("root", path_on_host=_abs(image.rootfs), is_root_device=False, is_read_only=True)
                api.put_drive("data", path_on_host=DATA_DISK, is_root_device=False, is_read_only=False)
                api.put_vsock(guest_cid=cid, uds_path=VSOCK_UDS)
                if cfg.tap:  # the same TAP name in every instance's namespace: nothing to override on load
                    api.put_network_interface("eth0", host_dev_name=cfg.tap, guest_mac=cfg.mac or None)
                api.instance_start()
        except HypervisorError as e:
            raise self._fail(g, proc, "Firecracker did not start the VM", e) from None
        return proc

    def save(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, *,
             state_written: Callable[[], None] | None = None) -> SaveResult:
        t0 = time.monotonic()
        base_mem = g.snapshot_base / "memory"
        mem, state = into / "memory", into / "state"
        with self._api_of(g, proc) as api:
            dialect = api.known_dialect()
        diff = self._diff_base_ok(g, cfg, proc, base_mem) and dialect.diff_snapshot_safe(cfg.memory_mib)
        fc_version, snapshot_version = self.version(), self.snapshot_version()  # before pausing
        if diff:  # while the guest still runs: it never writes to the file it was restored from
            try:
                _unshare(base_mem, proc)
            except (OSError, VmforkError) as e:
                raise HypervisorError(f"standby failed, guest left running: cannot give {base_mem} "
                                      f"an inode of its own for a Diff snapshot: {e}") from None
        with self._api_of(g, proc) as api:
            try:
                api.patch_vm("Paused")
            except HypervisorError as e:
                raise HypervisorError(f"standby failed, guest left running: {e}") from None
            try:
                if diff:
                    os.rename(base_mem, mem)
                api.create_snapshot(snapshot_path=_rel(g, state), mem_file_path=_rel(g, mem),
                                    snapshot_type="Diff" if diff else "Full")
            except (HypervisorError, OSError) as e:
                # A Diff may have half-merged into the base: never use it again (next time: Full).
                for f in (mem, state):
                    f.unlink(missing_ok=True)
                if diff:
                    _forget_base(g)
                with contextlib.suppress(HypervisorError):
                    api.patch_vm("Resumed")
                raise HypervisorError(f"standby failed, guest left running: {e}") from None
        cfg.vmm_version = fc_version  # the manager writes cfg into the snapshot's config.json
        cfg.snapshot_version = snapshot_version
        cfg.snapshot_type = "Diff" if diff else "Full"
        t_snap = time.monotonic()
        if state_written is not None:
            state_written()
        proc.kill()  # Firecracker has synced both files before answering; it has no "quit" call
        _forget_base(g)  # its mem-file is now part of the new snapshot (Diff) or superseded (Full)
        return SaveResult({"snapshot_s": t_snap - t0, "exit_s": time.monotonic() - t_snap})

    def snapshot_live(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, into: Path, *,
                      while_paused: Callable[[], None]) -> SaveResult:
        """Pause, a Full snapshot into ``into``, ``while_paused``, resume. A snapshot resets
        Firecracker's dirty-page log, so the next standby writes a Full one (no base)."""
        t0 = time.monotonic()
        fc_version, snapshot_version = self.version(), self.snapshot_version()
        with self._api_of(g, proc) as api:
            t_pause = time.monotonic()
            try:
                api.patch_vm("Paused")
            except HypervisorError as e:
                raise HypervisorError(f"snapshot failed, guest left running: {e}") from None
            try:
                _forget_base(g)
                api.create_snapshot(snapshot_path=_rel(g, into / "state"), mem_file_path=_rel(g, into / "memory"),
                                    snapshot_type="Full")
                t_state = time.monotonic()
                while_paused()
                t_clone = time.monotonic()
            except (HypervisorError, OSError) as e:
                with contextlib.suppress(HypervisorError):
                    api.patch_vm("Resumed")
                raise HypervisorError(f"snapshot failed, guest left running: {e}") from None
            except BaseException:
                with contextlib.suppress(HypervisorError):
                    api.patch_vm("Resumed")
                raise
            api.patch_vm("Resumed")
            t_cont = time.monotonic()
        cfg.vmm_version, cfg.snapshot_version, cfg.snapshot_type = fc_version, snapshot_version, "Full"
        return SaveResult({"api_s": t_pause - t0, "state_s": t_state - t_pause, "clone_s": t_clone - t_state,
                           "cont_s": t_cont - t_clone, "pause_s": t_cont - t_pause})

    def _diff_base_ok(self, g: GuestDir, cfg: VMConfig, proc: ProcRef, base_mem: Path) -> bool:
        """True if ``base_mem`` is the mem-file this very VMM was restored from, at full size."""
        try:
            rec = json.loads((g.run / BASE_RECORD).read_text())
            st = os.stat(base_mem)
        except (OSError, ValueError):
            return False
        return (rec.get("pid"), rec.get("start")) == (proc.pid, proc.start) \
            and (rec.get("dev"), rec.get("ino")) == (st.st_dev, st.st_ino) \
            and st.st_size == cfg.memory_mib << 20

    def restore(self, g: GuestDir, cfg: VMConfig, image: Image, snap: Path, *,
                before_resume: Callable[[], None] | None = None) -> RestoreResult:
        t0 = time.monotonic()
        g.ensure_dirs()
        _forget_base(g)  # only the snapshot being restored can become the base
        state, mem = snap / "state", snap / "memory"
        self._own_state_paths(g, state)
        proc = self._spawn(g, cfg)
        try:
            with self._api_ready(g, proc) as api:
                dialect = api.known_dialect()
                if dialect.serial_endpoint:  # allowed before a load (not a boot resource)
                    api.put_serial(serial_out_path=CONSOLE)
                api.load_snapshot(snapshot_path=_rel(g, state), mem_file=_rel(g, mem), track_dirty_pages=True,
                                  resume_vm=False, vsock_uds_path=VSOCK_UDS if dialect.vsock_override else None)
                if not dialect.vsock_override:
                    self._check_own_vsock(g, dialect)
                if before_resume is not None:
                    before_resume()
                api.patch_vm("Resumed")
        except HypervisorError as e:
            raise self._fail(g, proc, "restore failed", e) from None
        st = os.stat(mem)
        atomic_write_json(g.run / BASE_RECORD, {"pid": proc.pid, "start": proc.start, "dev": st.st_dev,
                                                "ino": st.st_ino}, durable=False)
        return RestoreResult(proc, {"load_resume_s": time.monotonic() - t0})

    def prepare_fork(self, fork: GuestDir, snap: Path) -> bool:
        return self._own_state_paths(fork, snap / "state")

    def _check_own_vsock(self, g: GuestDir, dialect: Dialect) -> None:
        """Without ``vsock_override`` (before v1.16) the VMM binds the ``uds_path`` the state
        names; vmfork's is relative, so it must now be a socket in this guest's own dir."""
        sock = g.path / VSOCK_UDS
        if not sock.is_socket():
            raise HypervisorError(
                f"Firecracker {dialect.name} restored the snapshot without binding {sock} (it has no "
                "vsock_override before v1.16, and the snapshot's vsock path is not this instance's "
                f"relative {VSOCK_UDS}); refusing to run it")

    def _own_state_paths(self, g: GuestDir, state: Path) -> bool:
        """Point absolute paths into another instance's dir at this one (see the module doc)."""
        try:
            data = state.read_bytes()
        except OSError as e:
            raise HypervisorError(f"cannot read snapshot state {state}: {e.strerror}") from None
        guests = os.fsencode(os.path.realpath(g.path.parent))
        own = os.fsencode(g.path.name)
        pattern = re.escape(guests) + rb"/([0-9a-z]{%d})/" % ID_LEN
        foreign = {m.group(1) for m in re.finditer(pattern, data[:-fc_vmstate.CRC_LEN])} - {own}
        if not foreign:
            return False
        if len(own) != ID_LEN:
            raise HypervisorError(f"snapshot state {state} names other instances' files and this "
                                  f"instance's dir name '{g.path.name}' cannot replace them")
        try:
            new = fc_vmstate.rewrite(data, {guests + b"/" + f + b"/": guests + b"/" + own + b"/" for f in foreign})
        except fc_vmstate.VmstateError as e:
            raise HypervisorError(f"snapshot state {state} names other instances' files and cannot be "
                                  f"pointed at this one: {e}") from None
        tmp = state.with_name(".state.rewrite")
        with open(tmp, "wb") as f:  # a new inode: the file shared with (or cloned from) the source stays as it is
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state)
        return True

    def quit(self, g: GuestDir, proc: ProcRef) -> None:
        proc.kill()

    def resume(self, g: GuestDir, proc: ProcRef) -> bool:
        if self.status(g, proc) != "paused":
            return False
        with self._api_of(g, proc) as api:
            api.patch_vm("Resumed")
        return True

    def agent(self, g: GuestDir, timeout: float) -> AgentClient:
        return AgentClient.connect_vsock_uds(Path(short_path(g.path / VSOCK_UDS)), AGENT_PORT, timeout)

    def status(self, g: GuestDir, proc: ProcRef) -> str:
        try:
            with self._api(g, timeout=2.0) as api:
                state = api.describe_instance().get("state")
        except HypervisorError:
            return "running"
        return {"Paused": "paused", "Not started": "prelaunch"}.get(str(state), "running")


# --- helpers -------------------------------------------------------------------------------
def _abs(p: Path) -> str:
    return os.path.abspath(p)


def _rel(g: GuestDir, p: Path) -> str:
    """``p`` relative to the guest dir (the VMM's cwd) when inside it, else absolute."""
    try:
        return str(p.absolute().relative_to(g.path.absolute()))
    except ValueError:
        return _abs(p)


def _forget_base(g: GuestDir) -> None:
    """No Diff into the base from now on (its directory is the manager's to remove)."""
    (g.run / BASE_RECORD).unlink(missing_ok=True)


def _unshare(path: Path, own: ProcRef) -> None:
    """Give ``path`` an inode of its own if another link or another process could see writes to it."""
    st = os.stat(path)
    if st.st_nlink == 1 and not _mapped_by_others(st, own.pid):
        return
    from vmfork.forkvm import clone_file

    tmp = path.with_name(".memory.unshare")
    tmp.unlink(missing_ok=True)
    try:
        clone_file(path, tmp)  # reflink (extents shared copy-on-write) or sparse copy: a new inode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mapped_by_others(st: os.stat_result, own_pid: int) -> bool:
    """Does a process other than ``own_pid`` map this file? Matched by device and inode, as
    ``/proc/PID/maps`` gives them (inode numbers alone repeat across filesystems: a fresh XFS
    hands out the same small numbers)."""
    ino = str(st.st_ino).encode()
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (own_pid, os.getpid()):
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) >= 5 and fields[4] == ino and _maps_dev(fields[3]) == dev:
                        return True
        except OSError:
            continue
    return False


def _maps_dev(field: bytes) -> tuple[int, int] | None:
    """``MAJ:MIN`` (hex) of a ``/proc/PID/maps`` line."""
    try:
        major, minor = field.split(b":")
        return int(major, 16), int(minor, 16)
    except ValueError:
        return None


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+ \[(?:[^:\]]*:)?([^\]]*)\] (.*)$")
_NOTABLE = re.compile(r"error|fail|panic|fault|signal|KVM_EXIT|exiting|unable|cannot|denied", re.IGNORECASE)


def vmm_error_lines(log: Path, lines: int = 4, width: int = 240) -> str:
    """The notable lines Firecracker logged in its last run (after the last ``--- argv``
    header spawn_vmm writes), as ``thread: message | ...``; timestamps and instance ids
    dropped. Before v1.14 the guest console shares this file: lines are bounded and escaped."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    run = text[text.rfind("\n--- ") + 1:] if "\n--- " in text else text
    picked: list[str] = []
    rest: list[str] = []
    for raw in run.splitlines()[1 if run.startswith("--- ") else 0:]:
        line = raw.strip()
        if not line:
            continue
        m = _LOG_LINE.match(line)
        shown = f"{m.group(1)}: {m.group(2)}" if m else line
        shown = shown.encode("unicode_escape", "backslashreplace").decode("ascii")[:width]
        rest.append(shown)
        if (m or line.startswith("Error")) and _NOTABLE.search(shown) and shown not in picked:
            picked.append(shown)
    return " | ".join((picked or rest)[-lines:])


def _semver(v: str) -> tuple[int, int, int] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", v.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _run_flag(binary: str, flag: str) -> str:
    try:
        out = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HypervisorError(f"cannot run {binary} {flag}: {e}") from None
    text = out.stdout.strip()
    if out.returncode != 0 or not text:
        raise HypervisorError(f"{binary} {flag} failed: {(out.stderr or out.stdout).strip() or out.returncode}")
    return text


@functools.cache
def _fc_version(binary: str) -> str:
    text = _run_flag(binary, "--version")  # "Firecracker v1.16.1"
    m = re.search(r"v?(\d+\.\d+\.\d+\S*)", text.splitlines()[0])
    return m.group(1) if m else text.splitlines()[0]


@functools.cache
def _fc_snapshot_version(binary: str) -> str:
    text = _run_flag(binary, "--snapshot-version")  # "v8.0.0"
    m = re.search(r"v?(\d+\.\d+\.\d+)", text)
    if not m:
        raise HypervisorError(f"{binary} --snapshot-version printed {text!r}, not a version")
    return m.group(1)

