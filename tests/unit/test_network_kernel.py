"""The in-process namespace and TAP (``vmfork.network.kernel``) and the routes read from
/proc (``leases.routes``), in throwaway network namespaces of the test's own (random names,
removed at the end); no traffic."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork.errors import ExternalToolError
from vmfork.network import kernel, leases
from vmfork.network.cmd import NETNS_DIR, netns_path


@pytest.fixture(autouse=True)
def _needs_root_and_ip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (make setup)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun (modprobe tun)")


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"vmfork-t{secrets.token_hex(6)}"
    yield name
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def ip_json(ns: str, *args: str) -> list[dict[str, object]]:
    out = json.loads(subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                                    check=True).stdout or "[]")
    assert isinstance(out, list)
    return out


def my_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def test_make_gives_a_namespace_with_its_tap_and_the_caller_stays_where_it_was(ns: str) -> None:
    before = my_netns()
    kernel.make(ns, "tap0", 4321, "172.16.0.1", 30)
    assert my_netns() == before
    assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    (tap,) = ip_json(ns, "-d", "link", "show", "tap0")
    info = tap["linkinfo"]["info_data"]  # type: ignore[index]
    assert (info["type"], info["pi"], info["persist"], info["user"]) == ("tap", False, True, 4321)
    assert "UP" in tap["flags"]  # type: ignore[operator]
    (addr,) = ip_json(ns, "-4", "addr", "show", "tap0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("172.16.0.1", 30)]  # type: ignore[index, union-attr]
    (lo,) = ip_json(ns, "link", "show", "lo")
    assert "UP" in lo["flags"]  # type: ignore[operator]
    # a name taken: refused with its reason, the namespace there is kept
    with pytest.raises(ExternalToolError, match=f"network namespace {ns}, namespace: File exists"):
        kernel.make(ns, "tap0", 0, "172.16.0.1", 30)
    assert my_netns() == before and ip_json(ns, "link", "show", "tap0")


def test_a_background_thread_joins_a_namespace_its_processes_and_ioctls_act_there(ns: str) -> None:
    kernel.make(ns, "tap0", 0, "172.16.0.1", 30)
    peer = f"vt{secrets.token_hex(6)}"
    subprocess.run(["ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns], check=True)
    before = my_netns()
    seen: list[str] = []

    def inside() -> None:
        import socket

        kernel.join(ns)
        seen.append(subprocess.run(["ip", "-j", "link", "show", "eth0"], capture_output=True, text=True,
                                   check=True).stdout)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            kernel.set_addr(sock, "eth0", "10.213.7.2", 30)
            kernel.set_up(sock, "eth0")
            kernel.add_default_route(sock, "10.213.7.1")
        seen.extend(str(n) for n, _ in leases.routes())  # read from the thread's namespace

    try:
        kernel.Background(inside).wait()
        assert my_netns() == before
        assert '"ifname":"eth0"' in seen[0]
        assert sorted(seen[1:]) == ["10.213.7.0/30", "172.16.0.0/30"]
        default = [(r["gateway"], r["dev"]) for r in ip_json(ns, "-4", "route", "show") if r["dst"] == "default"]
        assert default == [("10.213.7.1", "eth0")]
        (addr,) = ip_json(ns, "-4", "addr", "show", "eth0")
        assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.213.7.2", 30)]  # type: ignore[index, union-attr]
    finally:
        subprocess.run(["ip", "link", "delete", peer], capture_output=True, check=False)


def test_a_failure_in_the_background_reaches_wait() -> None:
    def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        kernel.Background(boom).wait()


SETUP = """link set lo up
link add d1 type veth peer name d1p
link set d1p up
link set d1 up
addr add 10.213.4.5/24 dev d1
addr add 10.50.0.9/32 dev d1 noprefixroute
route add 10.60.0.0/16 via 10.213.4.1
route add blackhole 10.70.0.0/16
route add unreachable 10.80.0.0/16
link add vfabcdef type veth peer name q1
addr add 10.213.9.1/30 dev vfabcdef
link set vfabcdef up
link set q1 up
"""


def test_routes_from_proc_match_ip_route_show_table_all(ns: str) -> None:
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=SETUP, text=True, check=True)
    got: dict[str, list[tuple[ipaddress.IPv4Network, str]]] = {}

    def read() -> None:
        kernel.join(ns)
        got["proc"], got["ip"] = leases.routes(), leases._ip_routes()

    kernel.Background(read).wait()
    proc, ip = set(got["proc"]), set(got["ip"])
    # every route ip shows is read, but a host address its own route already covers
    assert {(n, d) for n, d in ip if not any(n != m and n.subnet_of(m) for m, _ in ip)} - {
        (ipaddress.IPv4Network("10.50.0.9/32"), "d1")} <= proc
    assert (ipaddress.IPv4Network("10.50.0.9/32"), "") in proc  # no route covers it: read, device unknown
    assert {n for n, _ in proc} <= {n for n, _ in ip}
    assert {(str(n), d) for n, d in proc if d} >= {("10.60.0.0/16", "d1"), ("10.213.4.0/24", "d1"),
                                                    ("10.213.9.0/30", "vfabcdef")}
    assert {str(n) for n, d in proc if not d} >= {"10.70.0.0/16", "10.80.0.0/16"}
    # a table of its own (policy routing): read with ip, so its routes count too
    subprocess.run(["ip", "-n", ns, "route", "add", "10.90.0.0/16", "dev", "d1", "table", "100"], check=True)
    kernel.Background(read).wait()
    assert got["proc"] == got["ip"]
    assert (ipaddress.IPv4Network("10.90.0.0/16"), "d1") in got["proc"]


def test_what_a_crash_in_the_middle_leaves_is_removed_by_recovery(tmp_path: Path) -> None:
    """A crash after the namespace file was made but before it was mounted, and one after
    the namespace and TAP but before the veth: the recovery of the next command (``clean``
    of leases whose instance is gone) leaves no namespace and no lease."""
    from vmfork import network
    from vmfork.network.spec import NetSpec

    spec = NetSpec(mode="default", subnet="10.251.0.0/24")
    a = leases.allocate(tmp_path, secrets.token_hex(6), spec)
    b = leases.allocate(tmp_path, secrets.token_hex(6), spec)
    try:
        os.makedirs(NETNS_DIR, exist_ok=True)
        open(netns_path(a.netns), "x").close()  # made, not mounted yet
        kernel.make(b.netns, "tap0", 0, "172.16.0.1", 30)  # namespace and TAP, no veth yet
        assert network.clean(tmp_path, live=set()) == [
            f"removed the network of a gone instance ({x.netns})" for x in sorted((a, b), key=lambda x: x.iid)]
        assert not os.path.exists(netns_path(a.netns)) and not os.path.exists(netns_path(b.netns))
        assert leases.lease_ids(tmp_path) == []
    finally:
        for x in (a, b):
            subprocess.run(["ip", "netns", "delete", x.netns], capture_output=True, check=False)


def test_a_release_before_the_completion_waits_for_the_background_part(ns: str, tmp_path: Path) -> None:
    """A VMM that failed to start: its instance goes without ``complete()``; what the
    background thread was still making is removed too (all of it in ``ns``, the test's)."""
    if shutil.which("nft") is None:
        pytest.skip("nftables is not installed (make setup)")
    from vmfork import network
    from vmfork.network.spec import NetSpec

    subprocess.run(["ip", "netns", "add", ns], check=True)
    iid = secrets.token_hex(6)
    links: list[str] = []

    def inside() -> None:
        kernel.join(ns)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        lease, _ = network.begin(tmp_path, iid, NetSpec(mode="default", subnet="10.251.0.0/24"), 0)
        network.release(tmp_path, iid)  # at once: the veth may not be there yet
        links.append(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout)
        links.append(subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout)
        links.append(lease.netns)

    try:
        kernel.Background(inside).wait()
        assert f"vf{iid}" not in links[0] and f"vmfork-{iid}" not in links[1]
        assert not os.path.exists(netns_path(links[2])) and leases.lease_ids(tmp_path) == []
    finally:
        subprocess.run(["ip", "netns", "delete", f"vmfork-{iid}"], capture_output=True, check=False)
