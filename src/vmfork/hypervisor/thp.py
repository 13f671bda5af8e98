"""Start QEMU without transparent huge pages on its guest RAM file.

QEMU (7.2 and later; no option turns it off) calls ``madvise(ram, size, MADV_HUGEPAGE)`` on
every RAM block. For our ``memory-backend-file,share=on`` RAM that flag makes the host kernel
fill the mem-file's page cache with 2 MiB folios, and writeback works per folio: each 4 KiB
page the guest dirties rewrites 2 MiB. After a fork that is a 2 MiB copy-on-write on XFS
(~50 MiB of new disk per fork generation of a 256 MiB guest instead of ~1.4 MiB), and every
standby writes back 2 MiB per dirtied page.

The lever: a two-line seccomp filter on the QEMU process that answers exactly
``madvise(<any address>, <guest RAM size>, MADV_HUGEPAGE)`` with EINVAL (what a kernel built
without THP answers; QEMU ignores the result) and lets every other system call through. It
is installed in a short-lived thread that then starts QEMU, so it is inherited by QEMU only:
the vmfork process and its other threads are unaffected, and no LD_PRELOAD library, wrapper
binary or host-wide setting is involved. ``PR_SET_THP_DISABLE`` does not help here (the
madvise still succeeds and the mapping still gets VM_HUGEPAGE, which the page cache follows).
The guest RAM size is the only thing the filter looks at besides the call itself; a TCG
translation buffer of exactly that size (QEMU's default is 1 GiB) loses its advice too (it
then uses 4 KiB pages; not measured here).

``VMFORK_QEMU_THP=1`` keeps QEMU's advice (plain spawn).
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from typing import Any

__all__ = ["MADV_HUGEPAGE", "madvise_filter", "popen_without_ram_thp", "ram_thp_kept"]

MADV_HUGEPAGE = 14
_EINVAL = 22

# audit arch, __NR_madvise
_ARCHES = {"x86_64": (0xC000003E, 28), "aarch64": (0xC00000B7, 233)}
_NR_SECCOMP = {"x86_64": 317, "aarch64": 277}

# classic BPF
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000

# struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6]  (little-endian hosts only)
_OFF_NR, _OFF_ARCH, _OFF_ARGS = 0, 4, 16

_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
# Do not let the filter switch on the speculative-store-bypass mitigation (SSBD) for QEMU, as
# the kernel does by default for seccomp-filtered tasks: this filter is no sandbox, and QEMU
# should run exactly as fast as without it.
_SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2


def ram_thp_kept() -> bool:
    """True when ``VMFORK_QEMU_THP=1`` asks to keep QEMU's huge-page advice."""
    return os.environ.get("VMFORK_QEMU_THP", "") == "1"


def madvise_filter(length: int, machine: str | None = None) -> bytes:
    """The seccomp program: ``madvise(*, length, MADV_HUGEPAGE)`` → EINVAL, all else allowed.

    Raises ValueError on an architecture it does not know.
    """
    machine = machine or os.uname().machine
    arch_nr = _ARCHES.get(machine)
    if arch_nr is None:
        raise ValueError(f"no seccomp madvise filter for {machine}")
    if not 0 < length < 1 << 64:
        raise ValueError(f"invalid RAM size {length}")
    arch, nr = arch_nr
    checks = [
        (_OFF_ARCH, arch),
        (_OFF_NR, nr),
        (_OFF_ARGS + 16, MADV_HUGEPAGE),  # args[2] low word
        (_OFF_ARGS + 20, 0),  # args[2] high word
        (_OFF_ARGS + 8, length & 0xFFFFFFFF),  # args[1] low word
        (_OFF_ARGS + 12, length >> 32),  # args[1] high word
    ]
    prog = []
    for i, (offset, value) in enumerate(checks):
        prog.append(struct.pack("=HBBI", _LD_W_ABS, 0, 0, offset))
        # on mismatch jump over the remaining checks and the ERRNO return, to ALLOW
        skip = 2 * (len(checks) - i - 1) + 1
        prog.append(struct.pack("=HBBI", _JEQ_K, 0, skip, value))
    prog.append(struct.pack("=HBBI", _RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EINVAL))
    prog.append(struct.pack("=HBBI", _RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    return b"".join(prog)


def _install(program: bytes) -> None:
    """Install ``program`` on the calling thread (no_new_privs + seccomp(SET_MODE_FILTER))."""
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    ul = ctypes.c_ulong
    if libc.prctl(ul(_PR_SET_NO_NEW_PRIVS), ul(1), ul(0), ul(0), ul(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    nr = _NR_SECCOMP[os.uname().machine]
    for flags in (_SECCOMP_FILTER_FLAG_SPEC_ALLOW, 0):  # kernels before 4.17 lack the flag
        if libc.syscall(ctypes.c_long(nr), ul(_SECCOMP_SET_MODE_FILTER), ul(flags), ctypes.byref(fprog)) == 0:
            return
        err = ctypes.get_errno()
        if err != 22:  # EINVAL: unknown flag, try without
            break
    raise OSError(err, os.strerror(err))


def popen_without_ram_thp(argv: list[str], ram_bytes: int, **kwargs: Any) -> tuple[subprocess.Popen[bytes], str | None]:
    """``subprocess.Popen(argv, **kwargs)`` with the filter for ``ram_bytes`` installed.

    Returns the process and None, or the process and the reason it was started without the
    filter (unknown architecture, seccomp unavailable). Popen's own errors propagate.
    """
    try:
        program = madvise_filter(ram_bytes)
    except ValueError as e:
        return subprocess.Popen(argv, **kwargs), str(e)
    box: dict[str, Any] = {}

    def spawn() -> None:
        try:
            try:
                _install(program)
            except OSError as e:
                box["problem"] = f"seccomp filter not installed: {e.strerror}"
            box["proc"] = subprocess.Popen(argv, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=spawn, name="vmfork-spawn")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["proc"], box.get("problem")
