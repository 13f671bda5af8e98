"""A synchronous face on the official async ``qemu.qmp`` client, with typed errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from vmfork import retry
from vmfork.errors import HypervisorError
from vmfork.layout import short_path

# qemu.qmp logs every disconnect at WARNING/ERROR; our errors carry the facts instead.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMPCommandError(HypervisorError):
    def __init__(self, cmd: str, error_class: str, desc: str) -> None:
        self.cmd, self.error_class, self.desc = cmd, error_class, desc
        super().__init__(f"QEMU refused '{cmd}': {desc}")


class QMP:
    """One QMP connection. ``with QMP.connect(sock, ...) as q: q.execute("stop")``."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

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
        q = cls(sock.parent.parent.name)
        last: Exception | None = None
        for _ in retry.attempts(timeout):
            if alive is not None and not alive():
                q.close()
                why = on_dead() if on_dead else ""
                raise HypervisorError(f"QEMU exited before its QMP socket answered{': ' + why if why else ''}")
            try:
                q._run(q._client.connect(short_path(sock)))
                return q
            except (ConnectError, OSError) as e:
                last = e
        q.close()
        raise HypervisorError(f"QMP socket {sock} did not answer within {timeout:.0f}s: {last}")

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, 60))

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return self._run(self._client.execute(cmd, args))
        except ExecuteError as e:
            raise QMPCommandError(cmd, e.error_class, e.error.error.desc) from None
        except (TimeoutError, QMPError, OSError, EOFError) as e:
            raise HypervisorError(f"QMP '{cmd}' failed: {e or type(e).__name__}") from None

    def pass_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU (SCM_RIGHTS) under ``name``, for URIs like ``fd:<name>``."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise HypervisorError(f"passing a file descriptor to QEMU failed: {e}") from None
        self.execute("getfd", {"fdname": name})

    def quit(self) -> None:
        """Send 'quit'; QEMU may close the socket before answering, which is fine."""
        try:
            self._run(self._client.execute("quit"))
        except (TimeoutError, QMPError, OSError, EOFError):
            pass

    def wait_migration(self, timeout: float = 600.0) -> dict[str, Any]:
        """Poll query-migrate until completed; raise with QEMU's error text if it failed."""
        status = None
        for _ in retry.attempts(timeout, first=0.001, cap=0.02):
            info: dict[str, Any] = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise HypervisorError(f"migration {status}: {info.get('error-desc', 'no reason given by QEMU')}")
        raise HypervisorError(f"migration did not complete within {timeout:.0f}s (status {status})")

    def close(self) -> None:
        try:
            if self._client.runstate.name != "IDLE":
                self._run(self._client.disconnect())
        except Exception:
            pass
        self._loop.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
