"""``vmfork serve``: uvicorn on ``<data-dir>/vmfork.sock`` (0600) and optionally TCP.

SIGTERM/SIGINT: uvicorn stops accepting and waits up to SHUTDOWN_S for the requests in
flight; WebSocket execs are closed (their commands killed), and what is still running then
is cancelled: an exec's command is killed, a Manager call already in its worker thread runs
to its end (the process exits after it), and each of those is crash-safe anyway (the
Manager's recovery finishes or undoes it). Guests keep running: they are separate processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from vmfork.errors import AlreadyExists, InvalidArgument

SOCKET_NAME = "vmfork.sock"
SHUTDOWN_S = 30


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"invalid --listen '{listen}': use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from its creation on; a stale socket
    (no server answering) is replaced, a live one is refused."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a server that died
        else:
            raise AlreadyExists(f"a server already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(512)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(512)
    return sock


def serve(data_dir: Path, *, listen: str | None = None, rotate_token: bool = False,
          say: Callable[[str], None] = print) -> None:
    import uvicorn

    from vmfork.api.app import create_app
    from vmfork.api.auth import ensure_token, token_path

    app = create_app(data_dir)
    for action in app.state.vmfork.mgr.recover():
        say(f"recovered: {action}")
    sockets = []
    path = socket_path(data_dir)
    with contextlib.ExitStack() as stack:
        unix = bind_unix(path)
        stack.callback(_unlink_if_ours, path, os.stat(path))
        stack.callback(unix.close)
        sockets.append(unix)
        say(f"listening on unix:{path}")
        if rotate_token or listen:
            ensure_token(data_dir, rotate=rotate_token)
        if listen:
            host, port = parse_listen(listen)
            tcp = bind_tcp(host, port)
            stack.callback(tcp.close)
            sockets.append(tcp)
            say(f"listening on http://{host}:{tcp.getsockname()[1]} (bearer token in {token_path(data_dir)})")
        config = uvicorn.Config(app, log_level=os.environ.get("VMFORK_SERVE_LOG", "warning"),
                                timeout_graceful_shutdown=SHUTDOWN_S, ws_max_size=16 << 20, lifespan="on")
        # uvicorn re-raises the signal that stopped it once it is done: ours lets run() return,
        # so that the ExitStack removes the socket file and the process exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stopped)
        uvicorn.Server(config).run(sockets=sockets)
    say("stopped")


def _unlink_if_ours(path: Path, bound: os.stat_result) -> None:
    """Remove the socket file this server made, not one a newer server bound meanwhile (the
    old one stops listening first, then waits for its requests: a new ``serve`` in that gap
    takes the path as stale and binds a new file there). An inode number is reused at once, so
    a file counts as ours only with the same inode and mtime (its ctime changes with a chmod),
    and when nobody answers on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino, st.st_mtime_ns) != (bound.st_dev, bound.st_ino, bound.st_mtime_ns):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # ours, and nobody listens on it
    finally:
        probe.close()


def _stopped(_signum: int, _frame: object) -> None:
    """The signal uvicorn handled, raised again once it stopped: nothing more to do."""
