"""Host-side addresses: one /30 per instance from a pool, recorded in the data dir.

``<data dir>/network/leases/<id>.json`` holds an instance's lease: its slot, the instance's
address (the veth end inside its namespace: what the host uses), the host end (the guest's
route out), the namespace and veth names, the network spec and whether its published
ports are forwarded. A lease is written to a temp file and renamed (the commit), under
``locks/network.lock``; it is freed by ``rm`` and by ``recover()`` for instances that are
gone. The pool is ``--subnet``, else the data dir's setting (``network/config.json``,
``{"subnet": "..."}``), else ``DEFAULT_SUBNET``; it is checked against the host's routes.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmfork.errors import InvalidArgument
from vmfork.locking import file_lock
from vmfork.network.spec import DEFAULT_SUBNET, NetSpec, PortMap
from vmfork.util import atomic_write_json


@dataclass(frozen=True)
class Lease:
    iid: str
    slot: int
    subnet: str
    ip: str  # the instance's address (its namespace's veth end)
    gateway: str  # the host's veth end
    netns: str
    veth: str  # host end
    spec: dict[str, Any]
    forwarding: bool = True

    @property
    def net(self) -> NetSpec:
        return NetSpec.from_json(self.spec)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Lease:
        return cls(iid=str(d["iid"]), slot=int(d["slot"]), subnet=str(d["subnet"]), ip=str(d["ip"]),
                   gateway=str(d["gateway"]), netns=str(d["netns"]), veth=str(d["veth"]),
                   spec=dict(d["spec"]), forwarding=bool(d.get("forwarding", True)))


def netns_name(iid: str) -> str:
    return f"vmfork-{iid}"  # the netns name space is machine-wide: the id makes it unique


def veth_name(iid: str) -> str:
    return f"vf{iid}"  # 14 characters (IFNAMSIZ 16)


def net_dir(data_dir: Path) -> Path:
    return data_dir / "network"


def leases_dir(data_dir: Path) -> Path:
    return net_dir(data_dir) / "leases"


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    with file_lock(data_dir / "locks" / "network.lock", what="the network leases", timeout=30):
        yield


def read(data_dir: Path, iid: str) -> Lease | None:
    try:
        return Lease.from_json(json.loads((leases_dir(data_dir) / f"{iid}.json").read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def all_leases(data_dir: Path) -> list[Lease]:
    d = leases_dir(data_dir)
    out = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        lease = read(data_dir, f.name.removesuffix(".json"))
        if lease is not None:
            out.append(lease)
    return out


def lease_ids(data_dir: Path) -> list[str]:
    """Ids of every lease file, unreadable ones too (recovery removes those as well)."""
    d = leases_dir(data_dir)
    return sorted(f.name.removesuffix(".json") for f in d.glob("*.json")) if d.is_dir() else []


def write(data_dir: Path, lease: Lease) -> None:
    d = leases_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_json(d / f"{lease.iid}.json", lease.to_json(), durable=False)


def remove(data_dir: Path, iid: str) -> None:
    (leases_dir(data_dir) / f"{iid}.json").unlink(missing_ok=True)


def pool(data_dir: Path, spec: NetSpec) -> str:
    if spec.subnet:
        return spec.subnet
    try:
        cfg = json.loads((net_dir(data_dir) / "config.json").read_text())
    except FileNotFoundError:
        return DEFAULT_SUBNET
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"unreadable {net_dir(data_dir) / 'config.json'}: {e}") from None
    from vmfork.network.spec import parse_subnet

    return parse_subnet(str(cfg.get("subnet") or DEFAULT_SUBNET)) if isinstance(cfg, dict) else DEFAULT_SUBNET


def routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    """The IPv4 routes of the calling thread's namespace (vmfork's): (destination, device),
    default and loopback left out. Read from /proc (no process on a fork's path): the main
    table from net/route, and from net/fib_trie the host's own addresses that no route of
    the main table covers (device unknown there: ``""``). A host with tables of its own
    (policy routing) is read with ``ip -j route show table all`` instead."""
    try:
        with open("/proc/thread-self/net/route") as f:
            main = f.read().splitlines()[1:]
        with open("/proc/thread-self/net/fib_trie") as f:
            trie = f.read().splitlines()
    except OSError:
        return _ip_routes()
    if any(line and not line[0].isspace() and line not in ("Main:", "Local:") for line in trie):
        return _ip_routes()
    found = []
    for line in main:
        fields = line.split()
        if len(fields) < 8:
            continue
        dev, dst, mask = fields[0], int(fields[1], 16), int(fields[7], 16)
        net = ipaddress.IPv4Network((socket.ntohl(dst), bin(mask).count("1")), strict=False)
        if net.prefixlen == 0 or net.network_address.is_loopback:
            continue
        found.append((net, "" if dev == "*" else dev))
    routed = [net for net, _ in found]
    addr = None
    for line in trie:
        text = line.strip()
        if text.startswith("|-- "):
            addr = text[4:]
        elif addr and text.startswith("/32 host LOCAL"):
            local = ipaddress.IPv4Network(f"{addr}/32")
            if not local.network_address.is_loopback and not any(local.subnet_of(n) for n in routed):
                found.append((local, ""))
                routed.append(local)
    return found


def _ip_routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    from vmfork.network.cmd import run

    out = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]")
    found = []
    for r in out:
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("type") == "broadcast" or dst.startswith("127."):
            continue
        try:
            found.append((ipaddress.IPv4Network(dst, strict=False), str(r.get("dev", ""))))
        except ValueError:
            continue
    return found


def _port_free(p: PortMap) -> str | None:
    kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((p.host_ip or "0.0.0.0", p.host_port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def check_ports(data_dir: Path, iid: str, ports: tuple[PortMap, ...]) -> None:
    """Refuse host ports that another lease publishes or a process holds."""
    for p in ports:
        for other in all_leases(data_dir):
            if other.iid == iid:
                continue
            for q in other.net.publish:
                if (q.host_port, q.proto) == (p.host_port, p.proto) and (not q.host_ip or not p.host_ip
                                                                          or q.host_ip == p.host_ip):
                    raise InvalidArgument(f"-p {p}: host port {p.host_port}/{p.proto} is already published "
                                          f"by instance {other.iid}")
        why = _port_free(p)
        if why == os.strerror(errno.EADDRNOTAVAIL):
            raise InvalidArgument(f"-p {p}: {p.host_ip} is not an address of this host")
        if why:
            raise InvalidArgument(f"-p {p}: host port {p.host_port}/{p.proto} is in use ({why})")


def allocate(data_dir: Path, iid: str, spec: NetSpec) -> Lease:
    """A new lease for ``iid`` (call under ``locked``): the first free /30 of the pool that
    no lease holds and no route of the host covers."""
    subnet = ipaddress.IPv4Network(pool(data_dir, spec))
    table = routes()
    for net, dev in table:
        if net.overlaps(subnet) and not dev.startswith("vf"):
            raise InvalidArgument(f"subnet {subnet} collides with the host's route to {net}"
                                  + (f" (dev {dev})" if dev else "") + ": choose another with --subnet")
    check_ports(data_dir, iid, spec.publish)
    used = {lease.ip for lease in all_leases(data_dir)}
    for slot, block in enumerate(subnet.subnets(new_prefix=30)):
        hosts = list(block.hosts())
        if str(hosts[1]) in used or any(net.overlaps(block) for net, _ in table):
            continue
        lease = Lease(iid=iid, slot=slot, subnet=str(subnet), ip=str(hosts[1]), gateway=str(hosts[0]),
                      netns=netns_name(iid), veth=veth_name(iid), spec=spec.to_json())
        write(data_dir, lease)
        return lease
    raise InvalidArgument(f"subnet {subnet} has no free address left: choose a larger one with --subnet")


def set_config(data_dir: Path, subnet: str) -> None:
    d = net_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "config.json", {"subnet": subnet})


__all__ = ["Lease", "all_leases", "allocate", "check_ports", "lease_ids", "locked", "netns_name", "read",
           "remove", "routes", "set_config", "veth_name", "write"]
