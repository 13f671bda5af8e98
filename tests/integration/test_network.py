"""Networking that survives a fork (issue 13), with real QEMU guests, namespaces and nftables.

The traffic stays on this machine: the module makes its own top-level network namespace
(removed at the end) and runs every vmfork command in it (``nsenter --net``: unlike ``ip
netns exec`` it keeps the host's /sys, where the cgroups the VMMs are confined by live). The
test servers listen in that namespace on addresses of its loopback; a second namespace of
the module is the "other host" that reaches a published port. Nothing is sent anywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI, kill_all_vmms, vm_unavailable_reason

SERVER_A = "10.250.0.1"  # allowed by the egress test
SERVER_B = "10.250.0.2"  # not allowed
SERVER_PORT = 8000
CLIENT_GW = "10.251.0.1"  # the module namespace's end of the link to the "other host"
CLIENT_IP = "10.251.0.2"
PUB_LOCAL = 18080  # published on 127.0.0.1 only
PUB_ANY = 18081  # published on every address of the namespace

HTTPD = (
    "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nhostname\\n' "
    ">/www/cgi-bin/name && chmod +x /www/cgi-bin/name && echo index >/www/index.html && httpd -p 80 -h /www"
)
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=15).read().decode().strip())"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices, nftables)"
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup: iproute2, nftables, util-linux)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return vm_unavailable_reason()


def sh(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


class NsCLI(CLI):
    """The vmfork CLI run inside the module's namespace."""

    ns: str = ""

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 300,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = ["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-m", "vmfork.cli",
               "--data-dir", str(self.data_dir), "-q", *args]
        r = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                           env=None if env is None else os.environ | env)
        if check and r.returncode != 0:
            raise AssertionError(f"vmfork {' '.join(args)} exited {r.returncode}\n"
                                 f"stderr: {r.stderr.decode(errors='replace')}")
        return r

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-m", "vmfork.cli",
                                 "--data-dir", str(self.data_dir), "-q", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def inspect(self, name: str) -> dict[str, Any]:
        d = self.json("inspect", name)
        assert isinstance(d, dict)
        return d


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    name = f"vft-{secrets.token_hex(4)}"
    client = f"{name}-c"
    sh("ip", "netns", "add", name)
    sh("ip", "netns", "add", client)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for line in ("link set lo up", f"addr add {SERVER_A}/32 dev lo", f"addr add {SERVER_B}/32 dev lo",
                     f"link add vtc0 type veth peer name vtc1 netns {client}",
                     f"addr add {CLIENT_GW}/30 dev vtc0", "link set vtc0 up"):
            sh("ip", "-n", name, *line.split())
        for line in ("link set lo up", f"addr add {CLIENT_IP}/30 dev vtc1", "link set vtc1 up",
                     f"route add default via {CLIENT_GW}"):
            sh("ip", "-n", client, *line.split())
        servers.append(subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{name}", sys.executable, "-c",
             "import http.server as h\n"
             "class H(h.BaseHTTPRequestHandler):\n"
             "    def do_GET(self):\n"
             "        body = f'hello from the test server at {self.connection.getsockname()[0]}'.encode()\n"
             "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
             "        self.end_headers(); self.wfile.write(body)\n"
             "    def log_message(self, *a): pass\n"
             f"h.ThreadingHTTPServer(('0.0.0.0', {SERVER_PORT}), H).serve_forever()\n"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield name
    finally:
        for p in servers:
            p.kill()
            p.wait()
        sh("ip", "netns", "delete", client, check=False)
        sh("ip", "netns", "delete", name, check=False)


@pytest.fixture(scope="module")
def cli(ns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCLI]:
    c = NsCLI(tmp_path_factory.mktemp("vmfork-net"))
    c.ns = ns
    c("image", "build")
    try:
        yield c
    finally:
        for inst in c.json("ps") or []:  # type: ignore[union-attr]
            c("rm", "--force", inst["name"], check=False)
        kill_all_vmms(c.data_dir)


@pytest.fixture(scope="module")
def web(cli: NsCLI) -> dict[str, Any]:
    """One guest of the module serving its hostname (busybox httpd + CGI) on port 80."""
    cli("run", "web", "--network", "default", "-p", f"127.0.0.1:{PUB_LOCAL}:80", "-p", f"{PUB_ANY}:80")
    cli.sh("web", HTTPD)
    return cli.inspect("web")


def fetch(ns: str, url: str) -> str:
    return sh("nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", FETCH, url).strip()


def leftovers(cli: NsCLI) -> dict[str, Any]:
    """What a network leaves behind: namespaces, links and tables, leases."""
    leases = cli.data_dir / "network" / "leases"
    return {
        "netns": sorted(x.split()[0] for x in sh("ip", "netns", "list").splitlines() if x.startswith("vmfork-")),
        "links": sorted(x["ifname"] for x in json.loads(sh("ip", "-n", cli.ns, "-j", "link"))),
        "tables": sorted(sh("ip", "netns", "exec", cli.ns, "nft", "list", "tables").split("\n")),
        "leases": sorted(f.name for f in leases.glob("*.json")) if leases.is_dir() else [],
        "instances": sorted(i["name"] for i in cli.json("ps")),  # type: ignore[union-attr]
    }


def ours(state: dict[str, Any], cli: NsCLI) -> dict[str, Any]:
    """The namespaces of this data dir only (other data dirs on this machine may have some)."""
    ids = {f.name.removesuffix(".json") for f in (cli.data_dir / "network" / "leases").glob("*.json")}
    ids |= {d.name for d in (cli.data_dir / "guests").iterdir() if not d.name.startswith(".")}
    return state | {"netns": [n for n in state["netns"] if n.removeprefix("vmfork-") in ids]}


# --- tests ----------------------------------------------------------------------------------
def test_guest_reaches_a_server_on_the_host(cli: NsCLI, web: dict[str, Any]) -> None:
    out = cli.sh("web", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {SERVER_A} {SERVER_PORT}")
    assert f"hello from the test server at {SERVER_A}" in out


def test_inspect_shows_the_network(web: dict[str, Any]) -> None:
    net = web["network"]
    assert net["guest_ip"] == "172.16.0.2" and net["mac"] == "06:00:ac:10:00:02"
    assert net["ip"].startswith("10.213.") and net["ip"] != net["guest_ip"]
    assert net["netns"] == f"vmfork-{web['id']}"
    assert sorted(net["published"]) == sorted([f"127.0.0.1:{PUB_LOCAL}:80/tcp", f"{PUB_ANY}:80/tcp"])


def test_host_reaches_the_guest_at_its_address_and_published_ports(cli: NsCLI, web: dict[str, Any]) -> None:
    ip = web["network"]["ip"]
    assert fetch(cli.ns, f"http://{ip}/cgi-bin/name") == "web"
    assert fetch(cli.ns, f"http://127.0.0.1:{PUB_LOCAL}/cgi-bin/name") == "web"  # from the host itself
    assert fetch(cli.ns, f"http://127.0.0.1:{PUB_ANY}/cgi-bin/name") == "web"
    assert fetch(f"{cli.ns}-c", f"http://{CLIENT_GW}:{PUB_ANY}/cgi-bin/name") == "web"  # from another namespace
    r = subprocess.run(["nsenter", f"--net=/run/netns/{cli.ns}-c", sys.executable, "-c", FETCH,
                        f"http://{CLIENT_GW}:{PUB_LOCAL}/"], capture_output=True, timeout=60)
    assert r.returncode != 0  # published on 127.0.0.1 only


def test_fork_answers_beside_its_source_with_its_own_address(cli: NsCLI, web: dict[str, Any]) -> None:
    cli("fork", "--from-running", "web", "web-f1")
    try:
        f = cli.inspect("web-f1")
        assert f["network"]["ip"] != web["network"]["ip"]
        assert f["network"]["published"] == []  # published host ports are not inherited
        assert f["network"]["netns"] == f"vmfork-{f['id']}"
        assert fetch(cli.ns, f"http://{f['network']['ip']}/cgi-bin/name") == "web-f1"
        assert fetch(cli.ns, f"http://{web['network']['ip']}/cgi-bin/name") == "web"
        assert fetch(cli.ns, f"http://127.0.0.1:{PUB_LOCAL}/cgi-bin/name") == "web"  # still the source's
        # the fork's own guest address is the source's: its traffic leaves with the fork's
        assert cli.sh("web-f1", "ip -4 -o addr show eth0").split()[3] == "172.16.0.2/30"
    finally:
        cli("rm", "--force", "web-f1")


def test_fork_publishes_its_own_ports(cli: NsCLI, web: dict[str, Any]) -> None:
    r = cli("fork", "--from-running", "web", "web-f2", "-p", f"{PUB_ANY}:80", check=False)
    assert r.returncode != 0 and f"host port {PUB_ANY}/tcp is already published" in r.stderr.decode()
    cli("fork", "--from-running", "web", "web-f2", "-p", "18082:80")
    try:
        assert fetch(cli.ns, "http://127.0.0.1:18082/cgi-bin/name") == "web-f2"
        assert fetch(cli.ns, f"http://127.0.0.1:{PUB_ANY}/cgi-bin/name") == "web"
    finally:
        cli("rm", "--force", "web-f2")


def test_eight_forks_eight_addresses_all_answering(cli: NsCLI, web: dict[str, Any]) -> None:
    cli("fork", "--from-running", "web", "many", "--count", "8", timeout=600)
    names = [f"many-{i}" for i in range(1, 9)]
    try:
        ips = {n: cli.inspect(n)["network"]["ip"] for n in names}
        assert len(set(ips.values()) | {web["network"]["ip"]}) == 9
        for n, ip in ips.items():
            assert fetch(cli.ns, f"http://{ip}/cgi-bin/name") == n
    finally:
        cli("rm", "--force", *names)


def test_egress_deny_allows_only_the_allowed_and_refuses_fast(cli: NsCLI) -> None:
    cli("run", "locked", "--egress", "deny", "--allow", f"{SERVER_A}/32")
    try:
        assert cli.inspect("locked")["network"]["egress"] == "deny"
        out = cli.sh("locked", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {SERVER_A} {SERVER_PORT}")
        assert "hello from the test server" in out
        t0 = time.monotonic()
        r = cli("exec", "locked", "--", "sh", "-c",
                f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {SERVER_B} {SERVER_PORT}; echo rc=$?", check=False)
        took = time.monotonic() - t0
        assert "hello" not in r.stdout.decode() and "rc=0" not in r.stdout.decode()
        assert took < 6, f"a denied connection took {took:.1f}s: dropped, not rejected"
    finally:
        cli("rm", "--force", "locked")


def test_rm_and_killed_commands_leave_nothing(cli: NsCLI) -> None:
    before = ours(leftovers(cli), cli)
    cli("run", "tmp1", "--network", "default", "-p", "18083:80")
    during = leftovers(cli)
    assert len(during["leases"]) == len(before["leases"]) + 1 and f"vf{cli.inspect('tmp1')['id']}" in during["links"]
    cli("rm", "--force", "tmp1")
    assert ours(leftovers(cli), cli) == before

    # a run SIGKILLed once its namespace exists; the next command recovers
    p = cli.popen("run", "tmp2", "--network", "default", "-p", "18084:80")
    _kill_when(p, lambda: _new_netns(cli, before["leases"]))
    cli("ps")
    assert ours(leftovers(cli), cli) == before

    # a fork SIGKILLed likewise
    cli("run", "src1", "--network", "default")
    cli("standby", "src1")
    base = ours(leftovers(cli), cli)
    p = cli.popen("fork", "src1", "src1-k", "--target-state", "running")
    _kill_when(p, lambda: _new_netns(cli, base["leases"]))
    cli("ps")
    assert ours(leftovers(cli), cli) == base
    cli("rm", "--force", "src1")
    assert ours(leftovers(cli), cli) == before


def _new_netns(cli: NsCLI, old: list[str]) -> bool:
    """A lease not in ``old`` whose namespace exists."""
    leases = cli.data_dir / "network" / "leases"
    new = {f.name.removesuffix(".json") for f in leases.glob("*.json")} - {x.removesuffix(".json") for x in old}
    return any(os.path.exists(f"/run/netns/vmfork-{i}") for i in new)


def _kill_when(p: subprocess.Popen[bytes], ready: Any, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not ready():
        assert p.poll() is None, f"the command ended before it could be killed: {p.stderr.read() if p.stderr else ''!r}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("args, message", [
    (["-p", "80"], "invalid -p '80'"),
    (["-p", "99999:80"], "host port 99999 is not between 1 and 65535"),
    (["-p", "1.2.3:80:80"], "invalid -p"),
    (["--allow", "10.0.0.0/33", "--egress", "deny"], "invalid --allow '10.0.0.0/33'"),
    (["--egress", "maybe"], "invalid --egress 'maybe'"),
    (["--subnet", "10.77.0.0/16"], "collides with the host's route to 10.77.0.0/16"),
    (["-p", f"{PUB_ANY}:80"], f"host port {PUB_ANY}/tcp is already published"),
    (["-p", "127.0.0.1:18090:80"], "host port 18090/tcp is in use"),
])
def test_bad_input_is_refused_and_leaves_nothing(cli: NsCLI, web: dict[str, Any], args: list[str],
                                                 message: str) -> None:
    sh("ip", "-n", cli.ns, "route", "replace", "blackhole", "10.77.0.0/16")
    holder = subprocess.Popen(["nsenter", f"--net=/run/netns/{cli.ns}", sys.executable, "-c",
                               "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 18090)); "
                               "s.listen(); print('ok', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ok"
        before = ours(leftovers(cli), cli)
        r = cli("run", "bad", "--network", "default", *args, check=False)
        err = r.stderr.decode()
        assert r.returncode != 0 and message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert ours(leftovers(cli), cli) == before
    finally:
        holder.kill()
        holder.wait()
        with contextlib.suppress(AssertionError):
            sh("ip", "-n", cli.ns, "route", "del", "blackhole", "10.77.0.0/16")


def test_network_none_has_no_nic(cli: NsCLI) -> None:
    r = cli("run", "plain", "--network", "none", "-p", "80:80", check=False)
    assert r.returncode != 0 and "need a network" in r.stderr.decode()
    assert not (Path(cli.data_dir) / "guests").exists() or "plain" not in leftovers(cli)["instances"]


def test_published_ports_listed_and_their_forwarding_stopped_and_restarted(cli: NsCLI, web: dict[str, Any]) -> None:
    """The API for a wake-on-traffic listener: list an instance's ports, free them, take them back."""
    def api(call: str) -> str:
        return sh("nsenter", f"--net=/run/netns/{cli.ns}", sys.executable, "-c",
                  "import sys; from pathlib import Path; from vmfork import network; "
                  f"d, i = Path(sys.argv[1]), sys.argv[2]; print({call})", str(cli.data_dir), web["id"]).strip()

    assert api("sorted(str(p) for p in network.published(d, i))") == str(
        sorted([f"127.0.0.1:{PUB_LOCAL}:80/tcp", f"{PUB_ANY}:80/tcp"]))
    api("network.set_forwarding(d, i, False)")
    try:
        with pytest.raises(AssertionError):  # nothing forwards, nothing listens: refused
            fetch(cli.ns, f"http://127.0.0.1:{PUB_ANY}/cgi-bin/name")
        assert fetch(cli.ns, f"http://{web['network']['ip']}/cgi-bin/name") == "web"  # the guest itself runs on
        assert cli.inspect("web")["network"]["forwarding"] is False
    finally:
        api("network.set_forwarding(d, i, True)")
    assert fetch(cli.ns, f"http://127.0.0.1:{PUB_ANY}/cgi-bin/name") == "web"
