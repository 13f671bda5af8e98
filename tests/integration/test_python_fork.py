"""The Python fork: a Debian+Python image guest builds 200 MiB of state, serves requests
from a FIFO; standby, fork into two; both answer from the state built before the fork, then
diverge; the source's snapshot stays byte-identical. Figures: fork → first answer vs a cold
start (boot + build the state → first answer)."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI

pytestmark = pytest.mark.timeout(1800)

TAG = "debian-python:12"
STATE_MIB = 200
PROGRAM = f"""
import os, socket
N = {STATE_MIB} << 20
state = bytearray(b"\\x01") * N
state[0:5] = b"START"
os.mkfifo("/run/req")
print("READY", os.getpid(), flush=True)
while True:
    with open("/run/req") as req:
        for line in req:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "get":
                ans = "get %s %d" % (cmd[1], state[int(cmd[1])])
            elif cmd[0] == "set":
                state[int(cmd[1])] = int(cmd[2])
                ans = "set %s %s" % (cmd[1], cmd[2])
            elif cmd[0] == "count":
                ans = "count %d" % state.count(1)
            else:
                ans = "error " + cmd[0]
            with open("/run/answers", "a") as out:
                out.write("%s %s\\n" % (socket.gethostname(), ans))
"""


@pytest.fixture(scope="module")
def python_image(built: CLI) -> str:
    for tool in ("debootstrap", "umoci", "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (run `make setup`)")
    # debootstrap from the host's Debian mirror the first time; ~/.cache/vmfork/oci after
    built("image", "build", "debian", "--package", "python3", "--tag", TAG, timeout=1800)
    return TAG


def ask(cli: CLI, name: str, request: str, timeout: float = 120) -> str:
    """Send one request through the FIFO; return the guest's answer line."""
    before = answers(cli, name)
    cli("exec", name, "--", "sh", "-c", f"echo '{request}' > /run/req", timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        now = answers(cli, name)
        if len(now) > len(before):
            return now[len(before)]
        assert time.monotonic() < deadline, f"{name}: no answer to {request!r}"
        time.sleep(0.1)


def answers(cli: CLI, name: str) -> list[str]:
    r = cli("exec", name, "--", "sh", "-c", "cat /run/answers 2>/dev/null || true")
    return r.stdout.decode().splitlines()


def wait_ready(cli: CLI, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while cli("exec", name, "--", "test", "-p", "/run/req", check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{name}: the Python server did not start"
        time.sleep(0.2)


def snapshot_digest(g: Path) -> str:
    h = hashlib.sha256()
    for f in ("snapshots/snapshot-latest/memory", "snapshots/snapshot-latest/state",
              "snapshots/snapshot-latest/config.json", "disk.raw"):
        h.update(f.encode())
        with open(g / f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def names(built: CLI) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for n in made:
        built("rm", "-f", n, check=False)


def test_python_fork(built: CLI, python_image: str, names: list[str], report: list[str]) -> None:
    src, forks = "py-src", ["py-f1", "py-f2"]
    names += [src, *forks]
    t0 = time.monotonic()
    built("run", src, "--memory", "512M", "--image", python_image, "--", "python3", "-c", PROGRAM)
    wait_ready(built, src)
    assert ask(built, src, "get 100") == f"{src} get 100 1"
    cold = time.monotonic() - t0
    assert ask(built, src, "set 7 42") == f"{src} set 7 42"
    main = built.json("inspect", src)["main"]  # type: ignore[index]
    assert main["state"] == "running" and main["argv"][0] == "python3"

    built("standby", src)
    g = Path(built.json("inspect", src)["dir"])  # type: ignore[index]
    before = snapshot_digest(g)

    took: dict[str, float] = {}
    for f in forks:
        t1 = time.monotonic()
        built("fork", src, f, "--target-state", "running")
        first = ask(built, f, "get 7")
        took[f] = time.monotonic() - t1
        assert first == f"{f} get 7 42"  # the state built before the fork, in the fork
    for f in forks:  # all of it: 200 MiB of ones but the five of START and the one set to 42
        assert ask(built, f, "count") == f"{f} count {(STATE_MIB << 20) - 6}"
    for i, f in enumerate(forks, 1):  # diverge: each mutates its own copy
        assert ask(built, f, f"set 7 {100 + i}") == f"{f} set 7 {100 + i}"
    for i, f in enumerate(forks, 1):
        assert ask(built, f, "get 7") == f"{f} get 7 {100 + i}"
        m = built.json("inspect", f)["main"]  # type: ignore[index]
        assert m["state"] == "running"  # the main process continued in the fork

    assert built.state(src) == "standby"
    assert snapshot_digest(g) == before  # the source's snapshot: byte-identical throughout
    built("restore", src)
    assert ask(built, src, "get 7") == f"{src} get 7 42"  # and the source continues unchanged

    best = min(took.values())
    report.append(f"python fork: cold start (run + build {STATE_MIB} MiB + first answer) {cold:.1f}s; "
                  f"fork -> first answer {', '.join(f'{k} {v:.1f}s' for k, v in took.items())}; "
                  f"ratio {cold / best:.1f}x")
