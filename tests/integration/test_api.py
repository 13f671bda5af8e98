"""Issue 14: the HTTP API. A real `vmfork serve` subprocess (unix socket + TCP on 127.0.0.1)
over the session data dir, real guests, driven through the SDK and through raw httpx."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import CLI, kill_all_vmms
from vmfork import retry

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    sock: Path
    port: int
    log: Path

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    def client(self) -> object:
        import vmfork

        return vmfork.Client(str(self.sock))

    def raw(self) -> httpx.Client:
        return httpx.Client(base_url="http://vmfork", transport=httpx.HTTPTransport(uds=str(self.sock)), timeout=300)


def start_server(data_dir: Path, *extra: str) -> Server:
    log = data_dir.parent / f"serve-{data_dir.name}-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "--data-dir", str(data_dir), "serve",
                                 "--listen", "127.0.0.1:0", *extra], stdout=f, stderr=f)
    port = None
    for _ in retry.attempts(60, first=0.05, cap=0.5):
        text = log.read_text()
        if "listening on http://127.0.0.1:" in text:
            port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
            break
        assert proc.poll() is None, f"vmfork serve exited: {text}"
    assert port, f"vmfork serve did not listen: {log.read_text()}"
    return Server(proc, data_dir, data_dir / "vmfork.sock", port, log)


def stop_server(s: Server) -> int:
    s.proc.terminate()
    return s.proc.wait(60)


@pytest.fixture(scope="session")
def server(built: CLI) -> Iterator[Server]:
    s = start_server(built.data_dir)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def box(server: Server) -> Iterator[object]:
    """One running guest for the exec and files tests, made through the SDK."""
    c = server.client()
    inst = c.instances.run("api-box", memory="256M")  # type: ignore[attr-defined]
    yield inst
    inst.delete()


def test_lifecycle_through_the_sdk(server: Server, box: object, report: list[str]) -> None:
    import vmfork
    from vmfork.client import NotFoundError, WrongStateError

    c = server.client()
    assert isinstance(c, vmfork.Client)
    assert box.state == "running"  # type: ignore[attr-defined]
    got = c.instances.get("api-box")
    assert got.id == box.id and got.info.console_log  # type: ignore[attr-defined]
    r = box.exec(["sh", "-c", "echo hello; echo oops >&2; exit 3"])  # type: ignore[attr-defined]
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hello\n", "oops\n")
    box.exec("echo parent > /root/who")  # type: ignore[attr-defined]

    t0 = time.monotonic()
    box.standby()  # type: ignore[attr-defined]
    standby_s = time.monotonic() - t0
    assert c.instances.get("api-box").state == "standby"
    with pytest.raises(WrongStateError):
        box.exec("true")  # type: ignore[attr-defined]
    forks = box.fork("api-kid", count=2)  # type: ignore[attr-defined]
    assert [f.name for f in forks] == ["api-kid-1", "api-kid-2"]
    assert {f.state for f in forks} == {"standby"}
    t0 = time.monotonic()
    forks[0].restore()
    restore_s = time.monotonic() - t0
    box.restore()  # type: ignore[attr-defined]
    forks[0].exec("echo kid > /root/who")
    assert box.exec("cat /root/who").stdout == "parent\n"  # type: ignore[attr-defined]
    assert forks[0].exec("cat /root/who").stdout == "kid\n"
    assert {i.name for i in c.instances.list(state="standby")} >= {"api-kid-2"}
    assert "api-kid-2" not in {i.name for i in c.instances.list(state="running")}

    w = forks[0].wait("running", timeout=5)
    assert w.reached and w.state == "running"
    w = forks[1].wait("running", timeout=0.5)
    assert not w.reached and w.state == "standby"
    s = forks[0].stats()
    assert s.cpu_seconds is not None and s.rss_bytes and s.memory_bytes == 256 << 20
    assert any("guest ready" in line for line in box.logs(tail=500))  # type: ignore[attr-defined]

    snap = forks[0].snapshot("api-snap").snapshot
    assert snap.source_name == "api-kid-1" and "api-snap" in {x.name for x in c.snapshots.list()}
    sfork = c.snapshots.fork("api-snap", "api-from-snap", target_state="running")
    assert sfork[0].exec("cat /root/who").stdout == "kid\n"
    c.snapshots.delete("api-snap")
    with pytest.raises(NotFoundError):
        c.snapshots.get("api-snap")

    forks[0].stop()
    assert c.instances.get("api-kid-1").state == "stopped"
    for inst in (*forks, sfork[0]):
        inst.delete()
    with pytest.raises(NotFoundError):
        c.instances.get("api-kid-1")
    assert "api-kid-1" not in {i.name for i in c.instances.list()}
    metrics = c.metrics()
    assert 'vmfork_operation_seconds_count{operation="fork",outcome="ok"}' in metrics
    assert 'vmfork_instances{state="running"}' in metrics
    report.append(f"API: standby {standby_s * 1000:.0f} ms, restore of a fork {restore_s * 1000:.0f} ms (TCG)")


def test_errors_are_problems_with_stable_codes(server: Server, box: object) -> None:
    with server.raw() as h:
        cases = [
            (h.get("/instances/no-such"), 404, "not_found"),
            (h.post("/instances", json={"name": "api-box"}), 409, "already_exists"),
            (h.post("/instances/api-box/restore"), 409, "wrong_state"),
            (h.post("/instances", json={"name": "Bad Name"}), 400, "invalid"),
            (h.post("/instances", json={"name": "api-x", "memory": "lots"}), 400, "invalid"),
            (h.post("/instances", json={"name": "api-x", "env": {"A": "1"}}), 400, "invalid"),  # env needs an image
            (h.post("/instances", json={"name": "api-x", "image": "127.0.0.1:1/none:1"}), 502, "registry_error"),
            (h.post("/instances/api-box/exec", json={"argv": []}), 400, "invalid"),
            (h.post("/instances/api-box/exec", content=b"{not json", headers={"content-type": "application/json"}),
             400, "invalid"),
            (h.post("/instances/api-box/fork", json={"name": "api-f"}), 409, "wrong_state"),  # running
            (h.get("/instances/api-box/files", params={"path": "relative"}), 400, "invalid"),
            (h.get("/instances/api-box/files", params={"path": "/no/such/file"}), 404, "not_found"),
            (h.get("/snapshots/nope"), 404, "not_found"),
            (h.get("/instances/api-box/wait", params={"state": "sleeping"}), 400, "invalid"),
        ]
        for resp, status, code in cases:
            assert resp.status_code == status, (resp.request.url, resp.text)
            assert resp.headers["content-type"] == "application/problem+json", resp.headers
            body = resp.json()
            assert body["code"] == code and body["status"] == status and body["detail"], body
            assert "\n" not in body["detail"]
        assert "api-x" not in {d["name"] for d in h.get("/instances").json()}


def test_files_round_trip(server: Server, box: object) -> None:
    data = os.urandom(300_000) + b"\x00end"
    box.write_file("/root/up/deep/blob.bin", data)  # type: ignore[attr-defined]
    assert box.read_file("/root/up/deep/blob.bin") == data  # type: ignore[attr-defined]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
    box.write_file("/root/tree", buf.getvalue(), tar=True)  # type: ignore[attr-defined]
    assert box.exec("cat /root/tree/a.txt").stdout == "hello"  # type: ignore[attr-defined]
    with tarfile.open(fileobj=io.BytesIO(box.read_file("/root/up")), mode="r") as t:  # type: ignore[attr-defined]
        assert "./deep/blob.bin" in t.getnames()
    with server.raw() as h:
        r = h.put("/instances/api-box/files", params={"path": "/root/big"}, content=b"x" * ((15 << 20) + 1))
        assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_eight_concurrent_execs(server: Server, box: object, report: list[str]) -> None:
    """Eight execs meet at a barrier in the guest: they can only all finish if they run at once."""
    box.exec("rm -rf /tmp/bar; mkdir /tmp/bar")  # type: ignore[attr-defined]
    script = ("touch /tmp/bar/{i}; n=0; while [ $(ls /tmp/bar | wc -l) -lt 8 ]; do sleep 0.1; "
              "n=$((n+1)); [ $n -gt 600 ] && exit 9; done; echo out{i}; exit {i}")
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: box.exec(script.format(i=i), timeout=120), range(8)))  # type: ignore[attr-defined]
    secs = time.monotonic() - t0
    assert [(r.exit_code, r.stdout) for r in results] == [(i, f"out{i}\n") for i in range(8)]
    report.append(f"API: 8 concurrent execs meeting at a barrier in {secs:.2f}s")


def test_streaming_exec_with_stdin(server: Server, box: object) -> None:
    from vmfork.client import InvalidError

    out: list[bytes] = []
    err: list[bytes] = []
    stdin = b"line one\nline two\n" * 1000
    final = box.exec_stream(["sh", "-c", "tee /dev/stderr | wc -l; exit 7"], stdin=stdin,  # type: ignore[attr-defined]
                            on_stdout=out.append, on_stderr=err.append)
    assert final["type"] == "exit" and final["exit_code"] == 7
    assert b"".join(out).strip() == b"2000"
    assert b"".join(err) == stdin
    from httpx_ws import connect_ws

    with server.raw() as h, connect_ws("/instances/api-box/exec/ws", h) as ws:
        ws.send_text(json.dumps({"argv": ["cat"], "stream_stdin": True}))
        ws.send_text(json.dumps({"type": "dance"}))
        msg = json.loads(ws.receive_text())
    assert msg["type"] == "error" and msg["code"] == "invalid" and "expected stdin bytes" in msg["detail"]
    with pytest.raises(InvalidError):
        box.exec_stream([""])  # type: ignore[attr-defined]


def _expect(session: object, pattern: bytes, seen: bytearray, timeout: float = 60.0) -> re.Match[bytes]:
    """Read the session's output into ``seen`` until ``pattern`` matches (consumed)."""
    deadline = time.monotonic() + timeout
    while (m := re.search(pattern, bytes(seen))) is None:
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen; output: {bytes(seen)!r}"
        try:
            event = session.recv(left)  # type: ignore[attr-defined]
        except TimeoutError:
            continue
        assert event is not None, f"the command exited before {pattern!r}; output: {bytes(seen)!r}"
        seen += event[1]
    del seen[: m.end()]
    return m


def test_interactive_stdin_over_the_websocket(server: Server, box: object, report: list[str]) -> None:
    """Each reply is read before the next line is sent: stdin really streams. EOF ends cat."""
    seen = bytearray()
    with box.exec_interactive(["sh", "-c", "read x; echo got:$x; read y; echo second:$y; exit 5"]) as s:  # type: ignore[attr-defined]
        t0 = time.monotonic()
        s.send("hello\n")
        _expect(s, rb"got:hello\n", seen)
        rtt = time.monotonic() - t0
        s.send(b"bye\n")
        _expect(s, rb"second:bye\n", seen)
        assert s.wait()["exit_code"] == 5
    with box.exec_interactive("cat") as s:  # type: ignore[attr-defined]
        s.send(b"line\n")
        _expect(s, rb"line\n", seen)
        s.close_stdin()
        final = s.wait()
        assert (final["exit_code"], final["signal"]) == (0, None)
    # more stdin than any window, through a command that reads it slowly at first
    data = os.urandom(4 << 20)
    out: list[bytes] = []
    final = box.exec_stream(["sh", "-c", "sleep 1; sha256sum"], stdin=data, on_stdout=out.append)  # type: ignore[attr-defined]
    import hashlib

    assert final["exit_code"] == 0 and b"".join(out).split()[0].decode() == hashlib.sha256(data).hexdigest()
    report.append(f"API: interactive exec, one line to its answer over the WebSocket in {rtt * 1000:.0f} ms")


def test_tty_exec_with_resize_and_disconnect(server: Server, box: object) -> None:
    script = ("echo pid:$$; tty; stty size; trap 'echo winch; stty size' WINCH; echo ready; "
              "i=0; while [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done")
    seen = bytearray()
    with box.exec_interactive(["sh", "-c", script], tty=True, rows=30, cols=100) as s:  # type: ignore[attr-defined]
        pid = int(_expect(s, rb"pid:(\d+)\r\n", seen).group(1))
        assert re.fullmatch(rb"/dev/pts/\d+", _expect(s, rb"(\S+)\r\n", seen).group(1))
        _expect(s, rb"30 100\r\n", seen)
        _expect(s, rb"ready\r\n", seen)
        s.resize(40, 120)
        _expect(s, rb"winch\r\n40 120\r\n", seen)
    # the session closed mid-exec: the command (on its tty) is killed in the guest
    assert _guest_pid_gone(box, pid), f"tty process {pid} still runs after the WebSocket closed"
    with box.exec_interactive(["sh", "-c", "[ -t 0 ] && echo isatty; echo err >&2; exec cat"], tty=True) as s:  # type: ignore[attr-defined]
        _expect(s, rb"isatty\r\nerr\r\n", seen)  # stderr is the terminal too
        s.send("typed\n")
        _expect(s, rb"typed\r\n", seen)
        s.close_stdin()  # ^D: cat reads end of file
        assert s.wait()["exit_code"] == 0


def _guest_pid_gone(box: object, pid: int) -> bool:
    for _ in retry.attempts(60, first=0.2, cap=1.0):
        if box.exec(["test", "-d", f"/proc/{pid}"]).exit_code == 1:  # type: ignore[attr-defined]
            return True
    return False


def test_client_disconnect_kills_the_guest_process(server: Server, box: object) -> None:
    from httpx_ws import connect_ws

    with server.raw() as h, connect_ws("/instances/api-box/exec/ws", h) as ws:
        ws.send_text(json.dumps({"argv": ["sh", "-c", "echo $$; exec sleep 1000"]}))
        first = ws.receive_bytes()
        assert first[:1] == b"\x01"
        pid = int(first[1:].strip())
        assert box.exec(["test", "-d", f"/proc/{pid}"]).exit_code == 0  # type: ignore[attr-defined]
    assert _guest_pid_gone(box, pid), f"guest process {pid} still runs after the WebSocket closed"

    # The plain form too: a client that gives up (timeout) ends its command.
    box.exec("rm -f /tmp/pp")  # type: ignore[attr-defined]
    with server.raw() as h, pytest.raises(httpx.ReadTimeout):
        h.post("/instances/api-box/exec", json={"argv": ["sh", "-c", "echo $$ > /tmp/pp; exec sleep 1000"]},
               timeout=3)
    for _ in retry.attempts(30, first=0.2, cap=1.0):
        r = box.exec("cat /tmp/pp")  # type: ignore[attr-defined]
        if r.exit_code == 0 and r.stdout.strip():
            break
    assert _guest_pid_gone(box, int(r.stdout)), "guest process still runs after the HTTP client went away"


PROBE = """
import errno, json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1]); print(0)
except OSError as e:
    print(e.errno)
"""


def test_auth(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/instances"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert httpx.get(url, headers={"Authorization": f"Bearer {server.token}"}).status_code == 200
    assert stat.S_IMODE((server.data_dir / "api-token").stat().st_mode) == 0o600
    # Rotation takes effect at once, on the running server.
    old = server.token
    subprocess.run([sys.executable, "-m", "vmfork.cli", "--data-dir", str(server.data_dir), "api-token",
                    "--rotate"], check=True, capture_output=True, timeout=60)
    assert server.token != old
    assert httpx.get(url, headers={"Authorization": f"Bearer {old}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {server.token}"}).status_code == 200
    # The unix socket: 0600, and another user cannot connect to it (EACCES on the socket itself:
    # a hard link in a directory everyone may traverse).
    assert stat.S_IMODE(server.sock.stat().st_mode) == 0o600
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    d = Path(tempfile.mkdtemp(dir=server.data_dir.parent))
    try:
        os.chmod(d, 0o711)
        os.link(server.sock, d / "s")
        r2 = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", PROBE, str(d / "s")],
                            capture_output=True, text=True, timeout=60, check=True)
        assert int(r2.stdout) == errno.EACCES, r2
        # Control: the same probe as root connects (the link works).
        r3 = subprocess.run(["/usr/bin/python3", "-c", PROBE, str(d / "s")], capture_output=True, text=True,
                            timeout=60, check=True)
        assert int(r3.stdout) == 0
    finally:
        shutil.rmtree(d)


def test_fuzz_every_endpoint_against_the_openapi_document(built: CLI, tmp_path: Path, report: list[str]) -> None:
    """schemathesis on a server of an empty data dir (so that generated input cannot boot VMs):
    no 5xx, every answer matches the document. POST /instances and POST /images only get
    invalid input (valid input would boot VMs or pull from registries on the internet)."""
    if shutil.which("schemathesis") is None and not (Path(sys.executable).parent / "schemathesis").exists():
        pytest.skip("schemathesis is not installed")
    exe = str(Path(sys.executable).parent / "schemathesis")
    s = start_server(tmp_path / "fuzz-data")
    try:
        base = [exe, "run", str(ROOT / "docs" / "openapi.json"), "-u", f"http://127.0.0.1:{s.port}",
                "-H", f"Authorization: Bearer {s.token}", "--generation-allow-x00", "false",
                "-c", "not_a_server_error,response_schema_conformance,status_code_conformance,"
                      "content_type_conformance", "--phases", "coverage,fuzzing", "--seed", "14"]
        t0 = time.monotonic()
        creating = ("create_instance_instances_post", "pull_image_images_post")
        # fuzz_hooks drops the generated "invalid" requests of those two that are in fact valid
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.fuzz_hooks",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([*base, "-n", "15", *(a for op in creating for a in ("--exclude-operation-id", op))],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stdout[-6000:]
        r2 = subprocess.run([*base, "-n", "30", "--mode", "negative",
                             *(a for op in creating for a in ("--include-operation-id", op))],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert r2.returncode == 0, r2.stdout[-6000:]
        assert not list((s.data_dir / "guests").iterdir())
        cases = [line for line in (r.stdout + r2.stdout).splitlines() if "generated," in line]
        report.append(f"API fuzzing: {'; '.join(c.strip() for c in cases)} in {time.monotonic() - t0:.0f}s")
    finally:
        stop_server(s)
        kill_all_vmms(s.data_dir)  # none, unless a generated request booted one (then the test failed)


def test_load_fifty_clients_while_forks_and_standbys_run(server: Server, box: object, report: list[str]) -> None:
    c = server.client()
    src = c.instances.run("api-load-src", memory="256M")  # type: ignore[attr-defined]
    stop = threading.Event()
    errors: list[str] = []
    lat: list[float] = []
    lock = threading.Lock()

    def background() -> None:  # forks and standbys while the clients run
        i = 0
        try:
            while not stop.is_set():
                i += 1
                src.standby()
                src.fork(f"api-load-f{i}")[0].delete()
                src.restore()
        except Exception as e:
            errors.append(f"background: {e!r}")

    def client(n: int) -> None:
        import vmfork

        with vmfork.Client(str(server.sock)) as cl:
            for k in range(6):
                t0 = time.monotonic()
                try:
                    if k % 3 == 0:
                        cl.instances.list()
                    elif k % 3 == 1:
                        cl.instances.get("api-box")
                    else:
                        r = cl.instances.get("api-box").exec(["echo", str(n)])
                        assert r.stdout == f"{n}\n", r
                except Exception as e:
                    with lock:
                        errors.append(f"client {n}: {e!r}")
                    return
                with lock:
                    lat.append(time.monotonic() - t0)

    bg = threading.Thread(target=background)
    bg.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            list(pool.map(client, range(50)))
    finally:
        stop.set()
        bg.join(600)
    src.delete()
    assert not errors, errors[:5]
    assert len(lat) == 300
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
    report.append(f"API load: 50 clients x 6 requests (list/get/exec) during forks+standbys: "
                  f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")


def test_async_client(server: Server, box: object) -> None:
    import asyncio

    import vmfork
    from vmfork.client import NotFoundError

    async def main() -> list[str]:
        async with vmfork.AsyncClient(str(server.sock)) as c:
            inst = await c.instances.get("api-box")
            rs = await asyncio.gather(*(inst.exec(["echo", str(i)]) for i in range(4)))
            with pytest.raises(NotFoundError):
                await c.instances.get("nope")
            await inst.write_file("/root/async.txt", b"async")
            assert await inst.read_file("/root/async.txt") == b"async"
            return [r.stdout for r in rs]

    assert asyncio.run(main()) == [f"{i}\n" for i in range(4)]


async def _aexpect(session: object, pattern: bytes, seen: bytearray, timeout: float = 60.0) -> re.Match[bytes]:
    """_expect for an AsyncExecSession."""
    deadline = time.monotonic() + timeout
    while (m := re.search(pattern, bytes(seen))) is None:
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen; output: {bytes(seen)!r}"
        try:
            event = await session.recv(left)  # type: ignore[attr-defined]
        except TimeoutError:
            continue
        assert event is not None, f"the command exited before {pattern!r}; output: {bytes(seen)!r}"
        seen += event[1]
    del seen[: m.end()]
    return m


def test_async_interactive_exec(server: Server, box: object) -> None:
    """AsyncInstance.exec_interactive: a reply read before the next line is written, stdout
    and stderr apart, stdin written while the output is read (another task) up to its eof,
    a tty resized; leaving the block mid-command or cancelling its task kills the command."""
    import asyncio
    import hashlib

    import vmfork

    data = os.urandom(1 << 20)

    async def main() -> list[int]:
        async with vmfork.AsyncClient(str(server.sock)) as c:
            inst = await c.instances.get("api-box")
            seen = bytearray()
            script = "read x; echo got:$x; read y; echo second:$y >&2; exit 5"
            async with inst.exec_interactive(["sh", "-c", script]) as s:
                await s.write("hello\n")
                await _aexpect(s, rb"got:hello\n", seen)
                await s.write(b"bye\n")
                assert [e async for e in s] == [("stderr", b"second:bye\n")]
                assert s.result == {"type": "exit", "exit_code": 5, "timed_out": False, "signal": None}
                assert await s.wait() == 5

            async with inst.exec_interactive("sha256sum; cat /dev/null; echo done >&2") as s:
                async def feed() -> None:
                    await s.write(data)
                    await s.close_stdin()

                writer = asyncio.ensure_future(feed())
                out = [e async for e in s]
                await writer
            assert out[0][0] == "stdout" and out[0][1].split()[0].decode() == hashlib.sha256(data).hexdigest()
            assert out[-1] == ("stderr", b"done\n") and s.result is not None and s.result["exit_code"] == 0

            tty_script = ("echo pid:$$; stty size; trap 'echo winch; stty size' WINCH; echo ready; "
                          "i=0; while [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done")
            async with inst.exec_interactive(["sh", "-c", tty_script], tty=True, rows=30, cols=100) as s:
                tty_pid = int((await _aexpect(s, rb"pid:(\d+)\r\n", seen)).group(1))
                await _aexpect(s, rb"30 100\r\nready\r\n", seen)
                await s.resize(40, 120)
                await _aexpect(s, rb"winch\r\n40 120\r\n", seen)
            # left mid-command: killed (checked below)

            pids: asyncio.Queue[int] = asyncio.Queue()

            async def session() -> None:
                async with inst.exec_interactive(["sh", "-c", "echo $$; exec sleep 1000"]) as s:
                    event = await s.recv(60)
                    assert event is not None
                    pids.put_nowait(int(event[1]))
                    await asyncio.sleep(1000)

            task = asyncio.ensure_future(session())
            cancelled_pid = await asyncio.wait_for(pids.get(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return [tty_pid, cancelled_pid]

    tty_pid, cancelled_pid = asyncio.run(main())
    assert _guest_pid_gone(box, tty_pid), f"tty process {tty_pid} still runs after the session was left"
    assert _guest_pid_gone(box, cancelled_pid), f"process {cancelled_pid} still runs after its task was cancelled"


def _gauge(server: Server, name: str) -> int:
    with server.raw() as h:
        text = h.get("/metrics").text
    return int(re.search(rf"^vmfork_{name} (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]


def _no_exec_stream_left(server: Server) -> bool:
    return any(_gauge(server, "exec_streams") == 0 for _ in retry.attempts(60, first=0.2, cap=1.0))


def _until_window_full(server: Server, what: str) -> None:
    """Wait until the server holds the session's stdin window full (it reads nothing from it)."""
    for _ in retry.attempts(240, first=0.1, cap=0.5):
        if _gauge(server, "exec_stdin_full") == 1:
            return
    raise AssertionError(f"{what}: the stdin window never filled")


STALLED_CLIENT = """
import sys, vmfork
host, token = sys.argv[1], sys.argv[2] or None
box = vmfork.Client(host, token=token).instances.get("api-box")
s = box.exec_interactive(["sh", "-c", "echo $$; exec sleep 1000"])
print(int(s.recv(60)[1]), flush=True)
while True:
    s.send(b"x" * (64 << 10))
"""


def test_disconnect_with_a_full_stdin_window(server: Server, box: object, report: list[str]) -> None:
    """A client gone while the command reads no stdin and the window is full (the server
    reads nothing from it then): killed (unix socket and TCP), or closing its session while
    a send is blocked (async and sync SDK). Each time the guest process ends and the server's
    task for the session ends (vmfork_exec_streams back to 0)."""
    import asyncio

    import vmfork
    from vmfork.client import CLOSE_WAIT

    assert _no_exec_stream_left(server)
    for host, token in ((str(server.sock), ""), (f"http://127.0.0.1:{server.port}", server.token)):
        kind = "unix" if host.startswith("/") else "tcp"
        p = subprocess.Popen([sys.executable, "-c", STALLED_CLIENT, host, token], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            pid = int(p.stdout.readline())
            _until_window_full(server, kind)
            assert _gauge(server, "exec_streams") == 1
        finally:
            p.kill()
            p.wait()
        t0 = time.monotonic()
        assert _guest_pid_gone(box, pid), f"guest process {pid} still runs after its client was killed ({kind})"
        gone_s = time.monotonic() - t0
        assert _no_exec_stream_left(server), f"the server's task of the killed client's exec runs on ({kind})"
        assert _gauge(server, "exec_stdin_full") == 0
        report.append(f"API: client killed with a full stdin window ({kind}): guest process gone {gone_s:.1f} s later")

    async def async_session() -> tuple[int, float]:
        async with vmfork.AsyncClient(str(server.sock)) as c:
            inst = await c.instances.get("api-box")
            async with inst.exec_interactive(["sh", "-c", "echo $$; exec sleep 1000"]) as s:
                event = await s.recv(60)
                assert event is not None

                async def feed() -> None:
                    with contextlib.suppress(Exception):
                        while True:
                            await s.write(b"x" * (64 << 10))

                writer = asyncio.ensure_future(feed())
                await asyncio.to_thread(_until_window_full, server, "async session")
                t0 = time.monotonic()
            closed_s = time.monotonic() - t0
            await asyncio.wait_for(writer, 10)  # its blocked write failed
            return int(event[1]), closed_s

    pid, closed_s = asyncio.run(async_session())
    assert closed_s < CLOSE_WAIT + 5, f"leaving the async session took {closed_s:.1f} s"
    assert _guest_pid_gone(box, pid), f"guest process {pid} still runs after the async session was left"
    assert _no_exec_stream_left(server)

    s = box.exec_interactive(["sh", "-c", "echo $$; exec sleep 1000"])  # type: ignore[attr-defined]
    event = s.recv(60)

    def feed() -> None:
        with contextlib.suppress(Exception):
            while True:
                s.send(b"x" * (64 << 10))

    sender = threading.Thread(target=feed, daemon=True)
    sender.start()
    _until_window_full(server, "sync session")
    t0 = time.monotonic()
    s.close()
    closed_sync_s = time.monotonic() - t0
    sender.join(10)
    assert not sender.is_alive(), "the blocked send still blocks after close"
    assert closed_sync_s < CLOSE_WAIT + 5, f"closing the sync session took {closed_sync_s:.1f} s"
    assert _guest_pid_gone(box, int(event[1])), "guest process still runs after the sync session was closed"
    assert _no_exec_stream_left(server)
    report.append(f"API: session closed with a full stdin window: async {closed_s:.1f} s, sync {closed_sync_s:.1f} s "
                  f"(CLOSE_WAIT {CLOSE_WAIT:g} s)")


def test_auto_standby_and_wake_on_use(server: Server, report: list[str]) -> None:
    """An instance created with auto_standby goes to standby once idle; an exec then restores
    it first and runs (the client only sees a slower exec)."""
    c = server.client()
    inst = c.instances.run("api-idle", memory="256M", auto_standby=3)  # type: ignore[attr-defined]
    try:
        assert inst.info.auto_standby == 3
        assert inst.exec("echo $((6*7)) > /root/kept").exit_code == 0
        w = inst.wait("standby", timeout=120)
        assert w.reached, w
        t0 = time.monotonic()
        r = inst.exec("cat /root/kept")
        wake_exec = time.monotonic() - t0
        assert r.stdout == "42\n"  # its RAM and disk came back with it
        assert c.instances.get("api-idle").state == "running"  # type: ignore[attr-defined]
        t0 = time.monotonic()
        inst.exec("true")
        warm_exec = time.monotonic() - t0
        assert 'vmfork_operation_seconds_count{operation="standby",outcome="ok"}' in c.metrics()  # type: ignore[attr-defined]
        report.append(f"API auto-standby: exec on an idle instance in standby {wake_exec * 1000:.0f} ms "
                      f"(restore included) vs {warm_exec * 1000:.0f} ms running (TCG)")
    finally:
        inst.delete()


def test_cli_through_the_server(built: CLI, server: Server, box: object) -> None:
    """`vmfork --host SOCKET ...` acts through the server (VMFORK_HOST too)."""
    host = ("--host", str(server.sock))
    rows = json.loads(built(*host, "ps", "--json").stdout)
    assert "api-box" in {r["name"] for r in rows}
    r = built(*host, "exec", "-i", "api-box", "--", "sh", "-c", "cat; echo err >&2; exit 5", check=False,
              input=b"in\n")
    assert (r.returncode, r.stdout, r.stderr) == (5, b"in\n", b"err\n"), r
    r = built("inspect", "no-such", "--json", check=False, env={"VMFORK_HOST": str(server.sock)})
    assert r.returncode == 3 and b"not found" in r.stderr
    d = json.loads(built(*host, "inspect", "api-box", "--json").stdout)
    assert d["name"] == "api-box" and d["state"] == "running"
    r = built("--host", str(server.data_dir / "nothing.sock"), "ps", check=False)
    assert r.returncode == 1 and b"cannot reach the vmfork server" in r.stderr, r


def _read_until(fd: int, pattern: bytes, seen: bytearray, timeout: float = 60.0) -> None:
    import select

    deadline = time.monotonic() + timeout
    while pattern not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen; output: {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every holder of the other end is gone
                chunk = b""
            assert chunk, f"{pattern!r} not seen before the end; output: {bytes(seen)!r}"
            seen += chunk
    del seen[: seen.index(pattern) + len(pattern)]


def test_cli_exec_streams_stdin_and_runs_on_a_tty(built: CLI, server: Server, box: object) -> None:
    """`vmfork exec -i` answers a line before the next is written (directly and through the
    server); `vmfork exec -t` on a terminal gives the command one of the same size, resized
    with it (SIGWINCH), in raw mode (restored afterwards)."""
    import fcntl
    import pty
    import signal
    import struct
    import termios

    base = [sys.executable, "-m", "vmfork.cli", "--data-dir", str(built.data_dir), "-q"]
    for host in ([], ["--host", str(server.sock)]):
        p = subprocess.Popen([*base, *host, "exec", "-i", "api-box", "--", "sh", "-c",
                              "read x; echo got:$x; read y; echo second:$y"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"one\n")
            p.stdin.flush()
            seen = bytearray()
            _read_until(p.stdout.fileno(), b"got:one\n", seen)
            p.stdin.write(b"two\n")
            p.stdin.close()
            assert p.stdout.read() == b"second:two\n" and p.wait(60) == 0, p.stderr.read() if p.stderr else ""
        finally:
            p.kill()
            p.wait()

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([*base, "exec", "-t", "api-box", "--", "sh", "-c",
                          "tty; stty size; i=0; while [ \"$(stty size)\" = '33 111' ] && [ $i -lt 600 ]; "
                          "do sleep 0.1; i=$((i+1)); done; stty size; read x; echo done:$x"],
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    try:
        seen = bytearray()
        _read_until(master, b"/dev/pts/", seen)
        _read_until(master, b"33 111\r\n", seen)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 122, 0, 0))
        os.kill(p.pid, signal.SIGWINCH)  # no controlling terminal here: as the kernel would
        _read_until(master, b"44 122\r\n", seen)
        os.write(master, b"hi\r")  # raw mode: the guest's terminal turns \r into \n
        _read_until(master, b"done:hi", seen)
        assert p.wait(60) == 0
        assert termios.tcgetattr(slave) == before, "the terminal was left in raw mode"
    finally:
        p.kill()
        p.wait()
        os.close(master)
        os.close(slave)


def test_sigterm_leaves_guests_running(built: CLI, server: Server, box: object) -> None:
    """Last in this module: a second server on the data dir is refused; SIGTERM stops the
    session server cleanly (socket removed) and the guest it served keeps running."""
    second = subprocess.run([sys.executable, "-m", "vmfork.cli", "--data-dir", str(built.data_dir), "serve"],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 4 and "already listens" in second.stderr, second
    assert stop_server(server) == 0, server.log.read_text()
    assert not server.sock.exists()
    assert built.state("api-box") == "running"
    again = start_server(built.data_dir)  # the session fixture stops this one
    server.proc, server.port, server.log = again.proc, again.port, again.log
    assert box.exec("echo still").stdout == "still\n"  # type: ignore[attr-defined]
