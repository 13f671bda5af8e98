"""An instance's namespace and TAP made in-process, without netlink: what a fork waits for.

``make(name, tap, uid, ...)`` does what ``ip netns add`` + ``ip tuntap add`` do, with no
process, in the calling thread, which is back in its own namespace at the end (a network
namespace is per thread; the process's other threads never change it):
- ``unshare(CLONE_NEWNET)`` (Python 3.11 has no ``os.unshare``: libc through ctypes) and a
  bind mount of ``/proc/thread-self/ns/net`` onto ``/run/netns/<name>`` (what ``ip netns
  add`` does). Where ``/run/netns`` is not yet a shared mount point (the first namespace
  since boot, a new mount namespace), ``ip netns add`` is run instead (it sets
  ``/run/netns`` up) and the thread joins the namespace with ``setns``;
- inside it, the TAP, made with the kernel's TUN interface (``/dev/net/tun``:
  ``TUNSETIFF``, ``TUNSETOWNER``, ``TUNSETPERSIST``), and the loopback and TAP set up with
  the netdevice(7) ioctls (``SIOCSIFADDR``, ``SIOCSIFNETMASK``, ``SIOCSIFFLAGS``) on a socket
  made there (a socket acts on the namespace it was made in).

``join`` moves a thread of its own (``Background``) into a namespace: the processes it
starts run there (no ``preexec_fn``, so no fork of the whole Python process), and its
sockets' ioctls (``set_addr``, ``set_up``, ``add_default_route``: ``SIOCADDRT``) act there.
What needs netlink (the veth pair) is left to iproute2 (``vmfork.network``), off the path
the VMM waits on.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vmfork.errors import ExternalToolError
from vmfork.network.cmd import CLONE_NEWNET, NETNS_DIR, netns_path, run

MS_BIND = 0x1000
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
RTF_UP = 0x1
RTF_GATEWAY = 0x2


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def run_netns_shared() -> bool:
    """``/run/netns`` is a shared mount point, as ``ip netns add`` leaves it (so namespaces
    mounted there show in every mount namespace that shares it)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    shared = False
    for line in lines:  # the last mount on /run/netns is the one seen
        fields = line.split(" - ", 1)[0].split()
        if len(fields) >= 6 and fields[4] == NETNS_DIR:
            shared = any(opt.startswith("shared:") for opt in fields[6:])
    return shared


def _ifreq(name: str, data: bytes = b"") -> bytes:
    return struct.pack("16s24s", name.encode(), data)


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))


def _make_tap(tap: str, uid: int) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(tap, struct.pack("H", IFF_TAP | IFF_NO_PI)))
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def set_up(sock: socket.socket, dev: str) -> None:
    flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(dev)), 16)[0]
    fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(dev, struct.pack("H", flags | IFF_UP)))


def set_addr(sock: socket.socket, dev: str, ip: str, prefix: int) -> None:
    """Address ``ip/prefix`` on ``dev`` (briefly with its classful mask in between: only in
    an instance's own namespace, before its guest runs)."""
    fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(dev, _sockaddr_in(ip)))
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq(dev, _sockaddr_in(mask)))


#: struct rtentry (linux/route.h): pad1, dst, gateway, genmask, flags, pad2, pad3, pad4,
#: metric, dev, mtu, window, irtt (native alignment, padded to its size)
_RTENTRY = "@L16s16s16sHhLPhPLLH0L"


def add_default_route(sock: socket.socket, gateway: str) -> None:
    any_ = _sockaddr_in("0.0.0.0")
    rt = struct.pack(_RTENTRY, 0, any_, _sockaddr_in(gateway), any_, RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
    fcntl.ioctl(sock, SIOCADDRT, rt)


def make(name: str, tap: str, uid: int, tap_ip: str, prefix: int) -> None:
    """Network namespace ``name`` with its loopback up and TAP ``tap`` (owned by ``uid``, up,
    address ``tap_ip/prefix``). Raises ExternalToolError (tool ``netns``) naming what
    failed; whatever was made is left for the caller's teardown (``ip netns delete``)."""
    libc = _libc()
    path = netns_path(name)
    shared = run_netns_shared()
    if not shared:
        run(["ip", "netns", "add", name])
    step = "namespace"
    try:
        if shared:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
            os.close(fd)
        with _away(libc) as home:
            if shared:
                try:
                    _check(libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
                    _check(libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None),
                           f"mount --bind onto {path}")
                except BaseException:
                    libc.setns(home, CLONE_NEWNET)  # (no-op if unshare failed) before the unlink
                    os.unlink(path)
                    raise
            else:
                _setns(libc, path)
            step = f"TAP {tap} (/dev/net/tun)"
            _make_tap(tap, uid)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                step = "loopback up"
                set_up(sock, "lo")
                step = f"{tap} address {tap_ip}/{prefix}"
                set_addr(sock, tap, tap_ip, prefix)
                step = f"{tap} up"
                set_up(sock, tap)
    except OSError as e:
        raise ExternalToolError("netns", f"network namespace {name}, {step}: {e.strerror or e}") from None


@contextmanager
def _away(libc: ctypes.CDLL) -> Iterator[int]:
    """The calling thread may change its network namespace inside: it is back in its own
    at the end (yields an fd of its own namespace). Cheaper than a thread of its own."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield home
    finally:
        try:
            if libc.setns(home, CLONE_NEWNET) != 0:  # cannot happen (root, its own namespace);
                os.write(2, b"vmfork: cannot return to its own network namespace\n")  # never go on
                os._exit(70)  # in another one
        finally:
            os.close(home)


def _setns(libc: ctypes.CDLL, path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.setns(fd, CLONE_NEWNET), f"setns into {path}")
    finally:
        os.close(fd)


def join(name: str) -> None:
    """Move the calling thread (only it, and the processes it starts from then on) into
    network namespace ``name``: call it in a thread of its own (``Background``)."""
    _setns(_libc(), netns_path(name))


class Background:
    """``fn()`` running in a thread of its own from now on; ``wait()`` returns once it is
    done and raises what it raised."""

    def __init__(self, fn: Callable[[], None], name: str = "vmfork-net") -> None:
        self._err: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to wait()
            self._err.append(e)

    def wait(self) -> None:
        self._thread.join()
        if self._err:
            raise self._err[0]


__all__ = ["Background", "add_default_route", "join", "make", "run_netns_shared", "set_addr", "set_up"]
