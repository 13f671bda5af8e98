"""``python -m vmfork.bench.network [--forks N] [--requests N] [--out FILE]``: what a network costs.

- fork-to-running of a standby source with ``--network default`` vs the same without a
  network (alternating, ``--forks`` of each): the network's share of a fork;
- guest <-> host TCP throughput (16 MiB each way: the guest sends to a sink on the host with
  ``nc``; the host downloads a file from the guest's busybox httpd) and HTTP request latency
  (``--requests`` GETs of a small page, one connection each), against the same loops to a
  process on the host.

Everything runs inside a network namespace made for the run (removed at the end): the
bench re-executes itself in it with ``nsenter --net``. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

PAYLOAD_MIB = 16
SINK_PORT = 9100
HOST_HTTP_PORT = 9101


def _sink(addr: str, port: int, results: list[float]) -> socket.socket:
    """A TCP sink: for each connection, seconds from the first byte to EOF, appended."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                first = c.recv(1 << 16)
                t0 = time.monotonic()
                n = len(first)
                while chunk := c.recv(1 << 16):
                    n += len(chunk)
                results.append((time.monotonic() - t0) if n >= PAYLOAD_MIB << 20 else -1.0)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        data: bytes = r.read()
        return data


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "median": round(statistics.median(s), 3), "p90": round(s[int(0.9 * (len(s) - 1))], 3),
            "min": round(s[0], 3), "max": round(s[-1], 3)}


def inside(forks: int, requests: int, work: Path) -> dict[str, Any]:
    from vmfork.instances.manager import Manager
    from vmfork.network.spec import NetSpec

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    m = Manager(work / "data", progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    out: dict[str, Any] = {}
    print("booting two guests (with and without a network)", file=sys.stderr)
    m.run("net", network=NetSpec(mode="default"))
    m.run("plain")
    for name in ("net", "plain"):
        m.standby(name)
    with_net: list[float] = []
    without: list[float] = []
    net_part: list[float] = []
    net_wait: list[float] = []  # of which waited for before the guest resumed (made while the VMM loaded)
    for i in range(forks):
        for src, samples in (("net", with_net), ("plain", without)) if i % 2 == 0 else (
                ("plain", without), ("net", with_net)):
            t0 = time.monotonic()
            _, timings = m.fork(src, f"{src}-f{i}", target_state="running")
            samples.append((time.monotonic() - t0) * 1000)
            if src == "net":
                net_part.append(timings["fork_restore"]["network_s"] * 1000)
                net_wait.append(timings["fork_restore"]["network_wait_s"] * 1000)
            m.rm(f"{src}-f{i}", force=True)
    out["fork_to_running_ms"] = {"network": _stats(with_net), "none": _stats(without),
                                 "network_minus_none_median": round(statistics.median(with_net)
                                                                    - statistics.median(without), 2),
                                 "network_setup_on_the_critical_path": _stats(net_part),
                                 "of_which_waited_for_before_resume": _stats(net_wait)}
    out["load_average"] = os.getloadavg()
    print(f"fork to running: {out['fork_to_running_ms']}", file=sys.stderr)

    m.restore("net")
    inst = m.find("net")
    desc = m.describe(inst)
    ip, gw = desc["network"]["ip"], desc["network"]["gateway"]

    def gsh(script: str) -> str:
        r = m.exec("net", ["sh", "-c", script], timeout=300)
        if r.exit_code != 0:
            raise RuntimeError(f"`{script}`: {r.stderr.decode(errors='replace')}")
        return r.stdout.decode(errors="replace")

    gsh(f"mkdir -p /tmp/www && echo hello >/tmp/www/index.html && "
        f"dd if=/dev/zero of=/tmp/www/blob bs=1M count={PAYLOAD_MIB} 2>/dev/null && httpd -p 80 -h /tmp/www")
    # guest -> host
    results: list[float] = []
    srv = _sink(gw, SINK_PORT, results)
    for _ in range(3):
        gsh(f"dd if=/dev/zero bs=64k count={PAYLOAD_MIB * 16} 2>/dev/null | nc -w 10 {gw} {SINK_PORT}")
    time.sleep(0.5)
    host_results: list[float] = []
    srv2 = _sink("127.0.0.1", SINK_PORT + 1, host_results)
    blob = b"\0" * (64 << 10)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", SINK_PORT + 1)) as c:
            for _ in range(PAYLOAD_MIB * 16):
                c.sendall(blob)
    time.sleep(0.5)
    srv.close()
    srv2.close()
    mib_s = [PAYLOAD_MIB / s for s in results if s > 0]
    host_mib_s = [PAYLOAD_MIB / s for s in host_results if s > 0]
    out["guest_to_host_MiB_s"] = _stats(mib_s) if mib_s else None
    out["host_loop_MiB_s"] = _stats(host_mib_s) if host_mib_s else None
    # host <- guest (download from the guest's httpd)
    down = []
    for _ in range(3):
        t0 = time.monotonic()
        n = len(_get(f"http://{ip}/blob"))
        down.append(PAYLOAD_MIB / (time.monotonic() - t0) if n == PAYLOAD_MIB << 20 else 0.0)
    out["host_from_guest_MiB_s"] = _stats(down)
    # request latency: guest httpd vs a process on the host
    host_http = subprocess.Popen([sys.executable, "-m", "http.server", str(HOST_HTTP_PORT), "--bind", "127.0.0.1",
                                  "--directory", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (work / "index.html").write_text("hello\n")
        for _ in range(100):
            try:
                _get(f"http://127.0.0.1:{HOST_HTTP_PORT}/index.html")
                break
            except OSError:
                time.sleep(0.05)
        lat: dict[str, list[float]] = {"guest": [], "host": []}
        for _ in range(requests):
            for key, url in (("guest", f"http://{ip}/index.html"),
                             ("host", f"http://127.0.0.1:{HOST_HTTP_PORT}/index.html")):
                t0 = time.monotonic()
                _get(url)
                lat[key].append((time.monotonic() - t0) * 1000)
        out["request_latency_ms"] = {k: _stats(v) for k, v in lat.items()}
    finally:
        host_http.kill()
        host_http.wait()
    for inst in m.instances():
        m.rm(inst.name, force=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmfork.bench.network", description=__doc__)
    ap.add_argument("--forks", type=int, default=8, help="forks with and without a network [8]")
    ap.add_argument("--requests", type=int, default=50, help="HTTP requests per target [50]")
    ap.add_argument("--out", type=Path, default=None, help="write the results (JSON) here")
    ap.add_argument("--inside", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("vmfork.bench.network: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.inside:
        with tempfile.TemporaryDirectory(prefix="vmfork-netbench-", dir="/var/tmp") as work:
            try:
                res = inside(args.forks, args.requests, Path(work))
            finally:  # whatever failed: no VMM, namespace or lease left behind
                from vmfork.instances.manager import Manager

                m = Manager(Path(work) / "data")
                for inst in m.instances():
                    m.rm(inst.name, force=True)
        print(json.dumps(res))
        return 0
    ns = f"vfb-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "vmfork.bench.network",
                            "--inside", ns, "--forks", str(args.forks), "--requests", str(args.requests)],
                           stdout=subprocess.PIPE, text=True)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    if r.returncode != 0:
        return r.returncode
    res = json.loads(r.stdout)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
