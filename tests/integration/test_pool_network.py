"""A warm pool (issue 16) for a source with a network (issue 13): each slot has its own
namespace and lease from the start, a fork made of it answers at its own address with its
own hostname beside its source, and a fork killed while it claims its slot, a drain, and an
``rm`` of the source leave no namespace and no lease. Traffic stays in the module's own
namespace (``test_network``'s fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.integration.test_network import NsCLI, cli, fetch, leftovers, ns, ours
from tests.integration.test_pool import _clean

__all__ = ["cli", "ns"]  # module-scoped fixtures of test_network, used here
pytestmark = [pytest.mark.vm]

HTTPD = ("mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nhostname\\n' "
         ">/www/cgi-bin/name && chmod +x /www/cgi-bin/name && httpd -p 80 -h /www")


def _killed(cli: NsCLI, args: list[str], point: str) -> None:
    """``vmfork ARGS`` in the module's namespace, SIGKILLed at crashpoint ``point``."""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{cli.ns}", sys.executable, "-m", "vmfork.cli",
                        "--data-dir", str(cli.data_dir), "-q", *args], capture_output=True, timeout=300,
                       env=os.environ | {"VMFORK_CRASHPOINT": point})
    assert r.returncode == -9, (point, r.returncode, r.stderr)


def _pool(cli: NsCLI) -> list[dict[str, Any]]:
    return cli.json("pool", "ls")  # type: ignore[return-value]


def test_pooled_forks_with_a_network(cli: NsCLI) -> None:
    before = ours(leftovers(cli), cli)
    cli("run", "nsrc", "--network", "default")
    cli.sh("nsrc", HTTPD)
    cli("standby", "nsrc")
    base = ours(leftovers(cli), cli)
    cli("pool", "fill", "nsrc", "--size", "2")
    slots = _pool(cli)
    during = ours(leftovers(cli), cli)
    assert len(during["leases"]) == len(base["leases"]) + 2  # each slot: its own lease and namespace
    assert {f"vmfork-{s['id']}" for s in slots} <= set(during["netns"])

    forks = [cli.json("fork", "nsrc", n, "--target-state", "running") for n in ("np1", "np2")]
    assert [f["timings"]["clone_method"] for f in forks] == ["pool", "pool"]  # type: ignore[index]
    cli("restore", "nsrc")
    ips = {n: cli.inspect(n)["network"]["ip"] for n in ("nsrc", "np1", "np2")}
    assert len(set(ips.values())) == 3
    for n, ip in ips.items():
        assert fetch(cli.ns, f"http://{ip}/cgi-bin/name") == n
    cli("rm", "--force", "np1", "np2")
    cli("standby", "nsrc")
    assert ours(leftovers(cli), cli) == base

    # a fork killed while it claims its slot: rolled back, its namespace and lease gone
    for point in ("pool:claimed", "pool:loaded"):
        cli("pool", "fill", "nsrc", "--size", "1")
        _killed(cli, ["fork", "nsrc", "nk", "--target-state", "running"], point)
        cli("ps")
        assert ours(leftovers(cli), cli) == base, point
    _clean(cli)
    # drain, and rm of the source, take the slots' namespaces and leases
    cli("pool", "fill", "nsrc", "--size", "1")
    cli("pool", "drain", "nsrc")
    assert ours(leftovers(cli), cli) == base
    cli("pool", "fill", "nsrc", "--size", "1")
    cli("rm", "nsrc")
    assert _pool(cli) == []
    assert ours(leftovers(cli), cli) == before
