"""``vmfork image pull|import|ls|rm|build`` (registered by ``cli.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

Deco = Callable[[Callable[..., None]], Callable[..., None]]
Ctx = Any  # vmfork.cli's (passed in by register): annotations only.
_CLI: Any = None  # the running vmfork.cli module, set by register


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}M"


def describe(c: Ctx, im: Any) -> dict[str, Any]:
    return {"refs": list(im.refs), "digest": im.digest, "fs": im.fs,
            "size": int(im.meta.get("rootfs_allocated_bytes", 0)),
            "compressed_size": int(im.meta.get("compressed_size", 0)),
            "created": im.meta.get("created"), "dir": str(im.dir),
            "used_by": c.view.image_users(im.digest) if c.data_dir_exists() else [],
            "pull_seconds": im.meta.get("pull_seconds"), "convert_seconds": im.meta.get("convert_seconds")}


def oci_rows(c: Ctx) -> list[dict[str, Any]]:
    if not c.data_dir_exists():
        return []
    return [{"kind": "oci"} | describe(c, im) for im in c.view.oci_store().images()]


def oci_table(c: Ctx, rows: list[dict[str, Any]]) -> None:
    _clean, out = _CLI._clean, _CLI.out
    if not rows:
        return
    from rich.table import Table

    t = Table(box=None)
    for col in ("REF", "DIGEST", "FS", "SIZE", "CREATED", "USED BY"):
        t.add_column(col)
    for r in rows:
        t.add_row(_clean(", ".join(r["refs"]) or "<none>"), r["digest"][7:19], r["fs"], _mib(r["size"]),
                  str(r["created"]), _clean(", ".join(r["used_by"])))
    out.print(t)


def build_debian(c: Ctx, packages: list[str], tag: str | None, suite: str | None, as_json: bool) -> None:
    from vmfork.errors import InvalidArgument
    from vmfork.images import debian

    if not tag:
        raise InvalidArgument("'vmfork image build debian' needs --tag NAME")
    t0 = time.monotonic()
    archive = debian.build(packages, suite=suite, progress=c.progress)
    _done(c, as_json, c.mgr.oci_store().import_(f"oci-archive:{archive}", tag), t0)


def _done(c: Ctx, as_json: bool, im: Any, t0: float) -> None:
    _clean, _emit, out = _CLI._clean, _CLI._emit, _CLI.out
    d = describe(c, im) | {"seconds": round(time.monotonic() - t0, 3)}
    _emit(as_json, d, lambda: out.print(_clean(
        f"{', '.join(im.refs) or im.short} {im.digest} ({im.fs}, {_mib(d['size'])}) in {d['seconds']:.1f}s")))


def register(cli: Any) -> None:
    """Add the commands to ``cli.image`` (``cli`` is the running ``vmfork.cli`` module: under
    ``python -m vmfork.cli`` that is ``__main__``, so nothing here imports it)."""
    global _CLI
    _CLI = cli
    pass_ctx: Deco = cli.pass_ctx
    json_opt: Deco = cli.json_opt
    out, _emit, _clean = cli.out, cli._emit, cli._clean

    fs_opt = click.option("--fs", type=click.Choice(["ext4", "erofs"]), default="ext4", show_default=True,
                          help="The root filesystem format (ext4 measured best here: docs/images.md).")
    image: click.Group = cli.image  # 'build' and 'ls' are cli.py's (built-in and OCI images)

    @image.command("pull")
    @click.argument("ref")
    @click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS for this registry "
                  "(always allowed for localhost and 127.0.0.1).")
    @fs_opt
    @json_opt
    @pass_ctx
    def image_pull(c: Ctx, ref: str, insecure: bool, fs: str, as_json: bool) -> None:
        """Pull REF (e.g. 127.0.0.1:5000/app:1) for linux/amd64. Credentials come from
        REGISTRY_AUTH_FILE, ~/.docker/config.json or containers' auth.json."""
        t0 = time.monotonic()
        _done(c, as_json, c.mgr.oci_store().pull(ref, insecure=insecure, fmt=fs), t0)

    @image.command("import")
    @click.argument("source")
    @click.option("--tag", default=None, help="The name to give it (e.g. myapp:1).")
    @fs_opt
    @json_opt
    @pass_ctx
    def image_import(c: Ctx, source: str, tag: str | None, fs: str, as_json: bool) -> None:
        """Import a local image: oci-archive:FILE, oci:DIR[:TAG] or docker-archive:FILE."""
        t0 = time.monotonic()
        _done(c, as_json, c.mgr.oci_store().import_(source, tag, fmt=fs), t0)

    @image.command("rm")
    @click.argument("ref")
    @json_opt
    @pass_ctx
    def image_rm(c: Ctx, ref: str, as_json: bool) -> None:
        """Remove image REF (all its refs); refused while an instance or snapshot uses it."""
        im = c.mgr.oci_store().remove(ref, c.mgr.image_users)
        _emit(as_json, {"removed": im.digest, "refs": list(im.refs)},
              lambda: out.print(_clean(f"removed {', '.join(im.refs) or im.short} ({im.digest})")))
