"""The seccomp filter that keeps QEMU's MADV_HUGEPAGE off guest RAM (vmfork.hypervisor.thp)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmfork.hypervisor.thp import madvise_filter, popen_without_ram_thp

# A child that maps 16 MiB and 8 MiB of anonymous memory and asks MADV_HUGEPAGE for each;
# it prints the errno of both calls (0 = accepted) and its seccomp mode.
CHILD = r"""
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
out = []
for size in (16 << 20, 8 << 20):
    m = mmap.mmap(-1, size)
    addr = ctypes.addressof((ctypes.c_char * size).from_buffer(m))
    ctypes.set_errno(0)
    r = libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), 14)
    out.append(0 if r == 0 else ctypes.get_errno())
mode = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]
print(out[0], out[1], mode)
"""


def test_program_shape():
    prog = madvise_filter(256 << 20, "x86_64")
    assert len(prog) % 8 == 0
    ins = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    assert ins[-1] == (0x06, 0, 0, 0x7FFF0000)  # RET ALLOW
    assert ins[-2] == (0x06, 0, 0, 0x00050000 | 22)  # RET ERRNO(EINVAL)
    # every failed comparison jumps exactly to the final ALLOW
    for i, (code, jt, jf, _k) in enumerate(ins):
        if code == 0x15:
            assert jt == 0 and i + 1 + jf == len(ins) - 1
    assert (0x15, 0, ins[1][2], 0xC000003E) == ins[1]  # the arch is checked first
    assert any(k == 256 << 20 for *_, k in ins)


def test_program_refuses_unknown_arch_and_bad_size():
    with pytest.raises(ValueError):
        madvise_filter(1 << 20, "riscv64")
    with pytest.raises(ValueError):
        madvise_filter(0, "x86_64")


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="no filter for this arch")
def test_only_the_ram_sized_hugepage_advice_is_refused_and_only_in_the_child():
    p, problem = popen_without_ram_thp([sys.executable, "-c", CHILD], 16 << 20, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    if problem:
        pytest.skip(problem)
    first, second, mode = out.split()
    assert (first, second, mode) == ("22", "0", "2")  # EINVAL for 16 MiB, accepted for 8 MiB, filter mode
    # this process and its threads are untouched
    status = Path("/proc/self/status").read_text().splitlines()
    assert [line.split()[1] for line in status if line.startswith("Seccomp:")] == ["0"]
