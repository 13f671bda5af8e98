"""Framing and payload encoding of the host<->guest agent protocol (pure, no I/O)."""

from __future__ import annotations

import os
import struct

import pytest

from vmfork.guest import protocol as proto


def test_frame_round_trip() -> None:
    for payload in (b"", b"x", bytes(range(256)) * 10, b"\0VFK1\0"):
        data = proto.encode_frame(b"P", 0xDEADBEEF, payload)
        assert data[:4] == b"VFK1"
        assert len(data) == proto.HEADER_LEN + len(payload)
        r = proto.FrameReader()
        r.feed(data)
        assert list(r.frames()) == [proto.Frame(b"P", 0xDEADBEEF, payload)]
        assert r.buffered == 0 and r.skipped == 0


def test_header_layout_is_big_endian() -> None:
    data = proto.encode_frame(b"E", 1, b"abc")
    assert data == b"VFK1E" + struct.pack(">II", 1, 3) + b"abc"


def test_partial_reads_byte_by_byte() -> None:
    frames = [proto.Frame(b"O", i, os.urandom(i * 7)) for i in range(20)]
    stream = b"".join(proto.encode_frame(f.type, f.req_id, f.payload) for f in frames)
    r = proto.FrameReader()
    got: list[proto.Frame] = []
    for i in range(len(stream)):
        r.feed(stream[i : i + 1])
        got.extend(r.frames())
    assert got == frames
    assert r.skipped == 0


def test_resync_after_garbage() -> None:
    good = proto.encode_frame(b"p", 7, b"pong")
    for garbage in (b"x", b"VFK", b"garbage VF", b"\0" * 100, b"VVFVFK", b"VFK0zzzz"):
        r = proto.FrameReader()
        r.feed(garbage + good)
        assert list(r.frames()) == [proto.Frame(b"p", 7, b"pong")], garbage
        assert r.skipped == len(garbage)


def test_resync_split_magic_across_feeds() -> None:
    good = proto.encode_frame(b"p", 9, b"")
    r = proto.FrameReader()
    r.feed(b"junkjunkVF")
    assert list(r.frames()) == []
    r.feed(good[2:])
    assert list(r.frames()) == [proto.Frame(b"p", 9, b"")]


def test_torn_frame_then_good_frames() -> None:
    """A frame cut short (its sender went away) swallows what follows up to its
    announced length; the reader then resynchronises on the next magic."""
    torn = proto.encode_frame(b"O", 1, b"a" * 100)[:50]
    good = proto.encode_frame(b"p", 2, b"ok")
    r = proto.FrameReader()
    r.feed(torn + good * 10)
    frames = list(r.frames())
    assert frames[0].req_id == 1 and len(frames[0].payload) == 100
    assert frames[1:] == [proto.Frame(b"p", 2, b"ok")] * len(frames[1:])
    assert len(frames) >= 5
    assert r.buffered == 0


def test_oversize_rejected() -> None:
    with pytest.raises(proto.ProtocolError, match="exceeds"):
        proto.encode_frame(b"E", 1, b"\0" * (proto.MAX_PAYLOAD + 1))
    bogus = b"VFK1O" + struct.pack(">II", 5, proto.MAX_PAYLOAD + 1)
    good = proto.encode_frame(b"p", 5, b"x")
    r = proto.FrameReader()
    r.feed(bogus + good)
    assert list(r.frames()) == [proto.Frame(b"p", 5, b"x")]
    assert r.oversized == 1


def test_bad_type_and_req_id() -> None:
    with pytest.raises(proto.ProtocolError):
        proto.encode_frame(b"PP", 1)
    with pytest.raises(proto.ProtocolError):
        proto.encode_frame(b"P", 1 << 32)


def test_exec_payload_round_trip() -> None:
    payload = proto.encode_exec(
        ["sh", "-c", "echo ünïcode"],
        stdin=b"\0\1\2",
        env={"A": "1", "B": "x=y"},
        cwd="/tmp",
        timeout_ms=1500,
    )
    assert proto.decode_exec(payload) == (
        1500,
        ["sh", "-c", "echo ünïcode"],
        {"A": "1", "B": "x=y"},
        "/tmp",
        b"\0\1\2",
    )
    # layout: timeout, argc, then the first argument
    assert payload[:8] == struct.pack(">II", 1500, 3)
    assert payload[8:14] == struct.pack(">I", 2) + b"sh"


@pytest.mark.parametrize(
    ("argv", "env"),
    [([], None), (["a\0b"], None), (["true"], {"A=B": "1"}), (["true"], {"": "1"})],
)
def test_exec_payload_rejects(argv: list[str], env: dict[str, str] | None) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.encode_exec(argv, env=env)


def test_exit_and_time_payloads() -> None:
    st = proto.ExitStatus(exit_code=137, timed_out=False, signaled=True, signal=9)
    data = proto.encode_exit(st)
    assert data == struct.pack(">iBBi", 137, 0, 1, 9)
    assert proto.decode_exit(data) == st
    with pytest.raises(proto.ProtocolError):
        proto.decode_exit(b"\0" * 9)
    t = 1_700_000_000.123456789
    assert abs(proto.decode_time(proto.encode_time(t)) - t) < 1e-6
    sec, nsec = struct.unpack(">qI", proto.encode_time(1.5))
    assert (sec, nsec) == (1, 500_000_000)
