"""Running the external tools an image build needs (apt, dpkg-deb, mkfs, the C compiler)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmfork.errors import ExternalToolError


def run_tool(argv: list[str], tool: str | None = None, cwd: Path | None = None) -> str:
    """Run ``argv`` and return its stdout; failure → ExternalToolError carrying the tool's message."""
    name = tool or Path(argv[0]).name
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, check=False, cwd=cwd,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise ExternalToolError(name, f"{argv[0]} not found (run 'make setup')") from exc
    if proc.returncode != 0:
        raise ExternalToolError(name, proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}")
    return proc.stdout
