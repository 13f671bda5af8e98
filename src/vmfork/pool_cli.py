"""``vmfork pool ...``: a warm pool of pre-started VMMs per source (registered by ``cli.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from vmfork.errors import InvalidArgument

Deco = Callable[[Callable[..., None]], Callable[..., None]]
Ctx = Any  # vmfork.cli's (passed in by register): annotations only


def _local(c: Ctx) -> Any:
    if c.host:
        raise InvalidArgument("'vmfork pool' acts on a local data dir, not through --host")
    return c.mgr


def register(cli: Any) -> None:
    """Add ``pool fill|ls|drain`` to ``cli.main`` (``cli``: the running ``vmfork.cli`` module)."""
    pass_ctx: Deco = cli.pass_ctx
    json_opt: Deco = cli.json_opt
    out, _emit, _clean = cli.out, cli._emit, cli._clean
    main: click.Group = cli.main

    @main.group()
    def pool() -> None:
        """A warm pool: VMMs pre-started for forks of one source, so 'fork --target-state running'
        does not wait for a VMM to start (off until filled; each idle slot costs its VMM's memory)."""

    @pool.command("fill")
    @click.argument("source")
    @click.option("--size", type=int, required=True, help="Ready slots to keep for SOURCE (0 to 32).")
    @click.option("--keep", is_flag=True, help="Refill to SIZE after each fork that takes a slot "
                  "(in the background under 'vmfork serve'); 'pool drain' or 'rm SOURCE' ends it.")
    @json_opt
    @pass_ctx
    def pool_fill(c: Ctx, source: str, size: int, keep: bool, as_json: bool) -> None:
        """Pre-start VMMs for forks of SOURCE (a qemu instance in standby): SIZE slots in all."""
        from vmfork.pool import ops

        r = ops.fill(_local(c), source, size, keep=keep)
        _emit(as_json, r, lambda: out.print(_clean(
            f"pool of {r['source']}: {r['size']} slot(s); made {len(r['made'])}, removed {len(r['removed'])} "
            f"in {r['seconds']:.2f}s" + (f"; refilled to {r['refilled']} after each fork" if r["refilled"] else ""))))

    @pool.command("ls")
    @json_opt
    @pass_ctx
    def pool_ls(c: Ctx, as_json: bool) -> None:
        """The slots, their state (ready, stale: made for an older snapshot) and memory (PSS)."""
        from vmfork.pool import ops

        rows = ops.ls(_local(c)) if c.data_dir_exists() else []

        _emit(as_json, rows, lambda: cli._print_table(("SLOT", "SOURCE", "STATE", "PID", "PSS"), (
            (r["id"], r["source"], r["state"] if not r["problem"] else f"{r['state']} ({r['problem']})",
             str(r["pid"] or "-"), f"{r['pss_mib']:.1f}M" if r["pss_mib"] is not None else "-") for r in rows)))

    @pool.command("drain")
    @click.argument("source")
    @json_opt
    @pass_ctx
    def pool_drain(c: Ctx, source: str, as_json: bool) -> None:
        """Stop and remove every slot of SOURCE."""
        from vmfork.pool import ops

        r = ops.drain(_local(c), source)
        _emit(as_json, r, lambda: out.print(_clean(
            f"pool of {source}: removed {len(r['removed'])}" + (f", {len(r['busy'])} busy" if r["busy"] else ""))))
