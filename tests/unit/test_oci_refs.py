"""OCI image references, the main process's spec (Docker's override rules), the guest's
state lines (untrusted: bounded) and skopeo's error text."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfork.errors import ImageError, InvalidArgument
from vmfork.images import main as image_main
from vmfork.images import oci


@pytest.mark.parametrize(("text", "want", "local"), [
    ("alpine", "docker.io/library/alpine:latest", False),
    ("alpine:3.19", "docker.io/library/alpine:3.19", False),
    ("ghcr.io/o/r:1", "ghcr.io/o/r:1", False),
    ("127.0.0.1:5000/x/y:t", "127.0.0.1:5000/x/y:t", True),
    ("localhost:5000/y", "localhost:5000/y:latest", True),
    ("localhost/y", "localhost/y:latest", True),
    ("docker://me/app", "docker.io/me/app:latest", False),
    ("r.example/a@sha256:" + "a" * 64, "r.example/a@sha256:" + "a" * 64, False),
])
def test_parse_ref(text: str, want: str, local: bool) -> None:
    ref = oci.parse_ref(text)
    assert str(ref) == want and ref.local is local


@pytest.mark.parametrize("text", ["", "UPPER/Case", "a//b", "x:", "a@sha256:12", "-x", "a b"])
def test_parse_ref_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        oci.parse_ref(text)


def test_import_source_needs_a_transport_and_a_path(tmp_path: object) -> None:
    with pytest.raises(InvalidArgument, match="oci-archive:FILE"):
        oci.import_source("/some/file.tar")
    with pytest.raises(InvalidArgument, match="does not exist"):
        oci.import_source("oci-archive:/nonexistent/x.tar")


SPEC = {"entrypoint": ["/ep"], "cmd": ["a", "b"], "env": ["PATH=/bin", "FOO=1"], "workdir": "/w",
        "uid": 5, "gid": 6, "gids": [7]}


def test_resolve_image_defaults() -> None:
    m = image_main.resolve(SPEC)
    assert m == {"argv": ["/ep", "a", "b"], "env": ["PATH=/bin", "FOO=1"], "workdir": "/w",
                 "uid": 5, "gid": 6, "gids": [7]}


def test_resolve_overrides_like_docker() -> None:
    assert image_main.resolve(SPEC, args=["x"])["argv"] == ["/ep", "x"]  # ARGS replace Cmd
    assert image_main.resolve(SPEC, entrypoint="/o")["argv"] == ["/o"]  # and --entrypoint drops Cmd
    assert image_main.resolve(SPEC, entrypoint="/o", args=["y"])["argv"] == ["/o", "y"]
    m = image_main.resolve(SPEC, env=["FOO=2", "NEW=x=y"], workdir="/other")
    assert m["env"] == ["PATH=/bin", "FOO=2", "NEW=x=y"] and m["workdir"] == "/other"


@pytest.mark.parametrize(("kw", "msg"), [
    ({"env": ["NOEQUALS"]}, "KEY=VALUE"), ({"env": ["1X=2"]}, "KEY=VALUE"),
    ({"workdir": "rel"}, "absolute"),
])
def test_resolve_rejects(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(InvalidArgument, match=msg):
        image_main.resolve(SPEC, **kw)  # type: ignore[arg-type]


def test_resolve_needs_a_command() -> None:
    with pytest.raises(InvalidArgument, match="no Entrypoint or Cmd"):
        image_main.resolve({"env": []})


def test_exec_argv_runs_in_the_image_root() -> None:
    m = image_main.resolve(SPEC)
    argv = image_main.exec_argv(m, ["ls", "-l"], {"K": "v"}, None)
    assert argv[:3] == ["/sbin/vmfork-run", "-r", "/image/root"]
    assert argv[argv.index("-w") + 1] == "/w" and argv[argv.index("-u") + 1] == "5"
    assert argv[argv.index("-G") + 1] == "7" and "-E" in argv
    assert argv[-3:] == ["--", "ls", "-l"] and argv[argv.index("K=v") - 1] == "-e"
    assert image_main.exec_argv(m, ["x"], None, "/tmp")[4] == "/tmp"


def test_parse_state_is_bounded() -> None:
    assert image_main.parse_state("state=running\npid=12\nexit=\n") == {"state": "running", "pid": 12,
                                                                         "exit_code": None}
    assert image_main.parse_state("state=exited\npid=12\nexit=3\n")["exit_code"] == 3
    assert image_main.parse_state("") == {"state": "not started", "pid": None, "exit_code": None}
    odd = image_main.parse_state("state=\x1b[31mevil\npid=" + "9" * 500 + "\nexit=99999\n")
    assert odd == {"state": "unknown", "pid": None, "exit_code": None}


def test_skopeo_message_is_its_own_words_on_one_line() -> None:
    err = ('time="2026-12-01T00:00:00Z" level=fatal msg="initializing source docker://h/x:1: '
           'reading manifest 1 in h/x: manifest unknown: manifest unknown"\n')
    assert oci._skopeo_message(err) == ("initializing source docker://h/x:1: reading manifest 1 in h/x: "
                                        "manifest unknown: manifest unknown")
    assert oci._skopeo_message("line one\nline two\n") == "line one | line two"


def _rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/home/app:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\napp:x:2345:\nextra:x:3456:other,app\nstaff:x:50:\n")
    return tmp_path


@pytest.mark.parametrize(("user", "want"), [
    ("", {"uid": 0, "gid": 0, "gids": [], "home": "/"}),
    ("app", {"uid": 1234, "gid": 2345, "gids": [3456], "home": "/home/app"}),
    ("1234", {"uid": 1234, "gid": 2345, "gids": [3456], "home": "/home/app"}),
    ("app:staff", {"uid": 1234, "gid": 50, "gids": [2345, 3456], "home": "/home/app"}),
    ("777:888", {"uid": 777, "gid": 888, "gids": [], "home": "/"}),
])
def test_resolve_user_from_the_images_files(tmp_path: Path, user: str, want: dict[str, object]) -> None:
    got = oci.resolve_user(_rootfs(tmp_path), user)
    if user == "app:staff":  # the primary group from passwd is a supplementary one then
        want = want | {"gids": [3456]}
    assert got == want


def test_resolve_user_unknown_names_fail(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    with pytest.raises(ImageError, match="no user 'nobody'"):
        oci.resolve_user(root, "nobody")
    with pytest.raises(ImageError, match="no group 'wheel'"):
        oci.resolve_user(root, "app:wheel")


def test_resolve_user_never_reads_a_file_outside_the_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "host-passwd"
    outside.write_text("app:x:4242:4242::/:/bin/sh\n")
    (root / "etc/passwd").symlink_to(outside)  # an image's absolute symlink must not reach the host
    with pytest.raises(ImageError, match="no user 'app'"):
        oci.resolve_user(root, "app")
