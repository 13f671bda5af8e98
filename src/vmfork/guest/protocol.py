"""The host<->guest agent wire protocol: pure encoding and decoding, no I/O.

Frame: ``b"VFK1"`` | type (1 byte) | req_id (u32 BE) | length (u32 BE) | payload.
All integers inside payloads are big-endian. See ``images/guest/agent.c`` for the
guest side.

``KILL``, ``HOLD`` and ``GO`` name their target exec's req_id in a 4-byte payload
(:func:`encode_target`) and get no reply. So do the frames of an interactive exec
(``EXEC_INTERACTIVE``: the exec payload plus :func:`encode_exec_options`): ``STDIN`` (the
target, then data), ``STDIN_EOF`` (the target) and ``RESIZE`` (the target, u16 rows, u16
cols); the guest acknowledges written stdin with ``STDIN_ACK`` (u32 bytes) on the exec's
own req_id, and the host keeps at most ``STDIN_WINDOW`` bytes unacknowledged. The exec mux (``guest/mux.py``) speaks this
same protocol to host clients, plus three frame types of its own that never reach the
guest: ``MUX_HELLO`` (mux -> client on accept), ``SHUTDOWN`` (client -> mux: end every
exec with the payload as reason, answered by ``SHUTDOWN_DONE``) and ``ABORTED`` (mux ->
client: the connection's requests are over; the payload says why).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

MAGIC = b"VFK1"
HEADER = struct.Struct(">4scII")
HEADER_LEN = HEADER.size  # 13
MAX_PAYLOAD = 16 << 20

# host -> guest
PING = b"P"
EXEC = b"E"
SET_TIME = b"T"
SYNC = b"S"
SET_HOSTNAME = b"H"
POWEROFF = b"Q"
KILL = b"K"  # SIGKILL the target exec's process group (its EXIT follows)
HOLD = b"W"  # stop reading the target exec's output (flow control)
GO = b"G"  # read it again
EXEC_INTERACTIVE = b"U"  # an exec whose stdin stays open (optionally on a PTY)
STDIN = b"I"  # more stdin for the target exec
STDIN_EOF = b"D"  # end of the target exec's stdin
RESIZE = b"Y"  # the target exec's PTY window size
# guest -> host
PONG = b"p"
STDOUT = b"O"
STDERR = b"R"
EXIT = b"X"
TIME_SET = b"t"
SYNCED = b"s"
HOSTNAME_SET = b"h"
POWERING_OFF = b"q"
ERROR = b"Z"
STDIN_ACK = b"i"  # u32: this many bytes of STDIN data were written (or dropped)
# exec mux <-> host clients only
MUX_HELLO = b"M"
SHUTDOWN = b"C"
SHUTDOWN_DONE = b"c"
ABORTED = b"A"
# replies after which a request is over (STDOUT/STDERR are not)
FINAL = frozenset({PONG, EXIT, TIME_SET, SYNCED, HOSTNAME_SET, POWERING_OFF, ERROR})

_U32 = struct.Struct(">I")
_EXIT = struct.Struct(">iBBi")
_TIME = struct.Struct(">qI")
_OPTIONS = struct.Struct(">IHH")
_TARGET_SIZE = struct.Struct(">IHH")
STDIN_WINDOW = 256 << 10  # unacknowledged stdin bytes the host may have in flight (agent: <= 1 MiB)
STDIN_CHUNK = 64 << 10  # stdin data per STDIN frame
TTY = 1  # flag of encode_exec_options


class ProtocolError(ValueError):
    """A frame or payload that does not follow the protocol."""


@dataclass(frozen=True)
class Frame:
    type: bytes  # one byte
    req_id: int
    payload: bytes


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    timed_out: bool
    signaled: bool
    signal: int


def encode_frame(type_: bytes, req_id: int, payload: bytes = b"") -> bytes:
    if len(type_) != 1:
        raise ProtocolError(f"frame type must be one byte, got {type_!r}")
    if not 0 <= req_id <= 0xFFFFFFFF:
        raise ProtocolError(f"req_id {req_id} out of range")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(
            f"frame payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD >> 20} MiB limit"
        )
    return HEADER.pack(MAGIC, type_, req_id, len(payload)) + payload


def _field(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _text(value: str, what: str) -> bytes:
    data = value.encode()
    if b"\0" in data:
        raise ProtocolError(f"{what} contains a NUL byte: {value!r}")
    return data


def encode_exec(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_ms: int = 0,
) -> bytes:
    """Payload of an exec request. ``timeout_ms`` 0 means no timeout."""
    if not argv:
        raise ProtocolError("exec needs a non-empty argv")
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise ProtocolError(f"timeout of {timeout_ms} ms out of range")
    parts = [_U32.pack(timeout_ms), _U32.pack(len(argv))]
    parts += [_field(_text(a, "argument")) for a in argv]
    env = env or {}
    parts.append(_U32.pack(len(env)))
    for key, value in env.items():
        if not key or "=" in key:
            raise ProtocolError(f"invalid environment variable name {key!r}")
        parts.append(_field(_text(f"{key}={value}", "environment entry")))
    parts.append(_field(_text(cwd or "", "working directory")))
    parts.append(_field(stdin))
    return b"".join(parts)


def decode_exec(payload: bytes) -> tuple[int, list[str], dict[str, str], str, bytes]:
    """Inverse of :func:`encode_exec` (used by tests and fakes)."""
    off = 0

    def u32() -> int:
        nonlocal off
        if off + 4 > len(payload):
            raise ProtocolError("truncated exec payload")
        (v,) = _U32.unpack_from(payload, off)
        off += 4
        return int(v)

    def blob() -> bytes:
        nonlocal off
        n = u32()
        if off + n > len(payload):
            raise ProtocolError("truncated exec payload")
        data = payload[off : off + n]
        off += n
        return data

    timeout_ms = u32()
    argv = [blob().decode() for _ in range(u32())]
    env: dict[str, str] = {}
    for _ in range(u32()):
        key, _, value = blob().decode().partition("=")
        env[key] = value
    cwd = blob().decode()
    stdin = blob()
    if off != len(payload):
        raise ProtocolError("trailing bytes after exec payload")
    return timeout_ms, argv, env, cwd, stdin


def encode_exec_options(*, tty: bool = False, rows: int = 0, cols: int = 0) -> bytes:
    """Trailer of an ``EXEC_INTERACTIVE`` payload (after :func:`encode_exec`'s)."""
    _check_size(rows, cols)
    return _OPTIONS.pack(TTY if tty else 0, rows, cols)


def decode_exec_options(payload: bytes) -> tuple[bytes, bool, int, int]:
    """(exec payload, tty, rows, cols) of an ``EXEC_INTERACTIVE`` payload."""
    if len(payload) < _OPTIONS.size:
        raise ProtocolError("truncated interactive exec payload")
    flags, rows, cols = _OPTIONS.unpack_from(payload, len(payload) - _OPTIONS.size)
    return payload[: -_OPTIONS.size], bool(flags & TTY), int(rows), int(cols)


def _check_size(rows: int, cols: int) -> None:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ProtocolError(f"terminal size {rows}x{cols} out of range (0..65535)")


def encode_resize(target: int, rows: int, cols: int) -> bytes:
    _check_size(rows, cols)
    return _TARGET_SIZE.pack(target, rows, cols)


def decode_resize(payload: bytes) -> tuple[int, int, int]:
    if len(payload) != _TARGET_SIZE.size:
        raise ProtocolError(f"resize payload must be {_TARGET_SIZE.size} bytes, got {len(payload)}")
    t, r, c = _TARGET_SIZE.unpack(payload)
    return int(t), int(r), int(c)


def retarget(payload: bytes, target: int) -> bytes:
    """The same target-first payload (KILL, STDIN, RESIZE...) naming ``target`` instead."""
    if len(payload) < _U32.size:
        raise ProtocolError("payload too short to name a target")
    return _U32.pack(target) + payload[_U32.size :]


def payload_target(payload: bytes) -> int:
    """The req_id a target-first payload names."""
    if len(payload) < _U32.size:
        raise ProtocolError("payload too short to name a target")
    return int(_U32.unpack_from(payload)[0])


def decode_ack(payload: bytes) -> int:
    if len(payload) != _U32.size:
        raise ProtocolError(f"stdin ack payload must be {_U32.size} bytes, got {len(payload)}")
    return int(_U32.unpack(payload)[0])


def encode_target(req_id: int) -> bytes:
    """Payload of KILL / HOLD / GO: the req_id of the exec they act on."""
    return _U32.pack(req_id)


def decode_target(payload: bytes) -> int:
    if len(payload) != _U32.size:
        raise ProtocolError(f"target payload must be {_U32.size} bytes, got {len(payload)}")
    return int(_U32.unpack(payload)[0])


def encode_exit(status: ExitStatus) -> bytes:
    return _EXIT.pack(status.exit_code, status.timed_out, status.signaled, status.signal)


def decode_exit(payload: bytes) -> ExitStatus:
    if len(payload) != _EXIT.size:
        raise ProtocolError(f"exit payload must be {_EXIT.size} bytes, got {len(payload)}")
    code, timed_out, signaled, sig = _EXIT.unpack(payload)
    return ExitStatus(int(code), bool(timed_out), bool(signaled), int(sig))


def encode_time(t: float) -> bytes:
    ns_total = round(t * 1_000_000_000)
    sec, nsec = divmod(ns_total, 1_000_000_000)
    return _TIME.pack(sec, nsec)


def decode_time(payload: bytes) -> float:
    if len(payload) != _TIME.size:
        raise ProtocolError(f"time payload must be {_TIME.size} bytes, got {len(payload)}")
    sec, nsec = _TIME.unpack(payload)
    return float(sec) + float(nsec) / 1e9


class FrameReader:
    """Incremental frame decoder.

    ``feed()`` bytes as they arrive and iterate ``frames()``. Bytes that do not start
    with the magic (stale output of an earlier connection, a torn frame) are skipped
    until the next magic; ``skipped`` counts them. A header announcing more than
    ``max_payload`` bytes is treated as garbage too (its magic is skipped).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload
        self.skipped = 0
        self.oversized = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self.skipped += n

    def next_frame(self) -> Frame | None:
        buf = self._buf
        while True:
            if not buf.startswith(MAGIC):
                if len(buf) < len(MAGIC) and MAGIC.startswith(bytes(buf)):
                    return None  # possibly the start of a magic: wait for more
                idx = buf.find(MAGIC, 1)
                if idx < 0:
                    # keep a tail that could be the start of a magic
                    keep = next(
                        (k for k in (3, 2, 1) if k < len(buf) and buf.endswith(MAGIC[:k])), 0
                    )
                    self._skip(len(buf) - keep)
                    return None
                self._skip(idx)
                continue
            if len(buf) < HEADER_LEN:
                return None
            _, type_, req_id, length = HEADER.unpack_from(buf)
            if length > self.max_payload:
                self.oversized += 1
                self._skip(len(MAGIC))
                continue
            end = HEADER_LEN + length
            if len(buf) < end:
                return None
            frame = Frame(bytes(type_), int(req_id), bytes(buf[HEADER_LEN:end]))
            del buf[:end]
            return frame

    def frames(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame
