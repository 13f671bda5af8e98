"""QMP through ``qemu.qmp``'s own synchronous wrapper (``qemu.qmp.legacy``, as QEMU's
``QEMUMachine`` uses it), with typed errors, a connect that fails fast when QEMU died, and
migration completion taken from QEMU's ``MIGRATION`` events rather than polled."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmfork import retry
from vmfork.errors import HypervisorError
from vmfork.layout import short_path

# qemu.qmp logs every disconnect at WARNING/ERROR; our errors carry the facts instead.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

#: What vmfork migrates with: device state only (the RAM is a shared file), and events.
MIGRATION_CAPABILITIES = [
    {"capability": "x-ignore-shared", "state": True},
    {"capability": "events", "state": True},
]
_COMMAND_TIMEOUT = 60.0


class QMPCommandError(HypervisorError):
    def __init__(self, cmd: str, error_class: str, desc: str) -> None:
        self.cmd, self.error_class, self.desc = cmd, error_class, desc
        super().__init__(f"QEMU refused '{cmd}': {desc}")


class QMP:
    """One QMP connection. ``with QMP.connect(sock, ...) as q: q.execute("stop")``."""

    def __init__(self, sock: Path) -> None:
        self._mon = QEMUMonitorProtocol(short_path(sock), nickname=sock.parent.parent.name)
        self._mon.settimeout(_COMMAND_TIMEOUT)
        self._connected = False

    @classmethod
    def connect(
        cls,
        sock: Path,
        *,
        timeout: float = 10.0,
        alive: Callable[[], bool] | None = None,
        on_dead: Callable[[], str] | None = None,
    ) -> QMP:
        """Connect, retrying until the socket answers; fail fast if the VMM died."""
        q = cls(sock)
        last: Exception | None = None
        for _ in retry.attempts(timeout):
            if alive is not None and not alive():
                why = on_dead() if on_dead else ""
                raise HypervisorError(f"QEMU exited before its QMP socket answered{': ' + why if why else ''}")
            try:
                q._greet(max(timeout, 1.0))
                return q
            except (ConnectError, OSError, EOFError) as e:
                last = e
        raise HypervisorError(f"QMP socket {sock} did not answer within {timeout:.0f}s: {last}")

    def _greet(self, timeout: float) -> None:
        """Connect and negotiate, as ``QEMUMonitorProtocol.connect`` does, but bounded: a
        monitor that accepts and never greets (another client holds it) must not hang us."""
        mon = self._mon
        try:
            mon._sync(mon._qmp.connect(mon._address), timeout)
        except TimeoutError:
            with contextlib.suppress(Exception):
                mon._sync(mon._qmp.disconnect())
            raise HypervisorError(f"QEMU accepted the QMP connection but did not greet within {timeout:.0f}s "
                                  "(is another client connected?)") from None
        self._connected = True

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return self._mon.cmd(cmd, **(args or {}))
        except ExecuteError as e:
            raise QMPCommandError(cmd, e.error_class, e.error.error.desc) from None
        except (TimeoutError, QMPError, OSError, EOFError) as e:
            raise HypervisorError(f"QMP '{cmd}' failed: {e or type(e).__name__}") from None

    def pass_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU (SCM_RIGHTS) under ``name``, for URIs like ``fd:<name>``."""
        try:
            self._mon.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise HypervisorError(f"passing a file descriptor to QEMU failed: {e}") from None
        self.execute("getfd", {"fdname": name})

    def add_fd(self, fd: int) -> int:
        """Hand ``fd`` to QEMU (SCM_RIGHTS) into a new fd set: a command that opens a file by
        name opens ``/dev/fdset/<id>`` (the returned id) as a dup of it. Release it with
        ``remove-fd``."""
        try:
            self._mon.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise HypervisorError(f"passing a file descriptor to QEMU failed: {e}") from None
        return int(self.execute("add-fd")["fdset-id"])

    def quit(self) -> None:
        """Send 'quit'; QEMU may close the socket before answering, which is fine."""
        try:
            self._mon.cmd("quit")
        except (TimeoutError, QMPError, OSError, EOFError):
            pass

    def set_migration_capabilities(self) -> None:
        self.execute("migrate-set-capabilities", {"capabilities": MIGRATION_CAPABILITIES})

    def wait_migration(self, timeout: float = 120.0) -> None:
        """Wait for the ``MIGRATION`` event that ends it (with the ``events`` capability
        set); raise with QEMU's own error text if it failed."""
        while True:
            try:
                event = self._mon.pull_event(wait=float(timeout))
            except TimeoutError:
                raise HypervisorError(f"migration did not complete within {timeout:.0f}s") from None
            except (QMPError, OSError, EOFError) as e:
                raise HypervisorError(f"QEMU closed QMP during the migration: {e or type(e).__name__}") from None
            if event is None or event.get("event") != "MIGRATION":
                continue
            status = event.get("data", {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = self.execute("query-migrate")
                raise HypervisorError(f"migration {status}: {info.get('error-desc', 'no reason given by QEMU')}")

    def close(self) -> None:
        if self._connected:
            self._connected = False
            try:
                self._mon.close()
            except Exception:
                pass

    def __enter__(self) -> QMP:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
