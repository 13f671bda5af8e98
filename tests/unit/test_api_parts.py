"""The HTTP API's parts that need no guest: problem codes, the token, metrics, the socket,
the committed OpenAPI document, and the app answering in-process (no instance involved)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmfork import errors
from vmfork.api import problems
from vmfork.api.auth import TokenCheck, ensure_token
from vmfork.api.metrics import Metrics
from vmfork.api.server import _unlink_if_ours, bind_unix, parse_listen


@pytest.mark.parametrize(("exc", "status", "code"), [
    (errors.InvalidArgument("x"), 400, "invalid"),
    (errors.NotFound("x"), 404, "not_found"),
    (errors.AlreadyExists("x"), 409, "already_exists"),
    (errors.WrongState("x"), 409, "wrong_state"),
    (errors.Busy("x"), 409, "busy"),
    (errors.NoSpace("x"), 507, "no_space"),
    (errors.ExecAborted("x"), 409, "exec_aborted"),
    (errors.AgentTimeout("x"), 502, "agent_error"),
    (errors.HypervisorError("x"), 500, "hypervisor_error"),
    (errors.ExternalToolError("mkfs", "boom"), 500, "external_tool_error"),
    (errors.RegistryError("skopeo", "connection refused"), 502, "registry_error"),
    (errors.RegistryNotFound("skopeo", "manifest unknown"), 404, "not_found"),
    (errors.WrongPlatform("the image is for linux/arm64"), 404, "not_found"),
    (errors.VmforkError("x"), 500, "internal"),
])
def test_every_error_class_has_its_code(exc: Exception, status: int, code: str) -> None:
    assert problems.classify(exc) == (status, code)


def test_sdk_raises_the_class_of_each_code() -> None:
    import httpx

    from vmfork import client

    for code, cls in client.ERRORS.items():
        resp = httpx.Response(409, json={"code": code, "detail": "d", "status": 409})
        with pytest.raises(cls) as ei:
            client.raise_for_problem(resp)
        assert ei.value.code == code and ei.value.status == 409
    with pytest.raises(errors.NotFound):  # the CLI's own class too
        client.raise_for_problem(httpx.Response(404, json={"code": "not_found", "detail": "x"}))


def test_token_made_once_0600_and_rotated(tmp_path: Path) -> None:
    tok = ensure_token(tmp_path)
    assert ensure_token(tmp_path) == tok
    assert stat.S_IMODE((tmp_path / "api-token").stat().st_mode) == 0o600
    check = TokenCheck(tmp_path)
    assert check.ok(f"Bearer {tok}") and not check.ok(None) and not check.ok("Bearer nope")
    assert not check.ok(f"Basic {tok}")
    new = ensure_token(tmp_path, rotate=True)
    assert new != tok and check.ok(f"Bearer {new}") and not check.ok(f"Bearer {tok}")


def test_metrics_text(tmp_path: Path) -> None:
    m = Metrics()
    with m.timed("fork"):
        pass
    with pytest.raises(ValueError), m.timed("exec"):
        raise ValueError
    text = m.render({"running": 2, "standby": 1})
    assert 'vmfork_instances{state="running"} 2' in text
    assert 'vmfork_operation_seconds_count{operation="fork",outcome="ok"} 1' in text
    assert 'vmfork_operation_seconds_bucket{operation="exec",outcome="error",le="+Inf"} 1' in text


def test_unix_socket_is_0600_and_a_live_one_is_refused(tmp_path: Path) -> None:
    old = os.umask(0)  # even so
    try:
        s = bind_unix(tmp_path / "vmfork.sock")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE((tmp_path / "vmfork.sock").stat().st_mode) == 0o600
        with pytest.raises(errors.AlreadyExists):
            bind_unix(tmp_path / "vmfork.sock")
    finally:
        s.close()
    stale = bind_unix(tmp_path / "vmfork.sock")  # closed: a stale socket file is replaced
    stale.close()
    assert stat.S_ISSOCK((tmp_path / "vmfork.sock").stat().st_mode)


def test_a_stopping_server_leaves_a_newer_servers_socket(tmp_path: Path) -> None:
    path = tmp_path / "vmfork.sock"
    old = bind_unix(path)
    old_st = os.stat(path)
    old.close()  # the old server stopped listening and still waits for its requests
    new = bind_unix(path)  # a new server takes the path as stale
    try:
        _unlink_if_ours(path, old_st)  # the old one exits: the new socket stays
        assert stat.S_ISSOCK(path.stat().st_mode)
        _unlink_if_ours(path, os.stat(path))  # still listening: not removed
        assert path.exists()
    finally:
        new.close()
    _unlink_if_ours(path, os.stat(path))  # its own, closed: removed
    assert not path.exists()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen(":9") == ("127.0.0.1", 9)
    for bad in ("8080", "host:", "h:99999", "h:x"):
        with pytest.raises(errors.InvalidArgument):
            parse_listen(bad)


def test_committed_openapi_document_is_current() -> None:
    from vmfork.api import openapi

    assert openapi.DOC.read_text() == openapi.render(), "run: python -m vmfork.api.openapi"


def test_app_in_process(tmp_path: Path) -> None:
    """The app over an empty data dir through Starlette's test client (no guest needed):
    problems for unknown ids and bad bodies."""
    from fastapi.testclient import TestClient

    from vmfork.api.app import create_app

    auth = {"Authorization": f"Bearer {ensure_token(tmp_path)}"}  # the test client looks like TCP
    with TestClient(create_app(tmp_path), headers=auth) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/instances").json() == []
        r = c.get("/instances/nope")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "not_found"
        r = c.post("/instances", json={"name": "ok", "vcpus": 0})
        assert r.status_code == 400 and r.json()["code"] == "invalid" and "vcpus" in r.json()["detail"]
        r = c.post("/instances", json={"name": "ok", "auto_standby": 0.5})
        assert r.status_code == 400 and "auto_standby" in r.json()["detail"]
        r = c.post("/instances", json={"name": "ok", "publish": ["80"]})
        assert r.status_code == 400 and "invalid -p '80'" in r.json()["detail"]
        assert "vmfork_instances" in c.get("/metrics").text
        assert c.get("/openapi.json").json()["info"]["title"] == "vmfork"


@pytest.mark.parametrize(("message", "cls"), [
    ("reading manifest nope in 127.0.0.1:5000/x: manifest unknown: manifest unknown", errors.RegistryNotFound),
    ("reading manifest 1 in docker.io/library/nothing: name unknown: repository name not known", errors.RegistryNotFound),
    ('pinging container registry 127.0.0.1:1: Get "http://127.0.0.1:1/v2/": connect: connection refused',
     errors.RegistryError),
    ("reading manifest 1 in r/x: unauthorized: authentication required", errors.RegistryError),
    ("writing blob: write /x: no space left on device", errors.NoSpace),
])
def test_a_failed_pull_is_classified_with_skopeos_message(message: str, cls: type[Exception]) -> None:
    from vmfork.images.oci import registry_error

    e = registry_error(message)
    assert type(e) is cls and message in str(e)


def test_images_and_env_in_process(tmp_path: Path) -> None:
    """/images over an empty data dir, and POST /instances's image options refused where they
    cannot apply (no guest, no registry needed: all answered before any work)."""
    from fastapi.testclient import TestClient

    from vmfork.api.app import create_app

    auth = {"Authorization": f"Bearer {ensure_token(tmp_path)}"}
    with TestClient(create_app(tmp_path), headers=auth) as c:
        assert c.get("/images").json() == []
        for path in ("/images/nope", "/images/127.0.0.1%3A5000%2Fa%2Fb%3A1", "/images/sha256:" + "a" * 64):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["code"] == "not_found", path
            assert c.delete(path).status_code == 404
        for body in ({"name": "UPPER//case::"}, {"name": "a//b"}, {"name": ""}, {"name": "x", "fs": "zfs"},
                     {"name": "x", "extra": 1}):
            r = c.post("/images", json=body)
            assert r.status_code == 400 and r.json()["code"] == "invalid", body
        for body, words in [({"name": "b", "env": {"A": "1"}}, "env: only with an OCI image"),
                            ({"name": "b", "cmd": ["x"]}, "cmd: only with an OCI image"),
                            ({"name": "b", "image": "x:1", "env": {"1A": "1"}}, "invalid variable name '1A'"),
                            ({"name": "b", "image": "x:1", "env": {"A=B": "1"}}, "invalid variable name 'A=B'"),
                            ({"name": "b", "image": "x:1", "env": {"A": "\0"}}, "NUL"),
                            ({"name": "b", "image": None}, "image: Input should be a valid string"),
                            ({"name": "b", "image": "x" * 513}, "image: at most 512 characters")]:
            r = c.post("/instances", json=body)
            assert r.status_code == 400 and r.json()["code"] == "invalid" and words in r.json()["detail"], r.json()
        assert not (tmp_path / "guests").exists() or not list((tmp_path / "guests").iterdir())
        # unknown query parameters are refused, as unknown body fields are (no pull starts here)
        r = c.post("/images", params={"wiat": "true"}, json={"name": "x"})
        assert r.status_code == 400 and "unknown query parameter 'wiat'" in r.json()["detail"]
        assert c.get("/images").json() == []
        r = c.get("/instances", params={"sate": "running"})
        assert r.status_code == 400 and "(this operation takes: state)" in r.json()["detail"]


def test_tcp_needs_the_token(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from vmfork.api.app import create_app

    tok = ensure_token(tmp_path)
    app = create_app(tmp_path)
    # The test client reports a TCP server address (testserver:80): as over --listen.
    with TestClient(app) as c:
        assert c.get("/health", headers={"Authorization": f"Bearer {tok}"}).status_code == 200
        r = c.get("/health")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"



def test_auto_standby_settings_persist(tmp_path: Path) -> None:
    from vmfork.api.idle import AutoStandby

    a = AutoStandby(tmp_path)
    assert a.settings() == {}
    a.set("abc", 30)
    assert AutoStandby(tmp_path).settings() == {"abc": 30.0}  # a restarted server reads them
    assert stat.S_IMODE((tmp_path / "api").stat().st_mode) == 0o700
    a.set("abc", None)
    assert AutoStandby(tmp_path).settings() == {}


def test_exec_gauges() -> None:
    m = Metrics()
    with m.counted("exec_streams"), m.counted("exec_streams"), m.counted("exec_stdin_full"):
        text = m.render({})
        assert "vmfork_exec_streams 2\n" in text and "vmfork_exec_stdin_full 1\n" in text
    with pytest.raises(ValueError), m.counted("exec_streams"):
        raise ValueError
    assert "vmfork_exec_streams 0\n" in m.render({})


def test_exec_websocket_messages_as_the_sdk_reads_them() -> None:
    """Output, the exit, an error (raised with its code), and what is not part of the exec:
    the server's empty liveness message while the stdin window is full, a ping."""
    from vmfork import client

    assert client._decode_output(b"\x01out") == ("stdout", b"out")
    assert client._decode_output(bytearray(b"\x02err")) == ("stderr", b"err")
    assert client._decode_output('{"type": "exit", "exit_code": 3}') == {"type": "exit", "exit_code": 3}
    assert client._decode_output(b"") is None and client._decode_output(b"\x01") is None
    assert client._decode_output(None) is None
    with pytest.raises(client.BusyError, match="too many"):
        client._decode_output('{"type": "error", "code": "busy", "detail": "too many"}')
    assert b"".join(client._stdin_messages(b"x" * (client.STDIN_MESSAGE + 1))) == b"x" * (client.STDIN_MESSAGE + 1)
    assert [len(m) for m in client._stdin_messages("é" * client.STDIN_MESSAGE)] == [client.STDIN_MESSAGE] * 2
