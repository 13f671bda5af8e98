"""Address leases: one /30 per instance, recorded in the data dir; checks against the host's
routes (read from this host's table; a collision is shown with a stand-in route table,
since adding a route here would change the host) and against ports in use."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest

from vmfork.errors import InvalidArgument
from vmfork.network import leases
from vmfork.network.spec import NetSpec, PortMap, build


@pytest.fixture(autouse=True)
def _needs_ip() -> None:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (make setup)")


def free_subnet() -> str:
    """A /24 that no route of this host touches."""
    taken = [net for net, _ in leases.routes()]
    for i in range(0, 256):
        net = ipaddress.IPv4Network(f"10.{200 + i // 64}.{i % 64 * 4}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    pytest.skip("no free 10.x /24 on this host")


def test_each_instance_gets_its_own_block_and_a_freed_one_is_reused(tmp_path: Path) -> None:
    spec = build("default", subnet=free_subnet())
    a = leases.allocate(tmp_path, "aaaaaaaaaaaa", spec)
    b = leases.allocate(tmp_path, "bbbbbbbbbbbb", spec)
    assert a.ip != b.ip and a.gateway != b.gateway
    assert ipaddress.IPv4Address(a.ip) in ipaddress.IPv4Network(a.subnet)
    assert (a.netns, a.veth) == ("vmfork-aaaaaaaaaaaa", "vfaaaaaaaaaaaa") and len(a.veth) <= 15
    assert leases.read(tmp_path, "aaaaaaaaaaaa") == a
    leases.remove(tmp_path, "aaaaaaaaaaaa")
    c = leases.allocate(tmp_path, "cccccccccccc", spec)
    assert c.ip == a.ip  # the freed block
    assert sorted(leases.lease_ids(tmp_path)) == ["bbbbbbbbbbbb", "cccccccccccc"]


def test_a_full_pool_and_the_data_dir_setting(tmp_path: Path) -> None:
    sub = ipaddress.IPv4Network(free_subnet())
    small = str(next(sub.subnets(new_prefix=29)))  # two /30s
    leases.set_config(tmp_path, small)
    spec = NetSpec(mode="default")
    assert leases.allocate(tmp_path, "aaaaaaaaaaaa", spec).subnet == small
    leases.allocate(tmp_path, "bbbbbbbbbbbb", spec)
    with pytest.raises(InvalidArgument, match=f"subnet {small} has no free address left"):
        leases.allocate(tmp_path, "cccccccccccc", spec)


def test_a_pool_that_collides_with_a_route_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # stand-in route table (a route of a host's LAN inside the pool)
    monkeypatch.setattr(leases, "routes", lambda: [(ipaddress.IPv4Network("10.213.5.0/24"), "eth0")])
    with pytest.raises(InvalidArgument, match=r"subnet 10.213.0.0/16 collides with the host's route to "
                                              r"10.213.5.0/24 \(dev eth0\): choose another with --subnet"):
        leases.allocate(tmp_path, "aaaaaaaaaaaa", NetSpec(mode="default"))
    assert leases.lease_ids(tmp_path) == []
    # another data dir's instance (a vf* veth) only takes its own block
    monkeypatch.setattr(leases, "routes", lambda: [(ipaddress.IPv4Network("10.213.0.0/30"), "vfzzzzzzzzzzzz")])
    assert leases.allocate(tmp_path, "aaaaaaaaaaaa", NetSpec(mode="default")).ip == "10.213.0.6"


def test_ports_in_use_or_published_are_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(InvalidArgument, match=f"host port {port}/tcp is in use"):
            leases.check_ports(tmp_path, "aaaaaaaaaaaa", (PortMap(port, 80, "tcp", "127.0.0.1"),))
    spec = build("default", [f"{port}:80"], subnet=free_subnet())
    leases.allocate(tmp_path, "aaaaaaaaaaaa", spec)
    with pytest.raises(InvalidArgument, match="already published by instance aaaaaaaaaaaa"):
        leases.check_ports(tmp_path, "bbbbbbbbbbbb", (PortMap(port, 81, "tcp", "127.0.0.1"),))
    leases.check_ports(tmp_path, "bbbbbbbbbbbb", (PortMap(port, 81, "udp"),))  # udp: another port
    assert os.path.exists(tmp_path / "network" / "leases" / "aaaaaaaaaaaa.json")
