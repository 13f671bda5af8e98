"""Instances: metadata, derived state, lifecycle, forks.

``Manager`` and ``Instance`` are imported on first use: ``vmfork ps --json`` reads states
through ``instances.view`` without paying for the Manager's imports.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing only for the type checker (see vmfork/__init__.py)
if TYPE_CHECKING:
    from typing import Any

    from vmfork.instances.manager import Manager
    from vmfork.instances.model import Instance

__all__ = ["Instance", "Manager"]


def __getattr__(name: str) -> Any:
    if name == "Manager":
        from vmfork.instances.manager import Manager

        return Manager
    if name == "Instance":
        from vmfork.instances.model import Instance

        return Instance
    raise AttributeError(f"module 'vmfork.instances' has no attribute {name!r}")
