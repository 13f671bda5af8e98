"""The nftables rules of one instance, as ``nft -f`` text (pure functions: unit-tested).

Two tables per instance, each deleted whole:
- ``ip vmfork`` inside the instance's namespace: DNAT of the instance's address to the
  guest's, SNAT of the guest's traffic to the instance's address, and the egress policy
  (forward chain; a denied packet is rejected -- TCP reset, ICMP admin-prohibited -- so a
  denied connection fails at once, not by timeout);
- ``ip vmfork-<id>`` in the namespace vmfork runs in: masquerade of the guest's egress, and
  the published ports (DNAT in prerouting, for other hosts and namespaces, and in output,
  for the host itself, 127.0.0.1 included: ``route_localnet`` is set on the instance's veth
  and the loopback source is masqueraded).
"""

from __future__ import annotations

from vmfork.network.spec import GUEST_IP, NS_VETH, TAP, PortMap


def host_table(iid: str) -> str:
    return f"vmfork-{iid}"


def instance_rules(ip: str, egress: str, allow: tuple[str, ...]) -> str:
    """The instance namespace's table (replaces any earlier one)."""
    if egress == "allow":
        out = [f'iifname "{TAP}" oifname "{NS_VETH}" accept']
        local = []
    else:
        out = ([f'iifname "{TAP}" oifname "{NS_VETH}" ip daddr {{ {", ".join(allow)} }} accept'] if allow else []) + [
            f'iifname "{TAP}" meta l4proto tcp reject with tcp reset',
            f'iifname "{TAP}" reject with icmp type admin-prohibited',
        ]
        local = [f'iifname "{TAP}" meta l4proto tcp reject with tcp reset',
                 f'iifname "{TAP}" reject with icmp type admin-prohibited']
    lines = [
        "table ip vmfork",
        "delete table ip vmfork",
        "table ip vmfork {",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f'    iifname "{NS_VETH}" ip daddr {ip} dnat to {GUEST_IP}',
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{NS_VETH}" ip saddr {GUEST_IP} snat to {ip}',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        f'    iifname "{NS_VETH}" oifname "{TAP}" ip daddr {GUEST_IP} accept',
        *(f"    {r}" for r in out),
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        *(f"    {r}" for r in local),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def host_rules(iid: str, ip: str, veth: str, published: tuple[PortMap, ...], *, forwarding: bool = True) -> str:
    """The host namespace's table of one instance (replaces any earlier one). Without
    ``forwarding`` the published ports are left out (another party owns them meanwhile)."""
    t = host_table(iid)
    pre: list[str] = []
    for p in published if forwarding else ():
        match = f"ip daddr {p.host_ip}" if p.host_ip else "fib daddr type local"
        pre.append(f"{match} {p.proto} dport {p.host_port} dnat to {ip}:{p.guest_port}")
    lines = [
        f"table ip {t}",
        f"delete table ip {t}",
        f"table ip {t} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *(f"    {r}" for r in pre),
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        *(f"    {r}" for r in pre),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {ip} oifname != "{veth}" masquerade',
        f'    ip saddr 127.0.0.0/8 oifname "{veth}" masquerade',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
