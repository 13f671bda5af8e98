"""Which QEMU binary runs a guest, and what it can do.

Two QEMUs may be installed: Debian's own (``qemu-system-x86_64`` on PATH, 7.2 on bookworm)
and QEMU 10.0.2 from bookworm-backports, unpacked by ``make setup`` into the project's
``.tools/qemu/`` (``scripts/fetch-qemu.sh``). The default: ``VMFORK_QEMU_BIN`` if set, else
the tools dir's QEMU if it is there, else PATH's. A guest whose snapshot was written by
another installed QEMU is restored by that one (``for_version``): a QEMU restores only its
own streams (``Hypervisor.check_snapshot_compat``), so installing QEMU 10 leaves the standby
guests and snapshots of 7.2 usable, and their forks run on 7.2 too.

QEMU 10 matters for forks that share their source's RAM (``shared_ram``): its
``memory-backend-file,readonly=on,rom=off`` (QEMU >= 8.2) opens the template read-only and
maps it private and writable, so a confined VMM, which may only read the template, can run
from it. 7.2 opens the file read-write even with ``share=off``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from vmfork.errors import HypervisorError

BINARY = "qemu-system-x86_64"
ENV_BINARY = "VMFORK_QEMU_BIN"
#: Where ``scripts/fetch-qemu.sh`` unpacks QEMU 10 (a ``dpkg -x`` tree): <repo>/.tools/qemu
TOOLS_QEMU = Path(__file__).resolve().parents[3] / ".tools" / "qemu"
READONLY_RAM = (8, 2)  # memory-backend-file readonly=on + rom=off


def tools_binary() -> str | None:
    b = TOOLS_QEMU / "usr" / "bin" / BINARY
    return str(b) if os.access(b, os.X_OK) else None


def default_binary() -> str:
    """``VMFORK_QEMU_BIN`` > the tools dir's QEMU > ``qemu-system-x86_64`` on PATH."""
    return os.environ.get(ENV_BINARY) or tools_binary() or BINARY


def candidates(default: str) -> list[str]:
    """The installed QEMUs, ``default`` first (each once, those that exist)."""
    out: list[str] = []
    seen: set[str] = set()
    for b in (default, tools_binary(), BINARY):
        exe = shutil.which(b) if b else None
        if b and exe and os.path.realpath(exe) not in seen:
            seen.add(os.path.realpath(exe))
            out.append(b)
    return out


def for_version(default: str, version: str) -> str | None:
    """The installed QEMU of this version (``default`` if it is, or has no version to
    match); None if none is."""
    if not version or _version(default) == version:
        return default
    for b in candidates(default)[1:]:
        if _version(b) == version:
            return b
    return None


def data_args(binary: str) -> list[str]:
    """``-L <prefix>/usr/share/qemu`` for a QEMU unpacked outside ``/usr`` (its firmware and
    option ROMs are there, not in the compiled-in ``/usr/share/qemu``); else nothing."""
    d = data_dir(binary)
    return ["-L", d] if d else []


def data_dir(binary: str) -> str | None:
    exe = shutil.which(binary)
    if not exe:
        return None
    bindir = os.path.dirname(os.path.realpath(exe))
    share = os.path.normpath(os.path.join(bindir, "..", "share", "qemu"))
    if bindir.startswith("/usr/") or not os.path.isdir(share):
        return None
    return share


def readonly_ram(binary: str) -> bool:
    """True when this QEMU has ``memory-backend-file,readonly=on,rom=off`` (QEMU >= 8.2)."""
    return version_tuple(_version(binary)) >= READONLY_RAM


def version_tuple(v: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in v.split(".")[:3]:
        digits = part[:len(part) - len(part.lstrip("0123456789"))]  # its leading digits
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def version(binary: str) -> str:
    return _version(binary)


@functools.cache
def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HypervisorError(f"cannot run {binary} --version: {e}") from None
    first = out.stdout.splitlines()[0] if out.stdout else ""
    # "QEMU emulator version 7.2.22 (Debian ...)"
    return first.split("version", 1)[1].split()[0] if "version" in first else first
