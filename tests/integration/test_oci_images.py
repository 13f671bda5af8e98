"""OCI images end to end: a real registry (docker-registry on 127.0.0.1), images built with
umoci from exact layer tars, pulled with vmfork image pull, run with vmfork run --image."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.integration.oci import build as ob

pytestmark = pytest.mark.timeout(900)

PASSWD = b"root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:2345:\nextra:x:3456:app\n"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The registry, with the test images pushed; yields name -> pullable ref."""
    reason = ob.tools_missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("oci")
    with ob.registry(work / "registry") as host:
        probe = ob.probe_binary(work).read_bytes()
        busybox = Path("/bin/busybox").read_bytes()
        lay = work / "layout"
        base = (ob.Layer().dir("bin").file("bin/busybox", busybox, 0o755).file("probe", probe, 0o755)
                .dir("a").file("a/keep", b"keep\n").file("a/gone", b"gone\n")
                .dir("d").file("d/old1", b"1").file("d/old2", b"2").file("mode.sh", b"#!x\n", 0o644)
                .dir("etc").file("etc/passwd", PASSWD).file("etc/group", GROUP).dir("work"))
        top = (ob.Layer().dir("a").whiteout("a/gone").dir("d").opaque("d").file("d/new", b"new\n")
               .file("mode.sh", b"#!x\n", 0o755).symlink("link", "a/keep"))
        refs = {}
        refs["layers"] = ob.push(ob.image(lay, "layers", [base, top], config={
            "entrypoint": ["/probe"], "cmd": ["serve", "c1"], "env": ["FOO=bar", "PATH=/bin:/usr/bin"],
            "workingdir": "/work", "user": "app"}), host, "test/layers:v1")
        refs["static"] = ob.push(ob.image(lay, "static", [ob.Layer().file("probe", probe, 0o755)], config={
            "entrypoint": ["/probe"], "cmd": ["serve"]}), host, "test/static:1")
        refs["arm"] = ob.push(ob.image(lay, "arm", [ob.Layer().file("x", b"arm")], config={"cmd": ["/x"]},
                                       arch="arm64"), host, "test/arm:1")
        # one image per broken case, each layer its own content (no blob shared with another image)
        for case in ("mismatch", "truncated"):
            refs[case] = ob.push(ob.image(lay, case, [ob.Layer().file("f", os.urandom(300_000))],
                                          config={"cmd": ["/f"]}), host, f"test/{case}:1")
            manifest = ob.manifest_of(host, f"test/{case}:1")
            layer = manifest["layers"][0]["digest"]  # type: ignore[index]
            blob = work / "registry/data/docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
            data = blob.read_bytes()
            blob.write_bytes(data[:-1000] + os.urandom(1000) if case == "mismatch" else data[: len(data) // 2])
        refs["host"] = host
        yield refs


@pytest.fixture(scope="module")
def layers_vm(built: CLI, reg: dict[str, str]) -> Iterator[str]:
    """One guest of the layers image (main process: /probe serve c1), shared by the checks."""
    built("image", "pull", reg["layers"])
    built("run", "oci-layers", "--image", reg["layers"], "-e", "X=1")
    yield "oci-layers"
    built("rm", "-f", "oci-layers", check=False)


def console(cli: CLI, name: str) -> str:
    return cli("logs", name).stdout.decode(errors="replace")


def wait_console(cli: CLI, name: str, needle: str, timeout: float = 60) -> str:
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = console(cli, name)
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_layers_whiteouts_symlink_mode(built: CLI, layers_vm: str) -> None:
    out = built("exec", layers_vm, "--", "/bin/busybox", "find", "/", "-xdev").stdout.decode()
    tree = {p for p in out.split() if p != "/"}
    mounts = {"/proc", "/sys", "/dev", "/run", "/tmp"}  # the runtime's mount points
    assert tree - mounts == {"/a", "/a/keep", "/bin", "/bin/busybox", "/d", "/d/new", "/etc", "/etc/passwd",
                             "/etc/group", "/link", "/mode.sh", "/probe", "/work"}
    stat = built("exec", layers_vm, "--", "/bin/busybox", "stat", "-c", "%a %N", "/mode.sh", "/link").stdout.decode()
    assert "755 /mode.sh" in stat and "'/link' -> 'a/keep'" in stat
    assert built("exec", layers_vm, "--", "/bin/busybox", "cat", "/link").stdout == b"keep\n"


def test_main_gets_entrypoint_cmd_env_workdir_user(built: CLI, layers_vm: str) -> None:
    text = wait_console(built, layers_vm, "probe end")
    for line in ("probe argv[0]=/probe", "probe argv[1]=serve", "probe argv[2]=c1","probe cwd=/work", "probe uid=1234 gid=2345", "probe env FOO=bar", "probe env X=1",
                 "probe env PATH=/bin:/usr/bin", "probe env HOME=/home/app"):
        assert line in text, line
    d = built.json("inspect", layers_vm)
    assert isinstance(d, dict)
    main = d["main"]
    assert main["state"] == "running" and isinstance(main["pid"], int) and main["exit_code"] is None
    assert main["argv"] == ["/probe", "serve", "c1"]
    # exec beside it: inside the image root, as its user, in its WorkingDir, with its Env
    ids = built("exec", layers_vm, "--", "/bin/busybox", "sh", "-c", "id -u; id -G; pwd; echo $FOO").stdout.decode()
    assert ids.split() == ["1234", "2345", "3456", "/work", "bar"]
    # and in vmfork's own system, on request
    assert built("exec", layers_vm, "--system", "--", "cat", "/etc/hostname").stdout.strip() == b"oci-layers"


def test_overrides_and_exit_code(built: CLI, reg: dict[str, str]) -> None:
    name = "oci-override"
    try:
        built("run", name, "--image", reg["layers"], "--entrypoint", "/probe", "-w", "/a", "-e", "FOO=baz",
              "-e", "PROBE_EXIT=3", "--", "one", "two")
        text = wait_console(built, name, "probe end")
        assert "probe argv[1]=one" in text and "probe argv[2]=two" in text and "argv[3]" not in text
        assert "probe cwd=/a" in text and "probe env FOO=baz" in text and "FOO=bar" not in text
        import time

        deadline = time.monotonic() + 30
        while (main := built.json("inspect", name)["main"])["state"] != "exited":  # type: ignore[index]
            assert time.monotonic() < deadline, main
            time.sleep(0.2)
        assert main["exit_code"] == 3
    finally:
        built("rm", "-f", name, check=False)


def test_shell_less_static_image(built: CLI, reg: dict[str, str]) -> None:
    name = "oci-static"
    try:
        built("run", name, "--image", reg["static"])
        text = wait_console(built, name, "probe end")
        assert "probe argv[1]=serve" in text and "probe uid=0 gid=0" in text
        r = built("exec", name, "--", "/probe", "hello")
        assert b"probe argv[1]=hello" in r.stdout
        r = built("exec", name, "--", "sh", "-c", "true", check=False)  # no shell in this image
        assert r.returncode == 127
    finally:
        built("rm", "-f", name, check=False)


def test_image_ls_and_rm_refused_while_used(built: CLI, reg: dict[str, str], layers_vm: str) -> None:
    rows = built.json("image", "ls")
    assert isinstance(rows, list)
    row = next(r for r in rows if reg["layers"] in r.get("refs", []))
    assert row["kind"] == "oci" and row["digest"].startswith("sha256:") and row["size"] > 0
    assert "instance 'oci-layers'" in row["used_by"]
    r = built("image", "rm", reg["layers"], check=False)
    assert r.returncode != 0 and b"used by instance 'oci-layers'" in r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1


def _oci_dir(cli: CLI) -> Path:
    return cli.data_dir / "images" / "oci"


def _oci_entries(cli: CLI) -> list[str]:
    """What the OCI store holds: images, refs, temp dirs (not its lock file)."""
    d = _oci_dir(cli)
    return sorted(p.name for p in d.iterdir() if p.name != ".lock") if d.is_dir() else []


@pytest.mark.parametrize(("case", "pattern"), [
    ("unknown-tag", r"manifest unknown|not found"),
    ("unknown-repo", r"manifest unknown|name unknown"),
    ("registry-down", r"connection refused"),
    ("mismatch", r"digest"),
    ("truncated", r"digest|unexpected EOF|size"),
    ("arm", r"linux/arm64, not linux/amd64"),
    ("bad-ref", r"invalid image reference"),
])
def test_bad_input_one_line_nothing_left(built: CLI, reg: dict[str, str], case: str, pattern: str) -> None:
    host = reg["host"]
    ref = {
        "unknown-tag": f"{host}/test/layers:nope",
        "unknown-repo": f"{host}/test/nothing:1",
        "registry-down": f"127.0.0.1:{ob.free_port()}/test/layers:v1",
        "bad-ref": "UPPER//case::",
    }.get(case) or reg[case]
    before = _oci_entries(built)
    r = built("image", "pull", ref, check=False)
    err = r.stderr.decode(errors="replace").strip()
    assert r.returncode != 0, err
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err, re.I), err
    assert _oci_entries(built) == before  # no partial image, no temp dir, no new ref file
    if (_oci_dir(built) / "refs.json").exists():
        assert ref not in json.loads((_oci_dir(built) / "refs.json").read_text())


def test_run_unknown_image_is_one_line(built: CLI, reg: dict[str, str]) -> None:
    r = built("run", "oci-nope", "--image", f"{reg['host']}/test/none:1", check=False)
    err = r.stderr.decode(errors="replace").strip()
    assert r.returncode != 0 and len(err.splitlines()) == 1, err
    assert built("inspect", "oci-nope", check=False).returncode != 0  # no instance left


def test_import_oci_dir(built: CLI, reg: dict[str, str], tmp_path: Path) -> None:
    lay = tmp_path / "layout"
    shutil.rmtree(lay, ignore_errors=True)
    ob.image(lay, "imp", [ob.Layer().file("imported", b"yes")], config={"cmd": ["/imported"]})
    d = built.json("image", "import", f"oci:{lay}:imp", "--tag", "imported:1")
    assert isinstance(d, dict)
    assert d["refs"] == ["docker.io/library/imported:1"] and d["digest"].startswith("sha256:")
    built("image", "rm", "imported:1")
    assert not any(r.get("digest") == d["digest"] for r in built.json("image", "ls"))  # type: ignore[union-attr]
