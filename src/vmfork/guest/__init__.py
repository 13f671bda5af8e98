"""Host side of the guest agent: wire protocol, client, exec mux.

The client is imported lazily, so that the exec mux process (``guest/mux.py``), which
needs only the protocol, stays small.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing would cost the mux ~2 MB
if TYPE_CHECKING:
    from typing import Any

    from vmfork.guest.agent import AgentClient, ExecResult, wait_ready

__all__ = ["AgentClient", "ExecResult", "wait_ready"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vmfork.guest import agent

        return getattr(agent, name)
    raise AttributeError(f"module 'vmfork.guest' has no attribute {name!r}")
