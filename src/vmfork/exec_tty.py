"""The local end of ``vmfork exec -i`` / ``-t``: this process's stdin streamed to an
interactive exec as it comes; with ``-t`` on a terminal, that terminal in raw mode (keys,
Ctrl-C included, go to the guest's PTY) and its size changes passed on."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

CHUNK = 64 << 10


class Terminal:
    """``attach`` is called once the command runs (with its stdin: write, close, resize);
    ``restore`` always, afterwards."""

    def __init__(self, fd: int, *, raw: bool) -> None:
        self.fd = fd
        self.is_tty = os.isatty(fd)
        self.rows = self.cols = 0  # 0: the guest's default (24x80)
        if self.is_tty:
            with contextlib.suppress(OSError):
                size = os.get_terminal_size(fd)
                self.rows, self.cols = size.lines, size.columns
        self._saved: Any = None
        self._old_winch: Any = None
        self._winch = threading.Event()
        self._done = threading.Event()
        if raw and self.is_tty:
            import termios
            import tty

            self._saved = termios.tcgetattr(fd)
            tty.setraw(fd)

    def attach(self, stdin: Any) -> None:
        threading.Thread(target=self._pump, args=(stdin,), daemon=True, name="vmfork-exec-stdin").start()
        if self._saved is not None and threading.current_thread() is threading.main_thread():
            self._old_winch = signal.signal(signal.SIGWINCH, lambda *_: self._winch.set())
            threading.Thread(target=self._resizer, args=(stdin,), daemon=True, name="vmfork-exec-winch").start()

    def _pump(self, stdin: Any) -> None:
        """Copy our stdin to the command's until end of file (then close it) or its exit."""
        try:
            while data := os.read(self.fd, CHUNK):
                stdin.write(data)
            stdin.close()
        except Exception:  # the command exited, or the connection is gone: nothing to feed
            return

    def _resizer(self, stdin: Any) -> None:
        while not self._done.is_set():
            if not self._winch.wait(0.5):
                continue
            self._winch.clear()
            with contextlib.suppress(Exception):
                size = os.get_terminal_size(self.fd)
                stdin.resize(size.lines, size.columns)

    def restore(self) -> None:
        self._done.set()
        if self._old_winch is not None:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGWINCH, self._old_winch)
        if self._saved is not None:
            import termios

            with contextlib.suppress(OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
