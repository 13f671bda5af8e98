"""Firecracker's microVM state file ("vmstate"): its checksum, and equal-length path rewrites.

The layout, as Firecracker documents it (``src/vmm/src/snapshot/mod.rs``)::

    | 64-bit magic id | version string | State | CRC64 |

The trailer is the CRC64 of every byte before it, stored as a little-endian u64 (bincode's
fixed-int u64 in releases that used bincode; raw bytes since the move to bitcode, Firecracker
PR #5617 — the same 8 bytes either way). The CRC is the ``crc64`` crate's: Jones polynomial,
reflected, initial value 0, no final xor; so the CRC over a whole, intact file is 0.

What vmfork relies on is only that framing. The header and the state in between are serde
structures encoded with bincode (fixed-int, a u64 length before every string) or, in newer
releases, bitcode (a string's bytes and its length are kept in separate columns). Neither is
decoded here. A path the state embeds (drive ``path_on_host``, vsock ``uds_path``) is rewritten
only by replacing its bytes with the same number of bytes: every length field, whichever the
encoding, stays valid, and the CRC is recomputed and checked again afterwards.

vmfork itself gives Firecracker relative paths (the VMM's working directory is the guest dir),
so states it writes need no rewrite; see ``firecracker.py`` for when this is used.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

CRC_LEN = 8
_U64 = struct.Struct("<Q")
# The crc64 crate's polynomial (ECMA "Jones" 0xAD93D23594C935A9), bit-reversed for the
# reflected, LSB-first table.
_POLY_REFLECTED = 0x95AC9329AC4BC9B5


def _table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY_REFLECTED if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_TABLE = _table()


class VmstateError(ValueError):
    """The state file is not intact, or a requested rewrite is not safe."""


def crc64(data: bytes, crc: int = 0) -> int:
    """CRC64 as Firecracker computes it (``crc64::crc64(crc, data)``)."""
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def split(data: bytes) -> tuple[bytes, int]:
    """(everything before the trailer, the stored CRC)."""
    if len(data) < CRC_LEN + 1:
        raise VmstateError(f"{len(data)} bytes is too short for a Firecracker state file")
    return data[:-CRC_LEN], _U64.unpack(data[-CRC_LEN:])[0]


def verify(data: bytes) -> None:
    """Raise VmstateError unless the CRC64 trailer matches the content."""
    body, stored = split(data)
    computed = crc64(body)
    if computed != stored:
        raise VmstateError(f"CRC64 mismatch: the file says {stored:#018x}, its content gives {computed:#018x}")


def seal(body: bytes) -> bytes:
    """``body`` followed by its CRC64 trailer: a state file as Firecracker writes it."""
    return body + _U64.pack(crc64(body))


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def rewrite(data: bytes, replacements: Mapping[bytes | str, bytes | str]) -> bytes:
    """Return a copy of ``data`` with every occurrence of each old path replaced by its new one.

    Refuses (VmstateError) a file whose checksum is wrong, an old/new pair of different
    lengths, an empty old path, and an old path that does not occur. The result's checksum is
    recomputed and verified before it is returned; ``data`` itself is never modified.
    """
    verify(data)
    body, _ = split(data)
    for old_v, new_v in replacements.items():
        old, new = _b(old_v), _b(new_v)
        if not old:
            raise VmstateError("refusing to rewrite an empty path")
        if len(old) != len(new):
            raise VmstateError(
                f"refusing to rewrite {old!r} ({len(old)} bytes) as {new!r} ({len(new)} bytes): "
                "only a path of the same length keeps the state's length fields valid"
            )
        if old not in body:
            raise VmstateError(f"{old!r} does not occur in the state")
        body = body.replace(old, new)
    out = seal(body)
    verify(out)
    return out
