"""``vmfork serve`` and ``vmfork api-token`` (registered on the CLI like snapshot_cli)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

Deco = Callable[[Callable[..., None]], Callable[..., None]]


def register(cli: Any) -> None:
    main: click.Group = cli.main
    pass_ctx: Deco = cli.pass_ctx

    @main.command()
    @click.option("--listen", default=None, metavar="HOST:PORT",
                  help="Also listen on TCP (every request then needs the bearer token of <data-dir>/api-token).")
    @click.option("--rotate-token", is_flag=True, help="Make a new API token before starting.")
    @pass_ctx
    def serve(c: Any, listen: str | None, rotate_token: bool) -> None:
        """Serve the HTTP API on <data-dir>/vmfork.sock (mode 0600), and on TCP with --listen."""
        from vmfork.api.server import serve as run_server
        from vmfork.paths import DataDir

        DataDir(c.data_dir).ensure()
        run_server(c.data_dir, listen=listen, rotate_token=rotate_token, say=c.progress)

    @main.command("api-token")
    @click.option("--rotate", is_flag=True, help="Replace the token (a running server takes the new one at once).")
    @pass_ctx
    def api_token(c: Any, rotate: bool) -> None:
        """Print the API token of this data dir (made on first use)."""
        from vmfork.api.auth import ensure_token
        from vmfork.paths import DataDir

        DataDir(c.data_dir).ensure()
        click.echo(ensure_token(c.data_dir, rotate=rotate))
