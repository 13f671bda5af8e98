"""Small pure helpers: sizes, names, ids, atomic files, printable text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vmfork.errors import InvalidArgument

TYPE_CHECKING = False  # typing only for the type checker (see vmfork/__init__.py)
if TYPE_CHECKING:
    from typing import Any

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
NAME_MAX = 63
ID_LEN = 12
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid instance name, else raise InvalidArgument."""
    if not name:
        raise InvalidArgument(f"invalid {what} '': must not be empty")
    if len(name) > NAME_MAX:
        raise InvalidArgument(f"invalid {what} '{name}': longer than {NAME_MAX} characters")
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {what} '{name}': use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` on one printable line: newlines, tabs and every other control character
    (escape sequences of a terminal included) are shown escaped, as ``\\n`` or ``\\x1b``.

    For text that reaches a terminal but is not ours: errors naming user input, guest
    output (agent errors, console tails), file names."""
    if not _CONTROL_RE.search(text):
        return text
    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL_RE.sub(esc, text)


def new_id() -> str:
    """A fixed-length random id (12 chars of [0-9a-z])."""
    import secrets  # hashlib, secrets, tempfile on use: read-only commands (ps) need none

    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LEN))


def is_id(text: str) -> bool:
    return len(text) == ID_LEN and all(c in _ID_ALPHABET for c in text)


def parse_size(text: str, what: str = "size") -> int:
    """Parse '256M', '2G', '512MiB', '1024' (MiB) into bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidArgument(f"invalid {what} '{text}': expected a number with K, M or G (e.g. 256M)")
    value = int(m.group(1)) * _SIZE_MULT[m.group(2).upper()]
    if value <= 0:
        raise InvalidArgument(f"invalid {what} '{text}': must be positive")
    return value


def parse_memory(text: str) -> int:
    """Guest memory in MiB: a whole number of MiB between 64 MiB and 64 GiB."""
    size = parse_size(text, "memory size")
    if size % (1 << 20):
        raise InvalidArgument(f"invalid memory size '{text}': must be a whole number of MiB")
    mib = size >> 20
    if mib < 64:
        raise InvalidArgument(f"invalid memory size '{text}': at least 64M is needed to boot")
    if mib > 64 * 1024:
        raise InvalidArgument(f"invalid memory size '{text}': at most 64G")
    return mib


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_together(paths: list[Path]) -> None:
    """fsync every file (or dir) of ``paths``, each in its own thread, and return when all
    are durable; the first error is raised (after all have ended). One fsync after another
    costs one journal commit each (XFS: a log force, ~0.5-1 ms on an idle loop device, more
    under load); issued together they share the commits."""
    if len(paths) < 2:
        for p in paths:
            fsync_file(p)
        return
    import threading

    errors: list[BaseException] = []

    def one(p: Path) -> None:
        try:
            fsync_file(p)
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p,), name="vmfork-fsync", daemon=True) for p in paths[1:]]
    for t in threads:
        t.start()
    one(paths[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def drop_page_cache(path: Path) -> None:
    """Drop the page cache of the file ``path`` (``POSIX_FADV_DONTNEED``): its clean pages
    that no process maps go; dirty ones stay (fsync first). Best effort: an error is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir and rename()."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), durable)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def crashpoint(name: str) -> None:
    """Die here with SIGKILL when VMFORK_CRASHPOINT names this point (crash-recovery tests)."""
    if os.environ.get("VMFORK_CRASHPOINT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
