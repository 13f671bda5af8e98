"""Issue 10: the seed's fork-isolation scenario at the VMM level, on a REAL Firecracker binary.

No agent and no guest userspace: on hosts like this one (a PVM-style KVM) the guest kernel
runs for its first seconds and then the VMM stops with ``KVM_EXIT_INTERNAL_ERROR``, but that
is enough for everything the seed checks about mem-files. vmfork's own backend
(``FirecrackerHypervisor.boot/save/restore``) and copier (``clone_tree``, with the manager's
skip rule) are driven in the seed's order, on a loop-mounted XFS with reflinks (as a data dir
would be), with the 4 KiB copy-on-write extent hint the manager sets on ``guests/``.

Runs wherever the binary is found (``make setup`` installs it into ``.tools/bin``) and a raw
``InstanceStart`` works; skips otherwise, saying which. The measured figures (Full snapshot,
fork, load and Diff times; Diff size against pages dirtied) go to the test summary.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fsutil import loop_fs, loop_fs_unavailable_reason
from vmfork.errors import HypervisorError
from vmfork.forkvm import clone_file, clone_tree
from vmfork.fs import extent_stats, set_cow_extent_size_hint
from vmfork.hypervisor import fc_vmstate
from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.firecracker import VSOCK_UDS, FirecrackerHypervisor
from vmfork.hypervisor.firecracker_api import FirecrackerAPI, FirecrackerUnreachable
from vmfork.images import Image
from vmfork.instances.manager import _guest_skip
from vmfork.layout import GuestDir
from vmfork.procs import ProcRef

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

PAGE = 4096


# --- what is needed, and why not -------------------------------------------------------------
def instance_start_problem(hv: FirecrackerHypervisor, image: Image) -> str | None:
    """Does a raw InstanceStart work here (API calls only, not vmfork's backend)?"""
    with tempfile.TemporaryDirectory(prefix="vmfork-fcstart-") as tmp:
        with open(Path(tmp) / "vmm.log", "wb") as log:
            p = subprocess.Popen([hv.binary, "--api-sock", "fc.sock"], cwd=tmp, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
        try:
            with FirecrackerAPI(str(Path(tmp) / "fc.sock")) as api:
                for _ in range(200):
                    try:
                        api.negotiate()
                        break
                    except FirecrackerUnreachable:
                        time.sleep(0.02)
                api.put_boot_source(str(image.vmlinux), initrd_path=str(image.initramfs), boot_args="console=ttyS0")
                api.put_machine_config(vcpu_count=1, mem_size_mib=128)
                api.instance_start()
        except HypervisorError as e:
            return f"InstanceStart does not work here: {e}"
        finally:
            p.kill()
            p.wait()
    return None


@dataclass
class FcEnv:
    hv: FirecrackerHypervisor
    image: Image
    guests: Path
    procs: list[ProcRef] = field(default_factory=list)

    def guest(self, iid: str, cid: int) -> GuestDir:
        g = GuestDir(self.guests / iid)
        g.ensure_dirs()
        g.metadata.write_text(json.dumps({"id": iid, "cid": cid}))
        clone_file(self.image.overlay_template, g.disk)
        return g


def firecracker_or_skip(image: Image) -> FirecrackerHypervisor:
    """The Firecracker backend, if its binary is usable and can start an instance here; else skip."""
    hv = FirecrackerHypervisor()
    problem = hv.available()
    if problem:
        pytest.skip(f"no usable Firecracker binary: {problem}")
    problem = instance_start_problem(hv, image)
    if problem:
        pytest.skip(problem)
    return hv


@pytest.fixture(scope="module")
def fc(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FcEnv]:
    hv = firecracker_or_skip(image)
    reason = loop_fs_unavailable_reason("xfs")
    if reason:
        pytest.skip(f"xfs loop filesystem unavailable: {reason}")
    with loop_fs("xfs", 8000, tmp_path_factory.mktemp("fc-vmm")) as mnt:
        guests = mnt / "guests"
        guests.mkdir()
        set_cow_extent_size_hint(guests, 4096)  # as the manager does on a data dir
        env = FcEnv(hv, image, guests)
        try:
            yield env
        finally:
            for p in env.procs:
                p.kill(timeout=2)


# --- observations ------------------------------------------------------------------------------
def fingerprint(p: Path) -> tuple[tuple[int, int], str]:
    st = os.stat(p)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return (st.st_dev, st.st_ino), h.hexdigest()


def contains(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return m.find(needle) >= 0


def differing_pages(a: Path, b: Path) -> int:
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(PAGE * 256), fb.read(PAGE * 256)
            if not x and not y:
                return n
            for i in range(0, max(len(x), len(y)), PAGE):
                if x[i:i + PAGE] != y[i:i + PAGE]:
                    n += 1


def mapped_files(pid: int) -> set[str]:
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.add(parts[5].removesuffix(" (deleted)"))
    return out


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def listener_pid(sock: Path) -> int:
    """The pid that bound and listens on this unix socket (SO_PEERCRED of a connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return int(pid)


# --- the backend steps, as the manager does them around save() and restore() ------------------
def standby(env: FcEnv, g: GuestDir, cfg: VMConfig, proc: ProcRef) -> float:
    shutil.rmtree(g.snapshot_latest, ignore_errors=True)
    g.snapshot_tmp.mkdir(parents=True)
    t0 = time.monotonic()
    env.hv.save(g, cfg, proc, g.snapshot_tmp)
    dt = time.monotonic() - t0
    shutil.rmtree(g.snapshot_base, ignore_errors=True)  # merged into the new snapshot, or superseded
    (g.snapshot_tmp / "config.json").write_text(json.dumps(cfg.to_json()))
    os.rename(g.snapshot_tmp, g.snapshot_latest)
    assert not proc.alive()
    return dt


def restore(env: FcEnv, g: GuestDir, cfg: VMConfig) -> tuple[ProcRef, float]:
    os.rename(g.snapshot_latest, g.restoring)
    t0 = time.monotonic()
    proc = env.hv.restore(g, cfg, env.image, g.restoring).proc
    dt = time.monotonic() - t0
    env.procs.append(proc)
    shutil.rmtree(g.snapshot_base, ignore_errors=True)
    os.rename(g.restoring, g.snapshot_base)  # restore_consumes_snapshot=False
    return proc, dt


def fork_of(env: FcEnv, src: GuestDir, iid: str, cid: int) -> tuple[GuestDir, float, str]:
    dst = GuestDir(env.guests / iid)
    t0 = time.monotonic()
    stats = clone_tree(src.path, dst.path, skip=_guest_skip)
    dt = time.monotonic() - t0
    dst.ensure_dirs()
    dst.metadata.write_text(json.dumps({"id": iid, "cid": cid}))
    return dst, dt, stats.method


def fork_cfg(g: GuestDir, iid: str) -> VMConfig:
    cfg = VMConfig.from_json(json.loads((g.snapshot_latest / "config.json").read_text()))
    cfg.id = iid
    return cfg


@pytest.mark.parametrize("mem_mib", [256, 1024])
def test_seed_scenario_on_real_firecracker(fc: FcEnv, mem_mib: int, report: list[str]) -> None:
    hv = fc.hv
    token = f"vmfork-seed-{uuid.uuid4().hex}".encode()
    sid, fid = f"src{mem_mib:09d}", f"frk{mem_mib:09d}"
    src = fc.guest(sid, cid=3)
    cfg = VMConfig("firecracker", mem_mib, 1, "kvm", fc.image.digest,
                   hv.kernel_cmdline("kvm", "src") + f" vmfork.seed={token.decode()}", hv.version(), id=sid)

    # 1. boot a source whose command line carries the token; let its kernel run ~2 s
    proc = hv.boot(src, cfg, fc.image)
    fc.procs.append(proc)
    time.sleep(2)
    assert proc.alive(), f"the source VMM stopped within 2 s: {hv.vmm_log_tail(src)}"

    # 2. pause, Full standby
    full_s = standby(fc, src, cfg, proc)
    assert cfg.snapshot_type == "Full"
    smem = src.snapshot_latest / "memory"
    assert smem.stat().st_size == mem_mib << 20
    assert contains(smem, token), "the kernel command line (with the token) is not in guest memory"
    state = (src.snapshot_latest / "state").read_bytes()
    fc_vmstate.verify(state)  # vmfork's CRC64 agrees with the real Firecracker's
    assert b"run/vsock.sock" in state and b"disk.raw" in state and str(src.path).encode() not in state
    fc_vmstate.verify(fc_vmstate.rewrite(state, {"run/vsock.sock": "run/vsock.s0ck"}))

    # 3. fingerprint the source
    before = {f: fingerprint(src.snapshot_latest / f) for f in ("memory", "state")} | {"disk": fingerprint(src.disk)}

    # 4. fork the directory: another inode, the source unchanged
    fork, fork_s, method = fork_of(fc, src, fid, cid=4)
    fmem = fork.snapshot_latest / "memory"
    assert fingerprint(fmem)[0] != before["memory"][0] and fingerprint(fmem)[1] == before["memory"][1]
    assert fingerprint(smem) == before["memory"]

    # 5. load the fork in a new process in the fork's dir: its own files, nothing of the source's
    fcfg = fork_cfg(fork, fid)
    fproc, load_s = restore(fc, fork, fcfg)
    base = fork.snapshot_base / "memory"
    maps = mapped_files(fproc.pid)
    assert str(base) in maps, maps
    assert not any(m.startswith(str(src.path) + "/") for m in maps), maps
    fds = open_files(fproc.pid)
    assert str(fork.disk) in fds and str(base) in fds
    assert not any(f.startswith(str(src.path) + "/") for f in fds), fds
    # no vsock_override before v1.16: the relative uds_path is the fork's own socket
    assert listener_pid(fork.path / VSOCK_UDS) == fproc.pid
    base_id = fingerprint(base)[0]

    # 6. the fork's guest kernel runs on for ~1 s, dirtying memory
    time.sleep(1)
    assert fproc.alive(), hv.vmm_log_tail(fork)

    # 7. Diff standby into the fork's own mem-file: written in place, the source unchanged
    diff_s = standby(fc, fork, fcfg, fproc)
    assert fcfg.snapshot_type == "Diff"
    assert fingerprint(fmem)[0] == base_id  # merged into the file it was restored from, no copy
    assert fingerprint(fmem)[1] != before["memory"][1]
    written = extent_stats(fmem).exclusive_bytes  # the copy-on-write extents: what the Diff wrote
    dirtied = differing_pages(smem, fmem)
    assert 0 < dirtied * PAGE <= written < (mem_mib << 20) // 2
    after = {f: fingerprint(src.snapshot_latest / f) for f in ("memory", "state")} | {"disk": fingerprint(src.disk)}
    assert after == before

    # a second Diff cycle on the fork, then reloaded
    fproc, load2_s = restore(fc, fork, fcfg)
    time.sleep(0.5)
    diff2_s = standby(fc, fork, fcfg, fproc)
    assert fcfg.snapshot_type == "Diff"
    fproc, _ = restore(fc, fork, fcfg)
    time.sleep(0.5)
    assert fproc.alive() and hv.status(fork, fproc) == "running", hv.vmm_log_tail(fork)

    # the nlink rule, against the real process: a base with another link gets its own inode first
    other = fork.path / "another-link-to-base"
    os.link(fork.snapshot_base / "memory", other)
    linked = fingerprint(other)
    standby(fc, fork, fcfg, fproc)
    assert fcfg.snapshot_type == "Diff"
    assert fingerprint(other) == linked  # the other link saw nothing
    assert os.stat(fmem).st_ino != linked[0][1] and os.stat(fmem).st_nlink == 1
    other.unlink()

    # the mapper rule: a base another process maps gets its own inode first; the real VMM's
    # own MAP_PRIVATE mapping of it does not count as another mapper (checked above: in place)
    fproc, _ = restore(fc, fork, fcfg)
    mapper = subprocess.Popen(
        [sys.executable, "-c", "import mmap,sys,time\n"
         "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
         "print('mapped',flush=True); time.sleep(120)", str(fork.snapshot_base / "memory")],
        stdout=subprocess.PIPE)
    try:
        assert mapper.stdout is not None and mapper.stdout.readline().strip() == b"mapped"
        mapped = fingerprint(fork.snapshot_base / "memory")
        time.sleep(0.3)
        standby(fc, fork, fcfg, fproc)
        assert fcfg.snapshot_type == "Diff"
        assert os.stat(fmem).st_ino != mapped[0][1]
        view = [p for p in Path(f"/proc/{mapper.pid}/map_files").iterdir() if os.stat(p).st_ino == mapped[0][1]]
        assert view and hashlib.sha256(view[0].read_bytes()).hexdigest() == mapped[1]
    finally:
        mapper.kill()
        mapper.wait()

    # 8. delete the fork: the source is unchanged
    shutil.rmtree(fork.path)
    assert {f: fingerprint(src.snapshot_latest / f) for f in ("memory", "state")} | {"disk": fingerprint(src.disk)} \
        == before

    # 9. load the source in a fresh process and resume it: it runs
    sproc, _ = restore(fc, src, cfg)
    time.sleep(1)
    assert sproc.alive() and hv.status(src, sproc) == "running", hv.vmm_log_tail(src)
    assert listener_pid(src.path / VSOCK_UDS) == sproc.pid
    hv.quit(src, sproc)

    report.append(
        f"firecracker {hv.version()} (real binary), {mem_mib} MiB guest on XFS: Full snapshot {full_s * 1000:.0f} ms, "
        f"fork ({method}) {fork_s * 1000:.1f} ms, load+resume {load_s * 1000:.0f} ms (again {load2_s * 1000:.0f} ms), "
        f"Diff {diff_s * 1000:.0f} ms (second {diff2_s * 1000:.0f} ms); Diff wrote {written / 1024:.0f} KiB "
        f"for {dirtied} pages dirtied ({dirtied * PAGE / 1024:.0f} KiB)")
