"""``vmfork fleet ...``: the hosts of a Ray cluster as one fleet (registered by ``cli.py``).

Nothing here imports Ray: ``vmfork.fleet.client`` is imported by a fleet command only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from vmfork.errors import InvalidArgument

Deco = Callable[[Callable[..., None]], Callable[..., None]]
Ctx = Any  # vmfork.cli's
ADDRESS = "vmfork.fleet.address"  # in click's ctx.meta


def _mib(n: Any) -> str:
    return "-" if n is None else f"{int(n) >> 20}M"


def register(cli: Any) -> None:
    main: click.Group = cli.main
    pass_ctx: Deco = cli.pass_ctx
    json_opt: Deco = cli.json_opt
    out, err, _emit, _clean, _print_table = cli.out, cli.err, cli._emit, cli._clean, cli._print_table

    @contextlib.contextmanager
    def connected(c: Ctx) -> Iterator[Any]:
        from vmfork.fleet.client import Fleet

        address = click.get_current_context().meta.get(ADDRESS)
        if not address:
            raise InvalidArgument("no fleet address: use 'vmfork fleet --address HOST:PORT' "
                                  "(or VMFORK_FLEET_ADDRESS / RAY_ADDRESS)")
        f = Fleet(address, progress=c.progress)
        try:
            yield f
        finally:
            f.close()

    @main.group()
    @click.option("--address", default=None, envvar="VMFORK_FLEET_ADDRESS",
                  help="The Ray cluster's address, HOST:PORT [env VMFORK_FLEET_ADDRESS, else RAY_ADDRESS].")
    @click.pass_context
    def fleet(ctx: click.Context, address: str | None) -> None:
        """Many hosts as one fleet: one vmfork host agent per Ray node, forks placed where their
        snapshot is (replicated host to host when those hosts are full). See README, "Many hosts"."""
        ctx.meta[ADDRESS] = address or os.environ.get("RAY_ADDRESS")

    @fleet.command("join")
    @click.argument("host")
    @json_opt
    @pass_ctx
    def fleet_join(c: Ctx, host: str, as_json: bool) -> None:
        """Start the agent of HOST (this node's name in the fleet) on the Ray node that offers the
        resource vmfork_host_HOST, for this data dir (--data-dir)."""
        with connected(c) as f:
            r = f.join(host, c.data_dir)
        _emit(as_json, r, lambda: out.print(_clean(f"{host}: agent up on {r['data_dir']} ({r['fs']}), "
                                                   f"{len(r['instances'])} instance(s), {len(r['snapshots'])} snapshot(s)")))

    @fleet.command("leave")
    @click.argument("host")
    @pass_ctx
    def fleet_leave(c: Ctx, host: str) -> None:
        """Stop HOST's agent (its instances keep running on it; a later join takes them up)."""
        with connected(c) as f:
            f.leave(host)
        out.print(_clean(f"{host}: agent stopped"))

    @fleet.command("hosts")
    @json_opt
    @pass_ctx
    def fleet_hosts(c: Ctx, as_json: bool) -> None:
        """Hosts: up or down, CPUs, free memory and disk, instances, snapshots held."""
        with connected(c) as f:
            rows = f.hosts()

        def human() -> None:
            _print_table(("HOST", "STATE", "CPUS", "MEM FREE", "DISK FREE", "FS", "INSTANCES", "SNAPSHOTS"),
                         [(r["host"], "up" if r["up"] else "down", str(r["cpus"] or "-"), _mib(r["mem_available"]),
                           _mib(r["disk_free"]), str(r["fs"] or "-"), str(r["instances"]),
                           ", ".join(r["snapshots"]) or "-") for r in rows])
            for r in rows:
                if r["problem"]:
                    out.print(_clean(f"{r['host']}: {r['problem']}"))

        _emit(as_json, rows, human)

    @fleet.command("ps")
    @json_opt
    @pass_ctx
    def fleet_ps(c: Ctx, as_json: bool) -> None:
        """Instances across hosts, with their host. Those of a host that is down are 'lost'."""
        with connected(c) as f:
            rows = f.ps()

        def human() -> None:
            _print_table(("NAME", "HOST", "STATE", "MEMORY", "PARENT"),
                         [(r["name"], r["host"], r["state"], f"{r['memory_mib']}M", r["parent"] or "-") for r in rows])

        _emit(as_json, rows, human)

    @fleet.command("fork")
    @click.argument("snap")
    @click.argument("name", required=False)
    @click.option("--count", type=int, default=1, show_default=True, help="How many forks (NAME-1 ... NAME-N).")
    @click.option("--per-host", type=int, default=None, help="Most instances a host may hold [default: memory and disk decide].")
    @click.option("--target-state", type=click.Choice(["running", "standby", "stopped"]), default="running",
                  show_default=True)
    @json_opt
    @pass_ctx
    def fleet_fork(c: Ctx, snap: str, name: str | None, count: int, per_host: int | None, target_state: str,
                   as_json: bool) -> None:
        """Fork snapshot SNAP COUNT times across the hosts (NAME defaults to SNAP): on hosts that
        hold it first, replicating it to more hosts when those are full. Prints where each
        fork landed, and names each fork that failed, with why (exit 1 if any did)."""
        with connected(c) as f:
            r = f.fork(snap, name or snap, count=count, per_host=per_host, target_state=target_state)

        def human() -> None:
            for x in r.replicated:
                out.print(_clean(f"replicated {snap} {x['source']} -> {x['target']}: "
                                 + (f"failed: {x['error']}" if "error" in x else
                                    f"{int(x['bytes']) >> 20} MiB in {x['seconds']:.2f}s")))
            for x in r.forks:
                out.print(_clean(f"{x['name']}: {x['host']} ({x['state']})"))
            for n, why in r.failed.items():
                out.print(_clean(f"{n}: failed: {why}"))
            out.print(f"{len(r.forks)} of {count} fork(s) in {r.timings['total_s']:.2f}s")

        _emit(as_json, r.to_json(), human)
        if r.failed:
            sys.exit(1)

    @fleet.command("exec", context_settings={"ignore_unknown_options": True})
    @click.argument("name")
    @click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
    @click.option("--timeout", type=float, default=None, help="Kill the command after this many seconds (exit 124).")
    @pass_ctx
    def fleet_exec(c: Ctx, name: str, command: tuple[str, ...], timeout: float | None) -> None:
        """Run COMMAND in NAME's guest on whatever host holds it; exits with its exit code.

        Usage: vmfork fleet exec NAME -- CMD [ARGS...]
        """
        with connected(c) as f:
            r = f.exec(name, list(command), timeout=timeout)
        sys.stdout.buffer.write(r["stdout"])
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(r["stderr"])
        if r["timed_out"]:
            err.print(_clean(f"vmfork: '{' '.join(command)}' timed out after {timeout}s in '{name}'"))
        sys.exit(int(r["exit_code"]))

    def routed(verb: str, doc: str) -> None:
        @fleet.command(verb, help=doc)
        @click.argument("name")
        @json_opt
        @pass_ctx
        def cmd(c: Ctx, name: str, as_json: bool) -> None:
            with connected(c) as f:
                r = getattr(f, verb)(name)
            _emit(as_json, {"name": name, **r}, lambda: out.print(_clean(f"{name} on {r['host']}: {verb} done")))

    routed("standby", "Put NAME in standby, on its host.")
    routed("restore", "Restore NAME from its standby snapshot, on its host.")

    @fleet.command("rm")
    @click.argument("names", nargs=-1, required=True)
    @click.option("-f", "--force", is_flag=True, help="Also remove running instances.")
    @pass_ctx
    def fleet_rm(c: Ctx, names: tuple[str, ...], force: bool) -> None:
        """Delete instances, each on its host."""
        with connected(c) as f:
            for n in names:
                host = f.rm(n, force)
                out.print(_clean(f"{n}: removed from {host}"))

    @fleet.group("snapshot")
    def fleet_snapshot() -> None:
        """Named snapshots across the fleet."""

    @fleet_snapshot.command("replicate")
    @click.argument("snap")
    @click.option("--to", "to", type=int, required=True, help="How many hosts must hold SNAP.")
    @json_opt
    @pass_ctx
    def fleet_replicate(c: Ctx, snap: str, to: int, as_json: bool) -> None:
        """Make SNAP held by TO hosts: its export archive is streamed host to host in chunks,
        every digest checked on arrival before it becomes visible there."""
        with connected(c) as f:
            r = f.replicate(snap, to)

        def human() -> None:
            for x in r["copies"]:
                out.print(_clean(f"{snap}: {x['source']} -> {x['target']}, {int(x['bytes']) >> 20} MiB in {x['seconds']:.2f}s"))
            for h, why in r["failed"].items():
                out.print(_clean(f"{snap}: to {h} failed: {why}"))
            out.print(_clean(f"{snap} is held by: {', '.join(r['holders'])}"))

        _emit(as_json, r, human)
        if r["failed"]:
            sys.exit(1)
