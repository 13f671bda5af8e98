"""``vmfork snapshot ...``, ``vmfork tree`` and ``vmfork df`` (registered by ``cli.py``)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from vmfork.errors import InvalidArgument, NotFound

Deco = Callable[[Callable[..., None]], Callable[..., None]]
# Ctx is vmfork.cli's (passed in by register): annotations only.
Ctx = Any


def _store(c: Ctx) -> Any:
    """The snapshot store; a data dir that does not exist holds no snapshot (and is not made)."""
    from vmfork.instances.snapshot_ops import store

    if not c.data_dir_exists():
        raise NotFound(f"no snapshots: data dir '{c.data_dir}' does not exist")
    return store(c.mgr)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}M"


def forks_out(cli: Any, as_json: bool, forks: list[Any], t: dict[str, Any], c: Ctx, source: str) -> None:
    _emit, _clean, out = cli._emit, cli._clean, cli.out
    rows = [c.mgr.describe(f) for f in forks]
    d = {"forks": rows, "failed": t.get("failed", {}), "timings": t}

    def human() -> None:
        names = ", ".join(r["name"] for r in rows)
        out.print(_clean(f"{len(rows)} fork(s) of {source}: {names} [{rows[0]['state'] if rows else '-'}], "
                         f"total {t['total_s']:.3f}s"))
        for n, why in t.get("failed", {}).items():
            out.print(_clean(f"{n}: failed: {why}"))

    _emit(as_json, d, human)


def _lines(out: Any, lines: list[str]) -> None:
    for line in lines:
        out.print(line)


def register(cli: Any) -> None:
    """Add the commands to ``cli.main`` (``cli`` is the running ``vmfork.cli`` module: under
    ``python -m vmfork.cli`` that is ``__main__``, so nothing here imports it)."""
    main: click.Group = cli.main
    pass_ctx: Deco = cli.pass_ctx
    json_opt: Deco = cli.json_opt
    overcommit_opt: Deco = cli.overcommit_opt
    out, _emit, _clean = cli.out, cli._emit, cli._clean

    @main.group()
    def snapshot() -> None:
        """Named, immutable snapshots: kept in the data dir apart from any instance, forkable
        after their source is gone. Removing a snapshot never breaks an instance or snapshot
        made from it: forks and rollbacks hold copy-on-write clones of its files."""


    @snapshot.command("create")
    @click.argument("instance")
    @click.argument("snap")
    @json_opt
    @pass_ctx
    def snapshot_create(c: Ctx, instance: str, snap: str, as_json: bool) -> None:
        """Take snapshot SNAP of INSTANCE. A standby instance stays in standby; a running one
        keeps running, paused only while its device state is saved and its RAM file and disk
        are cloned (the pause is printed)."""
        s, t = c.mgr.snapshot_create(instance, snap)
        pause = f", paused {s.pause_ms:.1f} ms" if s.live else ""
        _emit(as_json, {"snapshot": s.to_json(), "dir": str(s.dir), "timings": t},
              lambda: out.print(_clean(f"{s.name} ({s.id}) taken of {s.source_name}{pause}, total {t['total_s']:.3f}s")))


    @snapshot.command("ls")
    @json_opt
    @pass_ctx
    def snapshot_ls(c: Ctx, as_json: bool) -> None:
        """List named snapshots."""
        snaps = _store(c).all() if c.data_dir_exists() else []
        rows = [s.to_json() | {"dir": str(s.dir)} for s in snaps]

        _emit(as_json, rows, lambda: cli._print_table(("NAME", "ID", "SOURCE", "CREATED", "MEMORY", "SIZE", "LIVE"), (
            (s.name, s.id, s.source_name, s.created_at, f"{s.memory_mib}M", _mib(s.logical_bytes),
             "yes" if s.live else "no") for s in snaps)))


    @snapshot.command("inspect")
    @click.argument("snap")
    @json_opt
    @pass_ctx
    def snapshot_inspect(c: Ctx, snap: str, as_json: bool) -> None:
        """Show snapshot SNAP: metadata, files, and its space (as in 'vmfork df')."""
        if not c.data_dir_exists():
            raise NotFound(f"snapshot '{snap}' not found")
        from vmfork.instances.snapshot_ops import df

        st = _store(c)
        s = st.find(snap)
        space = next((r for r in df(c.mgr)["items"] if r["kind"] == "snapshot" and r["id"] == s.id), None)
        d = s.to_json() | {"dir": str(s.dir), "problem": st.quick_problem(s), "space": space}

        def human() -> None:
            for k, v in d.items():
                out.print(_clean(f"{k:14} {json.dumps(v) if isinstance(v, dict) else v}"))

        _emit(as_json, d, human)


    @snapshot.command("rm")
    @click.argument("snaps", nargs=-1, required=True)
    @json_opt
    @pass_ctx
    def snapshot_rm(c: Ctx, snaps: tuple[str, ...], as_json: bool) -> None:
        """Remove snapshots. Instances forked from them and snapshots taken after them keep
        working: their files are their own clones."""
        st = _store(c)
        for n in snaps:
            st.rm(n)
            if not as_json:
                out.print(_clean(f"{n}: removed"))
        if as_json:
            click.echo(json.dumps({"removed": list(snaps)}))


    _count_opt = click.option("--count", type=int, default=None,
                              help="Make N forks, NAME-1 ... NAME-N, in one pass (1 to 100).")
    _partial_opt = click.option("--partial", is_flag=True,
                                help="With --count: keep the forks that succeeded if some fail (listed in the result).")


    @snapshot.command("fork")
    @click.argument("snap")
    @click.argument("name")
    @_count_opt
    @click.option("--target-state", type=click.Choice(["running", "standby", "stopped"]), default="standby",
                  show_default=True, help="State of the forks.")
    @_partial_opt
    @overcommit_opt
    @json_opt
    @pass_ctx
    def snapshot_fork(c: Ctx, snap: str, name: str, count: int | None, target_state: str, partial: bool,
                      overcommit: bool, as_json: bool) -> None:
        """Fork snapshot SNAP into new instance NAME (or NAME-1 ... NAME-N): all or none."""
        if count is None and partial:
            raise InvalidArgument("--partial goes with --count")
        forks, t = c.mgr.snapshot_fork(snap, name, count=count, target_state=target_state, partial=partial,
                                       overcommit=overcommit)
        forks_out(cli, as_json, forks, t, c, snap)


    @snapshot.command("verify")
    @click.argument("snap")
    @json_opt
    @pass_ctx
    def snapshot_verify(c: Ctx, snap: str, as_json: bool) -> None:
        """Recompute the digest of every file of SNAP and compare with those recorded when it was taken."""
        st = _store(c)
        s = st.find(snap)
        t0 = time.monotonic()
        rows = st.verify(s)
        ok = all(r["ok"] for r in rows)
        secs = time.monotonic() - t0

        def human() -> None:
            for r in rows:
                out.print(_clean(f"{r['file']:12} {'ok' if r['ok'] else 'MISMATCH'}  {r['size']} bytes"))
            out.print(_clean(f"{s.name}: {'intact' if ok else 'CORRUPT'} ({secs:.2f}s)"))

        _emit(as_json, {"name": s.name, "id": s.id, "ok": ok, "files": rows, "seconds": round(secs, 3)}, human)
        if not ok:
            sys.exit(1)


    @snapshot.command("export")
    @click.argument("snap")
    @click.option("-o", "--output", required=True, help="Archive file to write, or - for stdout.")
    @click.option("--with-image", is_flag=True, help="Include the guest image the snapshot needs.")
    @pass_ctx
    def snapshot_export(c: Ctx, snap: str, output: str, with_image: bool) -> None:
        """Write SNAP as one archive (tar, zstd, sparse: holes are not stored). Progress on stderr."""
        import os

        from vmfork.snapshots.archive import export

        st = _store(c)
        s = st.find(snap)
        image_dir = c.mgr.image(s.image_digest).dir if with_image else None
        if output == "-":
            if sys.stdout.isatty():
                raise InvalidArgument("refusing to write an archive to a terminal: use -o FILE or a pipe")
            export(st, s, sys.stdout.buffer, image_dir=image_dir, progress=c.progress)
            return
        tmp = f"{output}.partial-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                export(st, s, f, image_dir=image_dir, progress=c.progress)
            os.replace(tmp, output)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        except OSError as e:  # pragma: no cover - covered by BaseException above
            raise InvalidArgument(f"cannot write '{output}': {e.strerror}") from None


    @snapshot.command("import")
    @click.argument("archive")
    @click.option("--name", default=None, help="Name for the imported snapshot [default: its own].")
    @json_opt
    @pass_ctx
    def snapshot_import(c: Ctx, archive: str, name: str | None, as_json: bool) -> None:
        """Import a snapshot archive (- reads stdin). Every digest is checked before it becomes visible."""
        from vmfork.hypervisor import get_hypervisor
        from vmfork.snapshots.archive import import_

        def hv_problem(h: str) -> str | None:
            try:
                return get_hypervisor(h).available()
            except Exception as e:
                return str(e)

        st = _store(c)
        if archive == "-":
            s, t = import_(st, sys.stdin.buffer, name=name, images=c.mgr.dd.images, hypervisor_problem=hv_problem,
                           progress=c.progress)
        else:
            try:
                f = open(archive, "rb")  # noqa: SIM115
            except OSError as e:
                raise InvalidArgument(f"cannot read archive '{archive}': {e.strerror}") from None
            with f:
                s, t = import_(st, f, name=name, images=c.mgr.dd.images, hypervisor_problem=hv_problem,
                               progress=c.progress)
        _emit(as_json, {"snapshot": s.to_json(), "dir": str(s.dir), "timings": t},
              lambda: out.print(_clean(f"{s.name} ({s.id}) imported in {t['seconds']:.2f}s")))


    @snapshot.command("prune")
    @click.argument("instance")
    @click.option("--keep-last", type=int, default=None, help="Keep the N newest snapshots of INSTANCE.")
    @click.option("--older-than", default=None, help="Only remove those older than this (e.g. 12h, 7d).")
    @click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
    @json_opt
    @pass_ctx
    def snapshot_prune(c: Ctx, instance: str, keep_last: int | None, older_than: str | None, dry_run: bool,
                       as_json: bool) -> None:
        """Remove snapshots of INSTANCE (by name or id; it may be gone) by count and/or age."""
        from vmfork.instances.snapshot_ops import prune

        gone = prune(c.mgr, instance, keep_last=keep_last, older_than=older_than, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        _emit(as_json, {"dry_run": dry_run, "snapshots": [s.name for s in gone]},
              lambda: out.print(_clean(f"{verb} {len(gone)}: {', '.join(s.name for s in gone) or '-'}")))


    @main.command()
    @json_opt
    @pass_ctx
    def tree(c: Ctx, as_json: bool) -> None:
        """Instances and snapshots as one lineage tree (deleted ancestors shown as deleted)."""
        from vmfork.instances.snapshot_ops import tree as build_tree
        from vmfork.snapshots.lineage import render

        roots = build_tree(c.mgr) if c.data_dir_exists() else []
        _emit(as_json, [r.to_json() for r in roots], lambda: _lines(out, [_clean(line) for line in render(roots)]))


    @main.command()
    @json_opt
    @pass_ctx
    def df(c: Ctx, as_json: bool) -> None:
        """Disk use per instance, snapshot and image: logical, allocated, shared with others vs
        exclusive (FIEMAP), what rm would free, and the totals."""
        from vmfork.instances.snapshot_ops import df as account

        rep = account(c.mgr) if c.data_dir_exists() else {"items": [], "totals": {}}

        def human() -> None:
            from rich.table import Table

            t = Table(box=None, pad_edge=False)
            for col in ("KIND", "NAME", "LOGICAL", "ALLOCATED", "SHARED", "EXCLUSIVE", "RM FREES"):
                t.add_column(col, justify="left" if col in ("KIND", "NAME") else "right")
            for r in rep["items"]:
                t.add_row(r["kind"], _clean(r["name"]), _mib(r["logical_bytes"]), _mib(r["allocated_bytes"]),
                          _mib(r["shared_bytes"]), _mib(r["exclusive_bytes"]), _mib(r["freed_by_rm_bytes"]))
            tot = rep["totals"]
            if tot:
                t.add_row("total", "", _mib(tot["logical_bytes"]), _mib(tot["allocated_bytes"]), "", "",
                          f"on disk {_mib(tot['physical_bytes'])}")
            out.print(t)

        _emit(as_json, rep, human)
