"""vmfork: a microVM manager built on fork-from-snapshot with copy-on-write isolation."""

from __future__ import annotations

__version__ = "0.1.0"

# typing is imported by the type checker only: this module is on the path of `vmfork ps
# --json` and `--version`, which Python's start-up alone should dominate.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    """``vmfork.Client`` / ``vmfork.AsyncClient``: imported on first use (the CLI never pays
    for httpx and pydantic)."""
    if name in ("Client", "AsyncClient"):
        from vmfork import client

        return getattr(client, name)
    raise AttributeError(f"module 'vmfork' has no attribute {name!r}")
