"""Issue 14, wake on traffic: an auto-standby web server guest goes to standby once idle; the
server keeps its published port listening, and a request to it restores the guest and gets
the right answer (connections arriving during the restore are held, then served).

Everything runs in the network namespace of tests/integration/test_network.py's ``ns``
fixture (the server too): no traffic leaves it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import kill_all_vmms
from tests.integration.test_network import HTTPD, NsCLI, ns, sh  # noqa: F401 (ns: the fixture)
from vmfork import retry

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
PORT = 18090
# Time to the first byte of the answer, measured inside the namespace.
FETCH_T = ("import sys, time, urllib.request\n"
           "t0 = time.monotonic(); r = urllib.request.urlopen(sys.argv[1], timeout=120); b = r.read(1)\n"
           "t1 = time.monotonic(); print(f'{t1 - t0:.4f}', (b + r.read()).decode().strip())\n")


def fetch_t(ns_name: str, url: str) -> tuple[float, str]:
    out = sh("nsenter", f"--net=/run/netns/{ns_name}", sys.executable, "-c", FETCH_T, url).strip()
    secs, _, body = out.partition(" ")
    return float(secs), body


@pytest.fixture(scope="module")
def served(ns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, NsCLI]]:  # noqa: F811
    import vmfork

    cli = NsCLI(tmp_path_factory.mktemp("vmfork-wake"))
    cli.ns = ns
    cli("image", "build")
    log = cli.data_dir.parent / "wake-serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "vmfork.cli",
                                 "--data-dir", str(cli.data_dir), "serve"], stdout=f, stderr=f)
    try:
        sock = cli.data_dir / "vmfork.sock"
        for _ in retry.attempts(60, first=0.05, cap=0.5):
            if sock.exists():
                break
            assert proc.poll() is None, log.read_text()
        with vmfork.Client(str(sock)) as client:
            yield client, cli
    finally:
        proc.terminate()
        proc.wait(60)
        for inst in cli.json("ps") or []:  # type: ignore[union-attr]
            cli("rm", "--force", inst["name"], check=False)
        kill_all_vmms(cli.data_dir)


def wait_listening(ns_name: str, port: int) -> None:
    """Until the server's wake listener holds the port (seen with ss: connecting would wake it)."""
    for _ in retry.attempts(60, first=0.05, cap=0.5):
        out = sh("nsenter", f"--net=/run/netns/{ns_name}", "ss", "-Hltn", f"sport = :{port}")
        if out.strip():
            return
    raise AssertionError(f"nothing listens on port {port} after the standby")


def test_standby_web_server_wakes_on_its_first_connection(served: tuple[Any, NsCLI], ns: str,  # noqa: F811
                                                          report: list[str]) -> None:
    client, _cli = served
    url = f"http://127.0.0.1:{PORT}/"
    web = client.instances.run("web", memory="256M", publish=[f"127.0.0.1:{PORT}:80"], auto_standby=6)
    assert web.exec(["sh", "-c", HTTPD]).exit_code == 0
    warm, body = fetch_t(ns, url)
    assert body == "index"

    assert web.wait("standby", timeout=180).reached
    wait_listening(ns, PORT)  # the listener takes the port right after the standby
    # Four connections at once to the standby guest: all held during the one restore, all answered.
    procs = [subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", FETCH_T, url],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [o.partition(" ")[2] for o in outs] == ["index"] * 4, outs  # correct answers, no refusal
    firsts = sorted(float(o.partition(" ")[0]) for o in outs)
    metrics = client.metrics()
    assert 'vmfork_operation_seconds_count{operation="restore",outcome="ok"} 1' in metrics, metrics
    restore_s = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith('vmfork_operation_seconds_sum{operation="restore",outcome="ok"}')))
    report.append(f"wake on traffic: first byte from standby {firsts[0] * 1000:.0f}-{firsts[-1] * 1000:.0f} ms "
                  f"(4 connections during one wake); the restore itself {restore_s * 1000:.0f} ms; "
                  f"running guest {warm * 1000:.0f} ms (TCG)")

    # Idle again: a second standby, and a second wake answers as the first did.
    assert web.wait("standby", timeout=180).reached
    wait_listening(ns, PORT)
    again, body = fetch_t(ns, url)
    assert body == "index"
    report.append(f"wake on traffic, second wake: first byte {again * 1000:.0f} ms")
    web.delete()
