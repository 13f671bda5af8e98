"""vmfork: a microVM manager built on fork-from-snapshot with copy-on-write isolation."""

__version__ = "0.1.0"

from typing import Any

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    """``vmfork.Client`` / ``vmfork.AsyncClient``: imported on first use (the CLI never pays
    for httpx and pydantic)."""
    if name in ("Client", "AsyncClient"):
        from vmfork import client

        return getattr(client, name)
    raise AttributeError(f"module 'vmfork' has no attribute {name!r}")
