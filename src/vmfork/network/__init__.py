"""Networking that survives a fork: a network namespace per instance, NAT, published ports,
egress policy.

Every instance with a network gets its own namespace, ``vmfork-<id>`` (the id makes the
name unique machine-wide), holding:
- the TAP ``tap0`` (owned by the VMM's uid), to which the VMM attaches the guest NIC; the
  VMM runs inside this namespace;
- ``eth0``, one end of a veth pair whose other end, ``vf<id>``, is in the namespace vmfork
  runs in;
- nftables table ``ip vmfork`` (``rules.instance_rules``).

The guest's NIC is the same in every instance (``spec.GUEST_IP``/``GUEST_MAC``, gateway
``TAP_IP``), set at boot by the guest's init from the kernel command line; a restored fork
needs no change inside the guest. Each namespace translates its own unique address (the
lease's ``ip``) to the guest's (Firecracker's network-for-clones design): the host reaches
a guest at its instance's ``ip``, and the guest's traffic leaves with that address. Host
side, table ``ip vmfork-<id>`` masquerades the guest's egress and forwards the published
ports (``rules.host_rules``).

Tools: iproute2 (``ip -batch``: the veth pair, which needs netlink) and ``nft -f`` (Debian
packages), run as subprocesses, so their own error messages reach the user; no netlink of
our own. What the VMM waits for, the namespace and its TAP, is made in-process with no
process (``kernel``: ``unshare`` + the bind mount ``ip netns add`` makes, the TUN ioctls);
the rest is made by a thread while the VMM starts (``_rest``).

API (used by the Manager):
- ``begin(data_dir, iid, spec, uid)``: lease an address (if the instance has none yet) and
  make its namespace and TAP (if they are not there): the VMM can start; returns the
  ``Lease`` and a function that completes the rest (veth, addresses, rules), called while
  the VMM starts, before the guest runs. ``ensure``: both at once.
- ``release(data_dir, iid)``: remove the namespace, veth, TAP, rules and lease (``rm``).
- ``clean(data_dir, live)``: the same for every lease whose instance is gone (``recover()``).
- ``describe(data_dir, iid)``: the ``network`` object of ``inspect --json``.

For wake-on-traffic (a listener that owns an instance's host ports while it is in standby):
- ``published(data_dir, iid)``: the instance's published ports (``PortMap``: host_ip,
  host_port, guest_port, proto); empty without a network;
- ``set_forwarding(data_dir, iid, on)``: stop (``False``: the DNAT rules go, the host port
  is free for a listener) or restart (``True``) the forwarding of those ports. Recorded in
  the lease, so a later ``ensure`` keeps it as set.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmfork.errors import ExternalToolError, InvalidArgument, NotFound
from vmfork.network import kernel, leases, rules
from vmfork.network.cmd import finish, netns_path, run, start
from vmfork.network.leases import Lease
from vmfork.network.spec import (
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX,
    NS_VETH,
    TAP,
    TAP_IP,
    NetSpec,
    PortMap,
)

__all__ = [
    "GUEST_IP",
    "GUEST_MAC",
    "TAP",
    "Lease",
    "NetSpec",
    "PortMap",
    "begin",
    "clean",
    "describe",
    "ensure",
    "guest_cmdline",
    "published",
    "release",
    "set_forwarding",
]


def guest_cmdline() -> str:
    """The kernel command line argument the guest's init configures its NIC from."""
    return f"vmfork.net={GUEST_IP}/{GUEST_PREFIX},{TAP_IP}"


def _exists(lease: Lease) -> bool:
    """The namespace is there and was completed (``route_localnet`` on the veth is set last;
    /proc/sys/net shows the namespace vmfork runs in, unlike /sys under ``nsenter``)."""
    try:
        with open(f"/proc/sys/net/ipv4/conf/{lease.veth}/route_localnet") as f:
            done = f.read().strip() == "1"
    except OSError:
        return False
    return done and os.path.exists(netns_path(lease.netns))


#: The background part of a ``_begin`` not completed yet, by namespace: a teardown waits
#: for it (a VMM that failed to start: its instance is removed, never completed).
_pending: dict[str, kernel.Background] = {}


def _teardown(lease: Lease, *, table: bool = True) -> None:
    """Remove what ``_begin`` made; whatever is already gone is fine (and costs no process).
    Without ``table`` the host table is left: the next ``_begin`` replaces it whole."""
    job = _pending.pop(lease.netns, None)
    if job is not None:
        try:
            job.wait()  # nothing made after the teardown
        except BaseException:
            pass
    steps = []
    if os.path.exists(netns_path(lease.netns)):
        steps.append(["ip", "netns", "delete", lease.netns])
    if os.path.exists(f"/proc/sys/net/ipv4/conf/{lease.veth}"):
        steps.append(["ip", "link", "delete", lease.veth])
    if table:
        steps.append(["nft", "delete", "table", "ip", rules.host_table(lease.iid)])
    for argv in steps:
        try:
            run(argv)
        except ExternalToolError:
            pass


def _begin(lease: Lease, uid: int) -> Callable[[], None]:
    """Make what the VMM needs to start and start the rest in the background; return the
    function that waits for the rest.

    On the critical path, no process: the namespace and its TAP, made in-process
    (``kernel.make``: ``unshare`` in a thread, the TUN ioctls). Made meanwhile by a thread
    (``_rest``), while the VMM starts and loads: the veth pair, the addresses and route, both
    nftables tables. The guest runs only once all of it is in place (the caller completes
    before resuming it)."""
    kernel.make(lease.netns, TAP, uid, TAP_IP, GUEST_PREFIX)
    rest = _pending[lease.netns] = kernel.Background(lambda: _rest(lease))

    def complete() -> None:
        try:
            rest.wait()
            _pending.pop(lease.netns, None)
            # vmfork's namespace: forward the guests' traffic; let 127.0.0.1 reach published
            # ports (route_localnet is set last: it marks the namespace complete, see _exists)
            for key in ("net/ipv4/ip_forward", f"net/ipv4/conf/{lease.veth}/route_localnet"):
                _sysctl(key)
        except BaseException:
            _teardown(lease)
            raise

    return complete


def _sysctl(key: str) -> None:
    with open(f"/proc/sys/{key}", "r+") as f:
        if f.read().strip() != "1":
            f.seek(0)
            f.write("1")


def _rest(lease: Lease) -> None:
    """In a thread of its own (``kernel.Background``): from vmfork's namespace, the veth pair
    (its far end made in the instance's namespace) with the host end's address (one ``ip
    -batch``: netlink) and the host table (``nft``); then, the thread moved into the
    instance's namespace (it alone), that namespace's table (an ``nft`` started from there
    runs there) and its end's address and default route (ioctls)."""
    spec, prefix = lease.net, 30
    procs: list[tuple[subprocess.Popen[str], str]] = []
    try:
        veth = start(["ip", "-batch", "-"], stdin=(
            f"link add {lease.veth} type veth peer name {NS_VETH} netns {lease.netns}\n"
            f"addr add {lease.gateway}/{prefix} dev {lease.veth}\n"
            f"link set {lease.veth} up\n"))
        procs.append((veth, "ip"))
        procs.append((start(["nft", "-f", "-"], stdin=rules.host_rules(
            lease.iid, lease.ip, lease.veth, spec.publish, forwarding=lease.forwarding)), "nft"))
        try:
            kernel.join(lease.netns)
            _sysctl("net/ipv4/ip_forward")  # the instance namespace's: forward between TAP and veth
        except OSError as e:
            raise ExternalToolError("netns", f"{lease.netns}: {e.strerror or e}") from None
        procs.append((start(["nft", "-f", "-"], stdin=rules.instance_rules(lease.ip, spec.egress, spec.allow)),
                      "nft"))
        finish(veth, "ip")
        try:  # the namespace's end of the veth
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                kernel.set_addr(sock, NS_VETH, lease.ip, prefix)
                kernel.set_up(sock, NS_VETH)
                kernel.add_default_route(sock, lease.gateway)
        except OSError as e:
            raise ExternalToolError("netns", f"{lease.netns}: {NS_VETH} {lease.ip}/{prefix} via {lease.gateway}: "
                                             f"{e.strerror or e}") from None
        for p, tool in procs[1:]:
            finish(p, tool)
    except BaseException:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise


def begin(data_dir: Path, iid: str, spec: NetSpec, uid: int | None) -> tuple[Lease, Callable[[], None]]:
    """The instance's lease, and its namespace with the TAP made, so that its VMM can start;
    the returned function completes the rest (call it before the guest runs: a failure there
    removes the namespace). A namespace already there (the instance ran before) is kept; one
    a crash or a reboot left half made or gone is made anew. Raises InvalidArgument for a
    subnet that collides with a route or a host port in use; a failure leaves no lease of
    a new one behind."""
    if os.geteuid() != 0:
        raise InvalidArgument("a network needs root (namespaces, TAP, nftables): run vmfork as root "
                              "or use --network none")
    with leases.locked(data_dir):
        lease = leases.read(data_dir, iid)
        new = lease is None
        if lease is None:
            lease = leases.allocate(data_dir, iid, spec)
        if _exists(lease):
            return lease, _nothing
        try:
            _teardown(lease, table=False)  # a half-made one (crash, reboot): made anew
            complete = _begin(lease, 0 if uid is None else uid)
        except BaseException:
            _teardown(lease)
            if new:
                leases.remove(data_dir, iid)
            raise

    def done() -> None:
        try:
            complete()
        except BaseException:
            if new:
                with leases.locked(data_dir):
                    leases.remove(data_dir, iid)
            raise

    return lease, done


def _nothing() -> None:
    pass


def ensure(data_dir: Path, iid: str, spec: NetSpec, uid: int | None) -> Lease:
    """``begin`` and its completion in one."""
    lease, complete = begin(data_dir, iid, spec, uid)
    complete()
    return lease


def release(data_dir: Path, iid: str) -> None:
    """The instance is gone (its VMM stopped): its namespace, links, rules and lease go."""
    with leases.locked(data_dir):
        lease = leases.read(data_dir, iid)
        if lease is not None:
            _teardown(lease)
        leases.remove(data_dir, iid)


def clean(data_dir: Path, live: set[str]) -> list[str]:
    """Release the leases of instances that no longer exist (after a crash)."""
    out = []
    for iid in leases.lease_ids(data_dir):
        if iid in live:
            continue
        lease = leases.read(data_dir, iid)
        release(data_dir, iid)
        out.append(f"removed the network of a gone instance ({lease.netns if lease else iid})")
    return out


def published(data_dir: Path, iid: str) -> list[PortMap]:
    lease = leases.read(data_dir, iid)
    return list(lease.net.publish) if lease is not None else []


def set_forwarding(data_dir: Path, iid: str, on: bool) -> None:
    """Stop (``on=False``) or restart the forwarding of the instance's published ports."""
    with leases.locked(data_dir):
        lease = leases.read(data_dir, iid)
        if lease is None:
            raise NotFound(f"instance {iid} has no network")
        lease = Lease(**(lease.to_json() | {"forwarding": on}))
        leases.write(data_dir, lease)
        if _exists(lease):
            run(["nft", "-f", "-"], stdin=rules.host_rules(iid, lease.ip, lease.veth, lease.net.publish,
                                                           forwarding=on))


def describe(data_dir: Path, iid: str, spec: NetSpec) -> dict[str, Any] | None:
    """``inspect``'s ``network`` object; None without a network."""
    if not spec.enabled:
        return None
    lease = leases.read(data_dir, iid)
    return {"mode": spec.mode, "ip": lease.ip if lease else None, "guest_ip": GUEST_IP, "mac": GUEST_MAC,
            "gateway": lease.gateway if lease else None, "netns": lease.netns if lease else None,
            "published": [str(p) for p in spec.publish], "forwarding": lease.forwarding if lease else None,
            "egress": spec.egress, "allow": list(spec.allow)}


def doctor_checks() -> list[tuple[str, str, str]]:
    """``vmfork doctor``'s view of what ``--network default`` needs: (name, status, detail)."""
    import shutil

    out = []
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        path = shutil.which(tool)
        out.append((f"network: {tool}", "ok" if path else "warn",
                    path or f"missing: install {pkg} (make setup) for --network default"))
    tun = os.path.exists("/dev/net/tun")
    out.append(("network: /dev/net/tun", "ok" if tun else "warn",
                "present" if tun else "missing: load the tun module (modprobe tun) for --network default"))
    root = os.geteuid() == 0
    out.append(("network: root", "ok" if root else "warn",
                "vmfork runs as root" if root else "--network default needs root (namespaces, TAP, nftables)"))
    return out
