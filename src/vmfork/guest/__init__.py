"""Host side of the guest agent: wire protocol and client."""

from __future__ import annotations

from vmfork.guest.agent import AgentClient, ExecResult, wait_ready

__all__ = ["AgentClient", "ExecResult", "wait_ready"]
