"""A fleet of vmfork hosts on Ray.

- ``agent``: the host agent, one per host, owner of that host's data dir (no Ray in it);
- ``placement``: the pluggable placement policy (``HoldersFirst`` by default);
- ``stream``: a snapshot's export archive as chunks, and back;
- ``ray_adapter``: everything Ray-specific (the only module that imports Ray);
- ``client``: ``Fleet(address)``, which ``vmfork fleet ...`` uses.

Nothing here imports Ray until a ``Fleet`` is made.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Fleet":
        from vmfork.fleet.client import Fleet

        return Fleet
    raise AttributeError(name)
