"""What an instance's network is asked to be: mode, published ports, egress policy.

Parsed from the command line (``-p``, ``--egress``, ``--allow``, ``--subnet``) into small
frozen dataclasses, kept in the instance's metadata as JSON. Every bad value raises
InvalidArgument with one line naming it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any

from vmfork.errors import InvalidArgument

#: The guest side, the same in every instance (a fork needs no change inside the guest).
GUEST_IP = "172.16.0.2"
TAP_IP = "172.16.0.1"  # the instance namespace's end of the TAP: the guest's gateway
GUEST_PREFIX = 30
GUEST_MAC = "06:00:ac:10:00:02"
TAP = "tap0"  # inside the instance's namespace
NS_VETH = "eth0"  # the instance namespace's end of the veth pair
DEFAULT_SUBNET = "10.213.0.0/16"

_PUBLISH = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?P<host>\d{1,5}):(?P<guest>\d{1,5})(?:/(?P<proto>tcp|udp))?$")


@dataclass(frozen=True)
class PortMap:
    """``[host_ip:]host_port:guest_port[/proto]``; host_ip "" = every local address."""

    host_port: int
    guest_port: int
    proto: str = "tcp"
    host_ip: str = ""

    def __str__(self) -> str:
        return f"{self.host_ip + ':' if self.host_ip else ''}{self.host_port}:{self.guest_port}/{self.proto}"

    def to_json(self) -> dict[str, Any]:
        return {"host_ip": self.host_ip, "host_port": self.host_port, "guest_port": self.guest_port,
                "proto": self.proto}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PortMap:
        return cls(host_port=int(d["host_port"]), guest_port=int(d["guest_port"]), proto=str(d["proto"]),
                   host_ip=str(d.get("host_ip") or ""))


def parse_publish(text: str) -> PortMap:
    m = _PUBLISH.match(text.strip())
    if not m:
        raise InvalidArgument(f"invalid -p '{text}': use [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]")
    host, guest = int(m["host"]), int(m["guest"])
    for what, port in (("host port", host), ("guest port", guest)):
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"invalid -p '{text}': {what} {port} is not between 1 and 65535")
    ip = m["ip"] or ""
    if ip:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise InvalidArgument(f"invalid -p '{text}': '{ip}' is not an IPv4 address") from None
    return PortMap(host_port=host, guest_port=guest, proto=m["proto"] or "tcp", host_ip=ip)


def parse_cidr(text: str, what: str) -> str:
    """An IPv4 network in CIDR form (host bits allowed for --allow: 10.0.0.5 = 10.0.0.5/32)."""
    try:
        return str(ipaddress.IPv4Network(text.strip(), strict=False))
    except ValueError as e:
        raise InvalidArgument(f"invalid {what} '{text}': {e}") from None


def parse_subnet(text: str) -> str:
    net = ipaddress.IPv4Network(parse_cidr(text, "--subnet"))
    if net.prefixlen > 29:
        raise InvalidArgument(f"invalid --subnet '{text}': too small (at most /29: each instance takes a /30)")
    guest = ipaddress.IPv4Network(f"{GUEST_IP}/{GUEST_PREFIX}", strict=False)
    if net.overlaps(guest):
        raise InvalidArgument(f"invalid --subnet '{text}': overlaps the guests' own {guest}")
    return str(net)


@dataclass(frozen=True)
class NetSpec:
    """An instance's network as asked for; ``mode`` "none" = no network (no namespace)."""

    mode: str = "none"
    publish: tuple[PortMap, ...] = ()
    egress: str = "allow"
    allow: tuple[str, ...] = ()
    subnet: str = ""  # "" = the data dir's setting, else DEFAULT_SUBNET

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "publish": [p.to_json() for p in self.publish], "egress": self.egress,
                "allow": list(self.allow), "subnet": self.subnet}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> NetSpec:
        if not d:
            return cls()
        return cls(mode=str(d.get("mode", "none")), publish=tuple(PortMap.from_json(p) for p in d.get("publish", [])),
                   egress=str(d.get("egress", "allow")), allow=tuple(d.get("allow", [])),
                   subnet=str(d.get("subnet") or ""))

    def for_fork(self, publish: tuple[PortMap, ...]) -> NetSpec:
        """A fork's: its source's policy, never its published host ports (they would collide)."""
        return replace(self, publish=publish)


def build(mode: str, publish: list[str] | tuple[str, ...] = (), egress: str = "allow",
          allow: list[str] | tuple[str, ...] = (), subnet: str | None = None) -> NetSpec:
    """The spec from command-line values; options that need a network refuse ``--network none``."""
    if mode not in ("none", "default"):
        raise InvalidArgument(f"invalid --network '{mode}': use none or default")
    if egress not in ("allow", "deny"):
        raise InvalidArgument(f"invalid --egress '{egress}': use allow or deny")
    ports = tuple(parse_publish(p) for p in publish)
    seen: set[tuple[str, int, str]] = set()
    for p in ports:
        key = (p.host_ip, p.host_port, p.proto)
        if key in seen or any(k[1:] == key[1:] and "" in (k[0], key[0]) for k in seen):
            raise InvalidArgument(f"invalid -p '{p}': host port {p.host_port}/{p.proto} is published twice")
        seen.add(key)
    nets = tuple(parse_cidr(a, "--allow") for a in allow)
    sub = parse_subnet(subnet) if subnet else ""
    if mode == "none" and (ports or nets or egress != "allow" or sub):
        raise InvalidArgument("-p, --egress, --allow and --subnet need a network: not with --network none")
    return NetSpec(mode=mode, publish=ports, egress=egress, allow=nets, subnet=sub)


__all__ = ["DEFAULT_SUBNET", "GUEST_IP", "GUEST_MAC", "GUEST_PREFIX", "NS_VETH", "TAP", "TAP_IP", "NetSpec",
           "PortMap", "build", "parse_cidr", "parse_publish", "parse_subnet"]
