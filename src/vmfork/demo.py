"""``vmfork demo``: the main job on the embedded defaults, narrated with timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vmfork.errors import NotFound, VmforkError

SRC, FORK = "demo", "demo-fork"


def _sh(mgr: Any, name: str, script: str) -> str:
    r = mgr.exec(name, ["sh", "-c", script], timeout=30)
    if r.exit_code != 0:
        raise VmforkError(f"demo: '{script}' failed in {name}: {r.stderr.decode(errors='replace').strip()}")
    return str(r.stdout.decode(errors="replace").strip())


def run_demo(mgr: Any, memory_mib: int, *, keep: bool, say: Callable[..., None]) -> None:
    timings: list[tuple[str, float]] = []

    def step(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        result = fn()
        dt = time.monotonic() - t0
        timings.append((label, dt))
        say(f"[bold]{label}[/] [dim]({dt:.3f}s)[/]")
        return result

    for n in (FORK, SRC):
        try:
            mgr.rm(n, force=True)
            say(f"[dim]removed the previous demo's '{n}'[/]")
        except NotFound:
            pass

    inst = step(f"boot '{SRC}' ({memory_mib} MiB)", lambda: mgr.run(SRC, memory_mib=memory_mib))
    say(f"  accel: {inst.accel}; guest kernel: " + _sh(mgr, SRC, "uname -r"))
    step("write sentinels in the source (RAM: /run, disk: /root)", lambda: _sh(
        mgr, SRC, "echo born-before-fork > /run/sentinel && echo born-before-fork > /root/sentinel && sync"))
    step(f"standby '{SRC}'", lambda: mgr.standby(SRC))
    before = mgr.describe(mgr.find(SRC), detail=True)["snapshot"]
    fork, t = step(f"fork '{SRC}' -> '{FORK}'", lambda: mgr.fork(SRC, FORK))
    say(f"  clone of the guest dir: {t['clone_s'] * 1000:.1f} ms ({t['clone_method']})")
    after = mgr.describe(fork, detail=True)["snapshot"]
    say(f"  mem-file inode: source {before['memory_inode']}, fork {after['memory_inode']} (different files)")
    step(f"restore '{FORK}'", lambda: mgr.restore(FORK))
    step(f"restore '{SRC}'", lambda: mgr.restore(SRC))
    step("each writes its own state", lambda: (
        _sh(mgr, SRC, "echo i-am-the-source > /run/who && echo i-am-the-source > /root/who"),
        _sh(mgr, FORK, "echo i-am-the-fork > /run/who && echo i-am-the-fork > /root/who")))
    show = "echo host=$(hostname) ram=$(cat /run/sentinel),$(cat /run/who) disk=$(cat /root/sentinel),$(cat /root/who)"
    say("[bold]what each guest sees:[/]")
    for n in (SRC, FORK):
        say(f"  {n:10} {_sh(mgr, n, show)}")
    if not keep:
        for n in (FORK, SRC):
            mgr.rm(n, force=True)
        say("[dim]removed the demo instances (use --keep to keep them)[/]")
    say("[bold]timings[/]: " + ", ".join(f"{label.split(' ')[0]} {dt:.2f}s" for label, dt in timings))
