"""Running iproute2 and nft, in vmfork's namespace or inside an instance's.

A command for an instance's namespace is started with ``setns`` into ``/run/netns/<name>``
in the child (before exec), which can also set that namespace's sysctls first: cheaper
than ``ip netns exec`` (no mount namespace, no remount of /sys). Errors of the tools reach
the user with their own message (ExternalToolError).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable

from vmfork.errors import ExternalToolError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


def enter(name: str, sysctls: dict[str, str] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: join namespace ``name``, then write ``sysctls`` (paths under
    /proc/sys, which shows the joined namespace's values)."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = netns_path(name)
    items = list((sysctls or {}).items())

    def setup() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns {path}: {os.strerror(e)}")
        finally:
            os.close(fd)
        for key, value in items:
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    return setup


def run(argv: list[str], *, stdin: str | None = None, netns: str | None = None,
        sysctls: dict[str, str] | None = None, tool: str | None = None) -> str:
    """Run ``argv`` (in ``netns`` if given); its stdout, or ExternalToolError with its message."""
    name = tool or argv[0]
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                           env={**os.environ, "LC_ALL": "C"},
                           preexec_fn=enter(netns, sysctls) if netns else None)
    except FileNotFoundError:
        raise ExternalToolError(name, f"{argv[0]} not found (install iproute2 and nftables: make setup)") from None
    except subprocess.SubprocessError as e:  # the preexec failed (no such namespace)
        raise ExternalToolError(name, f"cannot enter network namespace {netns}: {e}") from None
    if p.returncode != 0:
        msg = p.stderr.strip() or p.stdout.strip() or f"exit status {p.returncode}"
        raise ExternalToolError(name, " | ".join(x for x in msg.splitlines() if x.strip())[:2000])
    return p.stdout


def start(argv: list[str], *, stdin: str, netns: str | None = None,
          sysctls: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``argv`` (fed ``stdin``) without waiting; ``finish`` collects it."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "LC_ALL": "C"},
                         preexec_fn=enter(netns, sysctls) if netns else None)
    assert p.stdin is not None
    p.stdin.write(stdin)
    p.stdin.close()
    p.stdin = None  # communicate() must not flush it again
    return p


def finish(p: subprocess.Popen[str], tool: str) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        msg = (err or "").strip() or f"exit status {p.returncode}"
        raise ExternalToolError(tool, " | ".join(x for x in msg.splitlines() if x.strip())[:2000])
