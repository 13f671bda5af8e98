"""``vmfork demo``: the main job on the embedded defaults, narrated with timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from vmfork.errors import NotFound, VmforkError
from vmfork.util import sha256_file

SRC, FORK = "demo", "demo-fork"


def _sh(mgr: Any, name: str, script: str) -> str:
    r = mgr.exec(name, ["sh", "-c", script], timeout=30)
    if r.exit_code != 0:
        raise VmforkError(f"demo: '{script}' failed in {name}: {r.stderr.decode(errors='replace').strip()}")
    return str(r.stdout.decode(errors="replace").strip())


def run_demo(mgr: Any, memory_mib: int, *, keep: bool, say: Callable[..., None]) -> None:
    """``say`` gets rich markup of ours; text from a guest in it is escaped."""
    timings: list[tuple[str, float]] = []

    def step(key: str, label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        result = fn()
        dt = time.monotonic() - t0
        timings.append((key, dt))
        say(f"[bold]{label}[/] [dim]({dt:.3f}s)[/]")
        return result

    for n in (FORK, SRC):
        try:
            mgr.rm(n, force=True)
            say(f"[dim]removed the previous demo's '{n}'[/]")
        except NotFound:
            pass

    inst = step("boot", f"boot '{SRC}' ({memory_mib} MiB)", lambda: mgr.run(SRC, memory_mib=memory_mib))
    say(f"  accel {inst.accel}, guest kernel {escape(_sh(mgr, SRC, 'uname -r'))}")
    step("write", "write sentinels in the source: RAM (/run, tmpfs) and disk (/root)", lambda: _sh(
        mgr, SRC, "echo born-before-fork > /run/sentinel && echo born-before-fork > /root/sentinel && sync"))
    step("standby", f"standby '{SRC}' (memory + device state to files, VMM stopped)", lambda: mgr.standby(SRC))
    src_mem = inst.dir / "snapshots" / "snapshot-latest" / "memory"
    digest = sha256_file(src_mem)
    fork, t = step("fork", f"fork '{SRC}' -> '{FORK}'", lambda: mgr.fork(SRC, FORK))
    fork_mem = fork.dir / "snapshots" / "snapshot-latest" / "memory"
    say(f"  guest dir cloned in {t['clone_s'] * 1000:.1f} ms ({t['clone_method']}); mem-file inode "
        f"{src_mem.stat().st_ino} (source) vs {fork_mem.stat().st_ino} (fork)")
    step("restore-fork", f"restore '{FORK}'", lambda: mgr.restore(FORK))
    step("diverge", "the fork writes its own state and saves its own snapshot", lambda: (
        _sh(mgr, FORK, "echo i-am-the-fork > /run/who && echo i-am-the-fork > /root/who && sync"),
        mgr.standby(FORK), mgr.restore(FORK)))
    same = sha256_file(src_mem) == digest
    say(f"  source snapshot after all that: {'byte-identical (sha256 ' + digest[:12] + '…)' if same else 'CHANGED'}")
    if not same:
        raise VmforkError("demo: the source's snapshot changed while the fork ran")
    step("restore-source", f"restore '{SRC}'", lambda: mgr.restore(SRC))
    _sh(mgr, SRC, "echo i-am-the-source > /run/who && echo i-am-the-source > /root/who")
    show = "echo host=$(hostname) ram=$(cat /run/sentinel),$(cat /run/who) disk=$(cat /root/sentinel),$(cat /root/who)"
    say("[bold]what each guest sees:[/]")
    for n in (SRC, FORK):
        say(f"  {n:10} {escape(_sh(mgr, n, show))}")  # the guest's words: never markup
    if not keep:
        for n in (FORK, SRC):
            mgr.rm(n, force=True)
        say("[dim]removed the demo instances (use --keep to keep them)[/]")
    say("[bold]timings[/]: " + ", ".join(f"{key} {dt:.3f}s" for key, dt in timings))
