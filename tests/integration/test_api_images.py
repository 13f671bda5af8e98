"""Issue 14, images over the API: a real registry (docker-registry on 127.0.0.1) with a test
image built by umoci, a real `vmfork serve` over a data dir of its own, real guests.

Pull through the SDK (and raw: 202, then GET to follow), list, get by ref and digest, run an
instance of the image with `env` and find it in the guest's main process, delete refused
while the instance (or a named snapshot) uses the image, allowed after; bad input answered
with problems (400 invalid, 404 not_found, 502 registry_error) carrying skopeo's message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI, kill_all_vmms
from tests.integration.oci import build as ob
from tests.integration.test_api import Server, start_server, stop_server

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    reason = ob.tools_missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("oci-api")
    with ob.registry(work / "registry") as host:
        probe = ob.probe_binary(work).read_bytes()
        busybox = Path("/bin/busybox").read_bytes()
        layer = ob.Layer().dir("bin").file("bin/busybox", busybox, 0o755).file("probe", probe, 0o755)
        refs = {"host": host}
        refs["probe"] = ob.push(ob.image(work / "layout", "probe", [layer], config={
            "entrypoint": ["/probe"], "cmd": ["serve", "c1"], "env": ["FOO=bar", "PATH=/bin"]}), host, "api/probe:1")
        refs["other"] = ob.push(ob.image(work / "layout", "other", [ob.Layer().file("other", b"other\n")],
                                         config={"cmd": ["/other"]}), host, "api/other:1")
        refs["arm"] = ob.push(ob.image(work / "layout", "arm", [ob.Layer().file("x", b"arm")], config={"cmd": ["/x"]},
                                       arch="arm64"), host, "api/arm:1")
        yield refs


@pytest.fixture(scope="module")
def api(cli: CLI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server over a data dir of its own (its images are this module's only)."""
    own = CLI(tmp_path_factory.mktemp("vmfork-apiimages"))
    own("image", "build")
    s = start_server(own.data_dir)
    try:
        yield s
    finally:
        stop_server(s)
        for inst in own.json("ps") or []:  # type: ignore[union-attr]
            own("rm", "--force", inst["name"], check=False)
        kill_all_vmms(own.data_dir)


def sdk(s: Server) -> Any:
    return s.client()


def test_pull_list_get_through_the_sdk(api: Server, reg: dict[str, str], report: list[str]) -> None:
    c = sdk(api)
    t0 = time.monotonic()
    im = c.images.pull(reg["probe"])
    pull_s = time.monotonic() - t0
    assert im.status == "ready" and im.kind == "oci" and im.name == reg["probe"]
    assert im.refs == [reg["probe"]] and im.digest.startswith("sha256:") and im.size_bytes > 0
    assert im.entrypoint == ["/probe"] and im.cmd == ["serve", "c1"] and im.env["FOO"] == "bar"
    assert im.used_by == [] and im.error is None
    rows = c.images.list()
    assert [r.digest for r in rows if r.kind == "oci"] == [im.digest]
    assert any(r.kind == "builtin" and r.kernel_version for r in rows)  # the built-in image is listed too
    for name in (reg["probe"], im.digest, im.digest[7:19]):  # by ref, digest, short digest
        assert c.images.get(name).digest == im.digest, name
    raw = api.raw()
    r = raw.get(f"/images/{reg['probe']}")  # unencoded slashes and colons are fine too
    assert r.status_code == 200 and r.json()["digest"] == im.digest

    # hypeman's form: 202 at once, then follow with GET /images/{name}
    t0 = time.monotonic()
    r = raw.post("/images", json={"name": reg["probe"]})
    assert r.status_code == 202 and r.json()["status"] in ("pending", "pulling", "converting")
    seen = {r.json()["status"]}
    while (d := raw.get(f"/images/{reg['probe']}").json())["status"] != "ready":
        assert d["status"] in ("pending", "pulling", "converting"), d
        assert time.monotonic() - t0 < 120, d
        seen.add(d["status"])
        time.sleep(0.02)
    assert d["digest"] == im.digest  # the same image again (the same digest: nothing rebuilt)
    assert len([r for r in c.images.list() if r.kind == "oci"]) == 1
    report.append(f"API image pull (tiny image, local registry): {pull_s:.2f}s with wait=true; "
                  f"a re-pull followed through GET went through {sorted(seen)}")


def test_pull_streams_its_progress(api: Server, reg: dict[str, str]) -> None:
    """stream=true (the SDK's on_progress): skopeo's and the conversion's steps as server-sent
    events while the pull runs, then the image; a failure ends the stream with its problem."""
    from vmfork.client import NotFoundError

    c = sdk(api)
    lines: list[str] = []
    im = c.images.pull(reg["other"], on_progress=lines.append)
    assert im.status == "ready" and im.refs == [reg["other"]] and im.cmd == ["/other"]
    assert lines[0].startswith("pulling docker://") and any(x.startswith("skopeo: ") for x in lines)
    assert any(x.startswith("converting to a read-only ext4") for x in lines), lines
    assert lines[-1].startswith(f"image {im.digest[7:19]} ready"), lines
    with pytest.raises(NotFoundError, match="manifest unknown"):
        c.images.pull(f"{reg['host']}/api/other:nope", on_progress=lines.append)
    c.images.delete(reg["other"])
    c.images.delete(f"{reg['host']}/api/other:nope")  # its failed pull, forgotten


@pytest.mark.parametrize(("case", "status", "code", "words"), [
    ("bad-ref", 400, "invalid", "invalid image reference"),
    ("unknown-tag", 404, "not_found", "manifest unknown"),
    ("unknown-repo", 404, "not_found", "manifest unknown"),
    ("arm", 404, "not_found", "linux/arm64, not linux/amd64"),
    ("registry-down", 502, "registry_error", "connection refused"),
])
def test_pull_errors_are_problems(api: Server, reg: dict[str, str], case: str, status: int, code: str,
                                  words: str) -> None:
    from vmfork import client

    host = reg["host"]
    ref = {"bad-ref": "UPPER//case::", "unknown-tag": f"{host}/api/probe:nope", "unknown-repo": f"{host}/api/none:1",
           "registry-down": f"127.0.0.1:{ob.free_port()}/api/probe:1"}.get(case) or reg[case]
    raw = api.raw()
    r = raw.post("/images", params={"wait": "true"}, json={"name": ref})
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert body["code"] == code and words in body["detail"] and "\n" not in body["detail"], body
    with pytest.raises(client.ERRORS[code]) as ei:  # the SDK: one class per code
        sdk(api).images.pull(ref)
    assert ei.value.status == status and words in str(ei.value)
    if case != "bad-ref":  # the pull's failure is kept: GET shows it (as hypeman's status failed)
        d = raw.get(f"/images/{ref}").json()
        assert (d["status"], d["error_code"], d["error_status"]) == ("failed", code, status), d
        assert raw.delete(f"/images/{ref}").status_code == 204  # forgets the failed pull
    r = raw.get(f"/images/{ref}")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert not [p for p in (api.data_dir / "images" / "oci").iterdir() if p.name.startswith(".tmp")]


def test_run_with_env_and_delete_refused_while_used(api: Server, reg: dict[str, str]) -> None:
    from vmfork.client import BusyError, InvalidError, NotFoundError

    c = sdk(api)
    im = c.images.pull(reg["probe"])
    with pytest.raises(InvalidError, match="env: only with an OCI image"):
        c.instances.run("api-img-noimage", env={"A": "1"})
    with pytest.raises(NotFoundError, match="manifest unknown"):  # pulled on run, as `vmfork run --image`
        c.instances.run("api-img-none", image=f"{reg['host']}/api/none:1")
    box = c.instances.run("api-img", image=reg["probe"], env={"GREETING": "hello world", "FOO": "baz"},
                          cmd=["serve", "api"])
    try:
        assert box.state == "running"
        d = c.instances.get("api-img").info
        assert d.image_ref == reg["probe"] and d.image_oci_digest == im.digest
        assert d.main is not None and d.main["argv"] == ["/probe", "serve", "api"]
        deadline = time.monotonic() + 60
        while True:
            logs = box.logs(tail=500)
            if any("probe end" in line for line in logs):
                break
            assert time.monotonic() < deadline, logs
            time.sleep(0.3)
        for line in ("probe argv[2]=api", "probe env GREETING=hello world", "probe env FOO=baz", "probe env PATH=/bin"):
            assert any(line in x for x in logs), line
        assert not any("probe env FOO=bar" in x for x in logs)  # env replaces the image's value
        # an exec beside the main process gets the same environment, in the image's root
        r = box.exec(["/bin/busybox", "sh", "-c", 'echo "$GREETING/$FOO"; ls /probe'])
        assert (r.exit_code, r.stdout) == (0, "hello world/baz\n/probe\n")

        assert c.images.get(reg["probe"]).used_by == ["instance 'api-img'"]
        with pytest.raises(BusyError, match="used by instance 'api-img'") as ei:
            c.images.delete(reg["probe"])
        assert ei.value.status == 409 and ei.value.code == "busy"
        box.standby()
        snap = box.snapshot("api-img-snap")
        assert snap.snapshot.image_digest
    finally:
        box.delete()
    with pytest.raises(BusyError, match="used by snapshot 'api-img-snap'"):
        c.images.delete(reg["probe"])
    c.snapshots.delete("api-img-snap")
    c.images.delete(reg["probe"])
    with pytest.raises(NotFoundError):
        c.images.get(reg["probe"])
    assert not (api.data_dir / "images" / "oci" / im.digest[7:]).exists()


def test_cli_image_commands_through_the_server(api: Server, reg: dict[str, str]) -> None:
    """`vmfork --host SOCK image pull|ls|rm` and `run --image -e`: the server's store, not the
    CLI's data dir."""
    elsewhere = CLI(api.data_dir.parent / "apiimages-cli-elsewhere")
    host = ["--host", str(api.sock)]
    d = elsewhere.json(*host, "image", "pull", reg["probe"])
    assert isinstance(d, dict) and d["refs"] == [reg["probe"]] and d["digest"].startswith("sha256:")
    rows = elsewhere.json(*host, "image", "ls")
    assert isinstance(rows, list) and any(r.get("kind") == "oci" and reg["probe"] in r["refs"] for r in rows)
    assert not (elsewhere.data_dir / "images" / "oci").exists()  # nothing pulled here
    elsewhere(*host, "run", "api-img-cli", "--image", reg["probe"], "-e", "VIA=cli", "--", "serve", "x")
    try:
        r = elsewhere(*host, "image", "rm", reg["probe"], check=False)
        assert r.returncode != 0 and b"used by instance 'api-img-cli'" in r.stderr
        assert len(r.stderr.decode().strip().splitlines()) == 1
        out = sdk(api).instances.get("api-img-cli").exec(["/bin/busybox", "sh", "-c", "echo $VIA"])
        assert out.stdout == "cli\n"
    finally:
        elsewhere(*host, "rm", "-f", "api-img-cli", check=False)
    elsewhere(*host, "image", "rm", reg["probe"])
    assert elsewhere.json(*host, "image", "ls") == [r for r in rows if r.get("kind") != "oci"]
