"""The API token (``<data-dir>/api-token``, 0600) and the check of TCP requests.

Requests on the unix socket are not asked for a token: the socket is 0600, so only its
owner (and root) can connect. Requests over TCP need ``Authorization: Bearer <token>``.
The token file is re-read when it changes, so a rotation takes effect at once.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

TOKEN_FILE = "api-token"


def token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_FILE


def ensure_token(data_dir: Path, *, rotate: bool = False) -> str:
    """The token, made on first use (or anew with ``rotate``), in a 0600 file."""
    path = token_path(data_dir)
    if not rotate:
        try:
            tok = path.read_text().strip()
            if tok:
                return tok
        except FileNotFoundError:
            pass
    tok = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, tok.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return tok


class TokenCheck:
    def __init__(self, data_dir: Path) -> None:
        self.path = token_path(data_dir)
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    def current(self) -> str:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return ""
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._token = self.path.read_text().strip()
            self._stamp = stamp
        return self._token

    def ok(self, header: str | None) -> bool:
        tok = self.current()
        if not tok or not header:
            return False
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), tok.encode())
