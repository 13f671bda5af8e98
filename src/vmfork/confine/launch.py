"""What runs in the forked child between ``fork`` and ``exec`` of a confined VMM.

``child_setup(spec)`` returns the function handed to ``subprocess.Popen(preexec_fn=...)``.
By then the child's stdout/stderr already are ``logs/vmm.log`` and its cwd is the guest dir;
it is the only thread of its process (unshare of the mount namespace needs that). In order:

1. join the instance's cgroups (``0`` into each ``cgroup.procs``), so every page and thread
   of the VMM is counted from its first instruction;
2. join the instance's network namespace (``setns``, if it has a network), else ``unshare``
   a new empty one; ``unshare`` a mount and IPC namespace;
3. mark every mount private, build a small root on a fresh tmpfs: ``/usr`` (and the
   ``/lib*``, ``/bin`` links of a merged-/usr host) read-only, a few device nodes, a
   ``/proc`` that shows only this uid's processes, and bind mounts, *at their host paths*, of
   the image dir (read-only) and of the guest dir (read-write, nosuid, nodev). Same paths
   mean: the VMM's relative paths, its cwd and ``/proc/PID/cwd`` as the host reads it are
   the host's (recovery finds VMMs by their cwd);
4. ``pivot_root`` into it, drop the old root, make the new root read-only;
5. drop to the instance's uid/gid (no supplementary groups but the one that opens
   ``/dev/kvm`` when KVM is used), which also drops every capability; set ``no_new_privs``.

Anything failing is written to the log (the user sees it through the VMM's log tail) and
aborts the exec, so a VMM never runs half-confined.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
_NR_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

DEVICES = ("null", "zero", "full", "random", "urandom")
TUN = "net/tun"  # made anew for the VMM's uid, not bound (see ``tun_node``)


@dataclass(frozen=True)
class Spec:
    """Everything the child needs, computed in the parent (no lookups after fork)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    mountpoint: str  # an empty dir on the host; the tmpfs root is mounted on it privately
    guest_dir: str
    ro_dirs: tuple[str, ...]  # bound read-only at the same path (image dir, binary dir)
    devices: tuple[str, ...] = DEVICES  # under /dev: null, kvm, net/tun ...
    procs_files: tuple[str, ...] = ()  # cgroup.procs files to join
    new_net: bool = True
    # host root entries re-created as symlinks (merged /usr) or bound read-only
    root_links: dict[str, str] = field(default_factory=dict)
    root_dirs: tuple[str, ...] = ()
    ro_files: tuple[str, ...] = ()  # single files bound read-only (ld.so.cache)
    netns: str = ""  # a network namespace (/run/netns/<name>) to join instead of a new one


def host_root_entries() -> tuple[dict[str, str], tuple[str, ...]]:
    """/bin, /lib, ... of this host: symlinks into /usr (merged /usr) or real dirs."""
    links, dirs = {}, []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = f"/{name}"
        if os.path.islink(p):
            links[name] = os.readlink(p)
        elif os.path.isdir(p):
            dirs.append(p)
    return links, tuple(dirs)


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mount = libc.mount
        self.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self.umount2 = libc.umount2
        self.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.unshare = libc.unshare
        self.unshare.argtypes = [ctypes.c_int]
        self.prctl = libc.prctl
        self.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self.syscall = libc.syscall
        self.setns = libc.setns
        self.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _setns(libc: _Libc, name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.setns(fd, CLONE_NEWNET), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def join_netns(name: str, inner: Any) -> Any:
    """A Popen-like starter (wrapping ``inner``, or ``subprocess.Popen``) whose child joins
    network namespace ``name`` before exec: an unconfined VMM with a network."""
    import subprocess

    libc = _Libc()

    def setup() -> None:
        try:
            _setns(libc, name)
        except OSError as e:
            os.write(2, f"vmfork: {e.strerror or e}\n".encode())
            raise

    def start(args: list[str], **kw: Any) -> Any:
        return (inner or subprocess.Popen)(args, preexec_fn=setup, **kw)

    return start


def child_setup(spec: Spec) -> Callable[[], None]:
    libc = _Libc()  # loaded and resolved before the fork
    nr_pivot = _NR_PIVOT_ROOT[os.uname().machine]

    def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        _check(libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                          flags, data.encode() if data else None), f"mount {src or fstype} on {dst}")

    def bind(src: str, dst: str, *, ro: bool, dev: bool = False) -> None:
        mount(src, dst, None, MS_BIND | MS_REC)
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if dev else MS_NODEV) | (MS_RDONLY if ro else 0)
        mount(None, dst, None, flags)

    def target(root: str, path: str, *, is_dir: bool) -> str:
        dst = root + path
        if is_dir:
            os.makedirs(dst, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o600))
        return dst

    def tun_node(root: str) -> None:
        """``/dev/net/tun`` for the VMM's uid, which opens its TAP by name (Firecracker
        always): a node of its own (as Firecracker's jailer makes), on a small tmpfs of its
        own (the root is nodev), owned by the VMM's uid; the host's node (often 0600 root)
        is not touched. The TAP itself is owned by that uid (``ip tuntap add ... user``)."""
        st = os.stat("/dev/net/tun")
        d = target(root, "/dev/net", is_dir=True)
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=4k,nr_inodes=8")
        os.mknod(f"{d}/tun", stat.S_IFCHR | 0o600, st.st_rdev)
        os.chown(f"{d}/tun", spec.uid, spec.gid)

    def setup() -> None:
        umask = os.umask(0o022)  # the minimal tree must be traversable by the VMM's uid
        try:
            for f in spec.procs_files:
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            if spec.netns:
                _setns(libc, spec.netns)
            flags = CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWNET if spec.new_net else 0)
            _check(libc.unshare(flags), "unshare")
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            root = spec.mountpoint
            mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k,nr_inodes=256")
            bind("/usr", target(root, "/usr", is_dir=True), ro=True)
            for name, link in spec.root_links.items():
                os.symlink(link, f"{root}/{name}")
            for d in spec.root_dirs:
                bind(d, target(root, d, is_dir=True), ro=True)
            for f in spec.ro_files:
                bind(f, target(root, f, is_dir=False), ro=True)
            for dev in spec.devices:
                if dev == TUN:
                    tun_node(root)
                    continue
                bind(f"/dev/{dev}", target(root, f"/dev/{dev}", is_dir=False), ro=False, dev=True)
            proc = target(root, "/proc", is_dir=True)
            try:
                mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid")
            except OSError as e:
                if e.errno != errno.EINVAL:  # kernels before 5.8 know neither option
                    raise
                mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
            for d in spec.ro_dirs:
                bind(d, target(root, d, is_dir=True), ro=True)
            bind(spec.guest_dir, target(root, spec.guest_dir, is_dir=True), ro=False)
            os.chdir(root)
            _check(libc.syscall(ctypes.c_long(nr_pivot), b".", b"."), "pivot_root")
            _check(libc.umount2(b".", MNT_DETACH), "umount the old root")
            mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.chdir(spec.guest_dir)
            os.setgroups(list(spec.groups))
            os.setresgid(spec.gid, spec.gid, spec.gid)
            os.setresuid(spec.uid, spec.uid, spec.uid)
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
            os.umask(umask)  # what the VMM creates (RAM file, sockets) stays private
        except OSError as e:
            os.write(2, f"vmfork: cannot confine the VMM: {e.strerror or e}\n".encode())
            raise

    return setup
