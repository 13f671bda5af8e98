"""Start-up of the CLI: what ``--version`` and read-only commands import (their speed is
measured in ``vmfork.bench``; here only what they load, which a stray top-level import breaks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def loaded_after(argv: list[str], data: Path) -> tuple[str, set[str]]:
    """Run ``vmfork ARGV`` in a fresh interpreter; its stdout and the modules it loaded."""
    code = ("import sys, json\n"
            f"sys.argv = ['vmfork', '--data-dir', {str(data)!r}, *{argv!r}]\n"
            "from vmfork.__main__ import main\n"
            "try:\n    main()\n"
            "except SystemExit:\n    pass\n"
            "sys.stdout.flush()\n"
            "sys.stderr.write(json.dumps(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    return r.stdout.decode(), set(json.loads(r.stderr.decode().splitlines()[-1]))


def test_version_is_answered_before_click_is_imported(tmp_path: Path) -> None:
    code = ("import sys\nsys.argv = ['vmfork', '--version']\nfrom vmfork.__main__ import main\nmain()\n"
            "assert not {'click', 'rich'} & set(m.split('.')[0] for m in sys.modules), sorted(sys.modules)\n")
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    slow = subprocess.run([sys.executable, "-m", "vmfork.cli", "--version"], capture_output=True, check=True)
    assert fast.stdout == slow.stdout and fast.stdout.startswith(b"vmfork, version ")


def test_ps_json_loads_neither_rich_nor_the_image_builder_nor_the_exec_mux(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    out, mods = loaded_after(["ps", "--json"], tmp_path / "data")
    assert json.loads(out) == []
    heavy = {"rich", "vmfork.images", "vmfork.images.build", "vmfork.guest.mux", "qemu", "httpx"}
    assert not heavy & (mods | {m.split(".")[0] for m in mods}), sorted(heavy & mods)
