"""The real guest agent (agent.c) compiled for the host and run in its test mode
(``--listen-unix PATH``): it serves the protocol on a unix socket, runs commands on the
host, and never sets the clock or powers off."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmfork.guest.agent import AgentClient, wait_ready
from vmfork.images.build import compile_agent


@dataclass
class AgentServer:
    sock: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("musl-gcc") or shutil.which("gcc")):
        pytest.skip("no C compiler (musl-gcc or gcc) to build the agent")
    out = tmp_path_factory.mktemp("agent") / "vmfork-agent"
    compile_agent(out)
    return out


@pytest.fixture
def agent_server(agent_bin: Path, tmp_path: Path) -> Iterator[AgentServer]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([str(agent_bin), "--listen-unix", str(sock)], stderr=subprocess.PIPE)
    try:
        wait_ready(lambda: AgentClient.connect_unix(sock, 1.0), 10.0,
                   alive=lambda: proc.poll() is None).close()  # it listens and answers
        yield AgentServer(sock, proc)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def agent(agent_server: AgentServer) -> Path:
    return agent_server.sock
