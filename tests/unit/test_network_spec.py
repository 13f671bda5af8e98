"""The network's pure parts: option parsing and the nftables rules (checked by nft itself,
in a throwaway network namespace, where that can run)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vmfork.errors import InvalidArgument
from vmfork.network import rules
from vmfork.network.spec import NetSpec, PortMap, build, parse_publish, parse_subnet


def test_publish_forms() -> None:
    assert parse_publish("8080:80") == PortMap(8080, 80, "tcp", "")
    assert parse_publish("127.0.0.1:53:5353/udp") == PortMap(53, 5353, "udp", "127.0.0.1")
    assert str(parse_publish("127.0.0.1:8080:80")) == "127.0.0.1:8080:80/tcp"


@pytest.mark.parametrize("text, message", [
    ("80", "use [HOST_IP:]HOST_PORT:GUEST_PORT"),
    ("0:80", "host port 0 is not between 1 and 65535"),
    ("80:70000", "guest port 70000 is not between 1 and 65535"),
    ("1.2.3:80:80", "'1.2.3' is not an IPv4 address"),
    ("80:80/sctp", "use [HOST_IP:]HOST_PORT:GUEST_PORT"),
])
def test_bad_publish(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_publish(text)


def test_build_refuses_what_makes_no_sense() -> None:
    with pytest.raises(InvalidArgument, match="published twice"):
        build("default", ["8080:80", "127.0.0.1:8080:81"])
    with pytest.raises(InvalidArgument, match="need a network"):
        build("none", ["8080:80"])
    with pytest.raises(InvalidArgument, match="invalid --allow"):
        build("default", egress="deny", allow=["10.0.0.0/33"])
    with pytest.raises(InvalidArgument, match="invalid --network"):
        build("bridge")
    with pytest.raises(InvalidArgument, match="overlaps the guests' own"):
        parse_subnet("172.16.0.0/12")
    with pytest.raises(InvalidArgument, match="too small"):
        parse_subnet("10.0.0.0/30")
    assert build("default", ["8080:80/udp", "8080:80"]).publish[0].proto == "udp"  # tcp and udp: two ports


def test_spec_round_trips_and_a_fork_keeps_the_policy_not_the_ports() -> None:
    s = build("default", ["8080:80"], "deny", ["10.1.2.3"], "10.99.0.0/16")
    assert NetSpec.from_json(s.to_json()) == s
    assert s.allow == ("10.1.2.3/32",)
    f = s.for_fork(())
    assert f.publish == () and f.egress == "deny" and f.allow == s.allow and f.subnet == s.subnet
    assert NetSpec.from_json(None).enabled is False


def test_rules_egress_deny_rejects_and_allow_accepts() -> None:
    deny = rules.instance_rules("10.213.0.2", "deny", ("10.250.0.1/32",))
    assert "ip daddr { 10.250.0.1/32 } accept" in deny
    assert "reject with tcp reset" in deny and "admin-prohibited" in deny
    assert "policy drop" in deny  # forward: nothing but what is listed
    allow = rules.instance_rules("10.213.0.2", "allow", ())
    assert "reject" not in allow and 'iifname "tap0" oifname "eth0" accept' in allow
    assert "dnat to 172.16.0.2" in allow and "snat to 10.213.0.2" in allow


def test_host_rules_publish_and_stop_forwarding() -> None:
    ports = (PortMap(8080, 80), PortMap(5353, 53, "udp", "127.0.0.1"))
    on = rules.host_rules("abc", "10.213.0.2", "vfabc", ports)
    assert "fib daddr type local tcp dport 8080 dnat to 10.213.0.2:80" in on
    assert "ip daddr 127.0.0.1 udp dport 5353 dnat to 10.213.0.2:53" in on
    off = rules.host_rules("abc", "10.213.0.2", "vfabc", ports, forwarding=False)
    assert "dnat" not in off and "masquerade" in off


def _nft_check_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (nft -c in a throwaway network namespace)"
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        return "nft or unshare missing (make setup)"
    return None


@pytest.mark.parametrize("text", [
    rules.instance_rules("10.213.0.2", "deny", ("10.250.0.1/32", "10.9.0.0/16")),
    rules.instance_rules("10.213.0.2", "deny", ()),
    rules.instance_rules("10.213.0.2", "allow", ()),
    rules.host_rules("abc", "10.213.0.2", "vfabc", (PortMap(8080, 80), PortMap(53, 53, "udp", "127.0.0.1"))),
])
def test_rules_are_accepted_by_nft(text: str) -> None:
    reason = _nft_check_unavailable()
    if reason:
        pytest.skip(reason)
    r = subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
