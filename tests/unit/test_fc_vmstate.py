"""fc_vmstate: the CRC64 trailer of Firecracker's state file and equal-length path rewrites.

No real state file can be produced here (no Firecracker, no KVM), so the bytes are built to
the layout Firecracker documents in src/vmm/src/snapshot/mod.rs: a 64-bit magic id, the
version string, the state, and the CRC64 of all of that as a little-endian u64. The state
between is synthetic: binary noise around paths, encoded once bincode-style (a u64 length
right before each string's bytes, Firecracker up to its move to bitcode) and once
column-style (all lengths first, then all the bytes, like bitcode keeps them).
"""

from __future__ import annotations

import os
import struct

import pytest

from tests.fc_api_double import crc64_bitwise
from vmfork.hypervisor import fc_vmstate
from vmfork.hypervisor.fc_vmstate import VmstateError

U64 = struct.Struct("<Q")
MAGIC = 0x0710_1984_8664_0000
SRC = "/var/lib/vmfork/guests/k3v9x0aa1b2c/disk.raw"
FORK = "/var/lib/vmfork/guests/zz81mq4tt0pe/disk.raw"
SRC_SOCK = "/var/lib/vmfork/guests/k3v9x0aa1b2c/run/vsock.sock"
FORK_SOCK = "/var/lib/vmfork/guests/zz81mq4tt0pe/run/vsock.sock"


def string(s: str) -> bytes:
    return U64.pack(len(s)) + s.encode()


def bincode_like(*paths: str) -> bytes:
    """magic | version | state (noise, length-prefixed paths, noise) | CRC64."""
    state = os.urandom(64) + b"".join(string(p) + os.urandom(16) for p in paths) + os.urandom(64)
    return fc_vmstate.seal(U64.pack(MAGIC) + string("8.0.0") + state)


def strings_of(data: bytes) -> list[str]:
    """Decode the length-prefixed strings right after each known path position (test helper)."""
    out = []
    for marker in (b"/var/lib/vmfork/",):
        i = data.find(marker)
        while i >= 0:
            (n,) = U64.unpack_from(data, i - 8)
            out.append(data[i:i + n].decode())
            i = data.find(marker, i + n)
    return out


def test_crc64_is_firecrackers() -> None:
    # the values Firecracker's own doc tests give for its CRC64Reader/CRC64Writer (crc.rs)
    assert fc_vmstate.crc64(bytes([1, 2, 3, 4, 5])) == 0xFB04_60DE_0638_3654
    assert fc_vmstate.crc64(bytes([123] * 16)) == 0x29D5_3572_1632_6566
    data = os.urandom(3000)
    assert fc_vmstate.crc64(data) == crc64_bitwise(data)  # table vs bit-by-bit implementation
    assert fc_vmstate.crc64(data[1000:], fc_vmstate.crc64(data[:1000])) == fc_vmstate.crc64(data)


def test_seal_and_verify() -> None:
    data = bincode_like(SRC)
    fc_vmstate.verify(data)
    body, crc = fc_vmstate.split(data)
    assert crc == crc64_bitwise(body) and data[-8:] == U64.pack(crc)
    assert fc_vmstate.crc64(data) == 0  # CRC over content + its own trailer


@pytest.mark.parametrize("where", ["magic", "version", "state", "crc"])
def test_corruption_is_detected(where: str) -> None:
    data = bytearray(bincode_like(SRC))
    offset = {"magic": 3, "version": 17, "state": 40, "crc": len(data) - 2}[where]
    data[offset] ^= 0x01
    with pytest.raises(VmstateError, match="CRC64 mismatch"):
        fc_vmstate.verify(bytes(data))
    with pytest.raises(VmstateError, match="CRC64 mismatch"):
        fc_vmstate.rewrite(bytes(data), {SRC: FORK})  # checked before any rewrite


def test_too_short_is_refused() -> None:
    with pytest.raises(VmstateError, match="too short"):
        fc_vmstate.verify(b"\0" * 8)


def test_equal_length_rewrite_keeps_the_file_valid() -> None:
    assert len(SRC) == len(FORK) and len(SRC_SOCK) == len(FORK_SOCK)
    original = bincode_like(SRC, SRC_SOCK, SRC)
    frozen = bytes(original)
    out = fc_vmstate.rewrite(original, {SRC: FORK, SRC_SOCK: FORK_SOCK})
    assert original == frozen  # the input is not modified
    assert len(out) == len(original)
    fc_vmstate.verify(out)
    assert U64.unpack(out[-8:])[0] == crc64_bitwise(out[:-8])  # cross-checked CRC
    assert strings_of(out) == [FORK, FORK_SOCK, FORK]  # every occurrence, length fields intact
    assert SRC.encode() not in out and SRC_SOCK.encode() not in out
    # everything but the paths' bytes (and the trailer) is byte for byte the same
    spans = [(m, m + len(p)) for p in (SRC, SRC_SOCK) for m in _find_all(original, p.encode())]
    diff = [i for i, (a, b) in enumerate(zip(original[:-8], out[:-8], strict=True)) if a != b]
    assert diff and all(any(lo <= i < hi for lo, hi in spans) for i in diff)


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def test_directory_prefix_rewrite_in_a_column_layout() -> None:
    """bitcode keeps string lengths in one column and the bytes in another: an equal-length
    replacement of a directory prefix leaves every length right."""
    paths = [SRC, SRC_SOCK]
    lengths = b"".join(U64.pack(len(p)) for p in paths)
    data = fc_vmstate.seal(U64.pack(MAGIC) + lengths + b"".join(p.encode() for p in paths) + os.urandom(32))
    old, new = "/var/lib/vmfork/guests/k3v9x0aa1b2c/", "/var/lib/vmfork/guests/zz81mq4tt0pe/"
    out = fc_vmstate.rewrite(data, {old: new})
    fc_vmstate.verify(out)
    assert out[8:8 + len(lengths)] == lengths
    assert (FORK + FORK_SOCK).encode() in out


def test_different_length_is_refused() -> None:
    data = bincode_like(SRC)
    with pytest.raises(VmstateError, match="same length"):
        fc_vmstate.rewrite(data, {SRC: SRC + "x"})
    with pytest.raises(VmstateError, match="same length"):
        fc_vmstate.rewrite(data, {"/var/lib/vmfork/guests/k3v9x0aa1b2c/": "/tmp/g/"})


def test_absent_or_empty_path_is_refused() -> None:
    data = bincode_like(SRC)
    with pytest.raises(VmstateError, match="does not occur"):
        fc_vmstate.rewrite(data, {FORK: SRC})
    with pytest.raises(VmstateError, match="empty"):
        fc_vmstate.rewrite(data, {"": ""})
