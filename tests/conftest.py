"""Shared fixtures: a session data dir and a runner for the real ``vmfork`` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def vm_unavailable_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run `make setup`)"
    return None


@dataclass
class CLI:
    """Runs ``python -m vmfork.cli --data-dir DIR ...`` as a user would, in a subprocess."""

    data_dir: Path

    def __call__(
        self,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "vmfork.cli", "--data-dir", str(self.data_dir), "-q", *args]
        r = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            timeout=timeout,
            env=None if env is None else os.environ | env,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"vmfork {' '.join(args)} exited {r.returncode}\nstdout: {r.stdout.decode(errors='replace')}\n"
                f"stderr: {r.stderr.decode(errors='replace')}"
            )
        return r

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)

    def sh(self, name: str, script: str) -> str:
        return self("exec", name, "--", "sh", "-c", script).stdout.decode().strip()

    def state(self, name: str) -> str:
        d = self.json("inspect", name)
        assert isinstance(d, dict)
        return str(d["state"])


@contextlib.contextmanager
def data_dir_on(kind: str, base: Path, size_mb: int = 12000) -> Iterator[CLI]:
    """A CLI on a fresh data dir with its image built, on a loop-mounted filesystem of that
    ``kind`` (``"xfs"`` with reflink, ``"btrfs"``, ``"ext4"``: never whatever ``base`` is on),
    sparse, of ``size_mb``. Skips (reason printed) where that cannot exist; leaves no VMM
    and no mount behind."""
    from tests.fsutil import loop_fs, loop_fs_unavailable_reason

    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        reason = loop_fs_unavailable_reason(kind)
        if reason:
            pytest.skip(f"{kind} loop filesystem unavailable: {reason}")
        root = stack.enter_context(loop_fs(kind, size_mb, base))
        cli = CLI(root / "data")
        try:
            cli("image", "build")
            yield cli
        finally:
            _kill_all(cli.data_dir)


def kill_all_vmms(data_dir: Path) -> None:
    _kill_all(data_dir)


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("vmfork-data")
    yield d
    _kill_all(d)


def _kill_all(data_dir: Path) -> None:
    """Leave no VMM behind, whatever a test did."""
    from vmfork.hypervisor.base import vmm_record
    from vmfork.layout import GuestDir

    guests = data_dir / "guests"
    for g in guests.iterdir() if guests.exists() else []:
        ref = vmm_record(GuestDir(g))
        if ref is not None:
            ref.kill(timeout=2)
    _stop_watchdog(data_dir)


def _stop_watchdog(data_dir: Path) -> None:
    """Stop the data dir's space watchdog at once (it would exit by itself within a second or
    two of the last VMM; its lock keeps a loop filesystem busy until then)."""
    from vmfork.procs import ProcRef
    from vmfork.space.watchdog import running

    pid = running(data_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            ProcRef.of(pid).kill(timeout=2)


@pytest.fixture(scope="session")
def cli(session_data_dir: Path) -> CLI:
    reason = vm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return CLI(session_data_dir)


@pytest.fixture(scope="session")
def built(cli: CLI) -> CLI:
    """The session data dir with its guest image built (once)."""
    cli("image", "build")
    return cli


os.environ.setdefault("VMFORK_LOCK_TIMEOUT", "120")


_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report() -> list[str]:
    """Lines appended here are printed in the terminal summary (measured figures)."""
    return _REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT:
        terminalreporter.section("vmfork measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)
