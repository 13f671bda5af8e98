"""The Python SDK of vmfork's HTTP API (``vmfork serve``): ``Client`` and ``AsyncClient``.

    import vmfork
    with vmfork.Client() as client:                  # <data-dir>/vmfork.sock, or VMFORK_HOST
        box = client.instances.run("box", memory="256M")
        print(box.exec(["uname", "-r"]).stdout)
        box.standby()
        forks = box.fork("kid", count=8)             # standby forks, copy-on-write
        forks[0].restore()

``host`` is a unix socket path (``/path/vmfork.sock`` or ``unix:///path/vmfork.sock``) or a
TCP URL (``http://127.0.0.1:8080``, which needs ``token``, default env VMFORK_TOKEN). Errors
are raised as :class:`APIError` subclasses, one per stable code, which are also the CLI's
own error classes (``vmfork.errors``).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from vmfork import errors, models

T = TypeVar("T")
DEFAULT_TIMEOUT = 900.0
MAX_WS_MESSAGE = 1 << 20  # the largest WebSocket message taken from the server (output: <= 64 KiB + 1)
STDIN_MESSAGE = 64 << 10  # stdin per WebSocket message sent
CLOSE_WAIT = 2.0  # seconds an exec session waits to send its close message


class APIError(errors.VmforkError):
    """An answer of the server that is a problem (RFC 9457)."""

    code = "internal"

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.body = status, code, detail, body or {}


class InvalidError(APIError, errors.InvalidArgument):
    pass


class NotFoundError(APIError, errors.NotFound):
    pass


class AlreadyExistsError(APIError, errors.AlreadyExists):
    pass


class WrongStateError(APIError, errors.WrongState):
    pass


class BusyError(APIError, errors.Busy):
    pass


class NoSpaceError(APIError, errors.NoSpace):
    pass


class ExecAbortedError(APIError):
    pass


class AgentError(APIError):
    pass


class HypervisorError(APIError, errors.HypervisorError):
    pass


class RegistryError(APIError, errors.RegistryError):
    """The registry could not be reached or refused the pull (502 ``registry_error``)."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        Exception.__init__(self, detail)  # not ExternalToolError's (tool, message)
        self.status, self.code, self.detail, self.body = status, code, detail, body or {}
        self.tool, self.tool_message = "skopeo", detail


class UnauthorizedError(APIError):
    pass


class TooLargeError(APIError):
    pass


class UnreachableError(APIError):
    """No answer from the server (not running, wrong host, connection lost)."""


ERRORS: dict[str, type[APIError]] = {
    "invalid": InvalidError, "unsupported": InvalidError, "not_found": NotFoundError,
    "already_exists": AlreadyExistsError, "wrong_state": WrongStateError, "busy": BusyError,
    "no_space": NoSpaceError, "exec_aborted": ExecAbortedError, "agent_error": AgentError,
    "hypervisor_error": HypervisorError, "unauthorized": UnauthorizedError, "too_large": TooLargeError,
    "registry_error": RegistryError,
}
IMAGE_POLL_CAP = 1.0  # seconds between two looks at a pull in progress, at most


def raise_for_problem(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        code, detail = str(body.get("code", "internal")), str(body.get("detail", resp.text))
    except (ValueError, AttributeError):
        body, code, detail = {}, "internal", resp.text[:500]
    raise ERRORS.get(code, APIError)(resp.status_code, code, detail, body)


def _unreachable(where: str, e: Exception) -> UnreachableError:
    return UnreachableError(0, "unreachable", f"cannot reach the vmfork server at {where}: {e or type(e).__name__}")


def _default_host() -> str:
    env = os.environ.get("VMFORK_HOST")
    if env:
        return env
    from vmfork.paths import default_data_dir

    data = os.environ.get("VMFORK_DATA_DIR")
    return str((Path(data) if data else default_data_dir()) / "vmfork.sock")


def _endpoint(host: str | None, token: str | None) -> tuple[str, str | None, dict[str, str]]:
    """(base URL, unix socket path or None, headers)."""
    host = host or _default_host()
    token = token if token is not None else os.environ.get("VMFORK_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if host.startswith(("http://", "https://")):
        return host.rstrip("/"), None, headers
    path = host.removeprefix("unix://")
    return "http://vmfork", path, headers


def _exec_body(argv: list[str] | str, stdin: bytes | str, env: dict[str, str] | None, cwd: str | None,
               timeout: float | None) -> dict[str, Any]:
    args = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
    body: dict[str, Any] = {"argv": args, "env": env, "cwd": cwd, "timeout": timeout}
    if isinstance(stdin, bytes):
        body["stdin_b64"] = base64.b64encode(stdin).decode() if stdin else None
    else:
        body["stdin"] = stdin
    return body


def _interactive_body(argv: list[str] | str, *, tty: bool, rows: int, cols: int, stdin: bytes,
                      env: dict[str, str] | None, cwd: str | None, timeout: float | None) -> dict[str, Any]:
    """The first message of an interactive exec over ``/instances/{id}/exec/ws``."""
    return _exec_body(argv, stdin, env, cwd, timeout) | {"stream_stdin": True, "tty": tty, "rows": rows,
                                                        "cols": cols}


# The client's side of the exec WebSocket (see api/exec_routes.py), shared by ExecSession and
# AsyncExecSession: what to send, and what a received message means.
EOF_MESSAGE = json.dumps({"type": "eof"})


def _stdin_messages(data: bytes | str) -> Iterator[bytes]:
    raw = data.encode() if isinstance(data, str) else data
    for i in range(0, len(raw), STDIN_MESSAGE):
        yield raw[i:i + STDIN_MESSAGE]


def _resize_message(rows: int, cols: int) -> str:
    return json.dumps({"type": "resize", "rows": rows, "cols": cols})


def _closed_early() -> AgentError:
    return AgentError(0, "agent_error", "the exec stream closed before its exit")


def _decode_output(data: object) -> tuple[str, bytes] | dict[str, Any] | None:
    """A received message: output ``(stream, bytes)``, the final exit message (a dict), or
    None for what is not part of the exec (a ping, an empty output message). An ``error``
    message is raised as its APIError."""
    if isinstance(data, bytes | bytearray):
        if len(data) < 2:
            return None
        return ("stdout" if data[:1] == b"\x01" else "stderr"), bytes(data[1:])
    if isinstance(data, str):
        final: dict[str, Any] = json.loads(data)
        if final.get("type") == "error":
            code = str(final.get("code", "internal"))
            raise ERRORS.get(code, APIError)(0, code, str(final.get("detail")), final)
        return final
    return None


# --- sync -------------------------------------------------------------------------------------
class Client:
    def __init__(self, host: str | None = None, *, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        base, uds, headers = _endpoint(host, token)
        self.base_url, self.uds = base, uds
        transport = httpx.HTTPTransport(uds=uds) if uds else None
        self.http = httpx.Client(base_url=base, transport=transport, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=30.0))
        self.instances = Instances(self)
        self.snapshots = Snapshots(self)
        self.images = Images(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self.uds or self.base_url, e) from None
        raise_for_problem(resp)
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    def health(self) -> models.Health:
        return models.Health.model_validate(self.json("GET", "/health"))

    def capabilities(self) -> models.Capabilities:
        return models.Capabilities.model_validate(self.json("GET", "/capabilities"))

    def resources(self) -> models.Resources:
        return models.Resources.model_validate(self.json("GET", "/resources"))

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text



class Instance:
    """One instance as the server last described it (``info``), with its operations."""

    def __init__(self, client: Client, info: models.Instance) -> None:
        self.client, self.info = client, info

    def __repr__(self) -> str:
        return f"Instance({self.info.name!r}, {self.info.state!r})"

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> str:
        return self.info.state

    def _path(self, suffix: str = "") -> str:
        return f"/instances/{self.info.id}{suffix}"

    def _action(self, what: str, body: dict[str, Any] | None = None, **params: Any) -> models.ActionResult:
        r = models.ActionResult.model_validate(self.client.json("POST", self._path(f"/{what}"), json=body,
                                                                params=params or None))
        self.info = r.instance
        return r

    def refresh(self) -> Instance:
        self.info = models.InstanceDetail.model_validate(self.client.json("GET", self._path()))
        return self

    def standby(self) -> models.ActionResult:
        return self._action("standby")

    def restore(self, *, overcommit: bool = False) -> models.ActionResult:
        return self._action("restore", overcommit=overcommit) if overcommit else self._action("restore")

    def stop(self, *, force: bool = False) -> models.ActionResult:
        return self._action("stop", {"force": force})

    def start(self, *, overcommit: bool = False) -> models.ActionResult:
        return self._action("start", {"overcommit": overcommit})

    def delete(self, *, force: bool = True) -> None:
        self.client.request("DELETE", self._path(), params={"force": force})

    def fork(self, name: str, *, count: int | None = None, from_running: bool = False,
             target_state: str | None = None, partial: bool = False) -> list[Instance]:
        body = {"name": name, "count": count, "from_running": from_running, "target_state": target_state,
                "partial": partial}
        r = models.ForkResult.model_validate(self.client.json("POST", self._path("/fork"), json=body))
        return [Instance(self.client, i) for i in r.instances]

    def exec(self, argv: list[str] | str, *, stdin: bytes | str = "", env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None) -> models.ExecResult:
        """Run ``argv`` (a string runs under ``sh -c``); output bounded (see stdout_dropped)."""
        return models.ExecResult.model_validate(
            self.client.json("POST", self._path("/exec"), json=_exec_body(argv, stdin, env, cwd, timeout)))

    def exec_stream(self, argv: list[str] | str, *, stdin: bytes = b"", env: dict[str, str] | None = None,
                    cwd: str | None = None, timeout: float | None = None,
                    on_stdout: Callable[[bytes], None] | None = None,
                    on_stderr: Callable[[bytes], None] | None = None) -> dict[str, Any]:
        """Run ``argv`` over the WebSocket: ``stdin`` is streamed (as the command reads it,
        while its output is passed to the callbacks as it comes); returns the final
        ``{"type": "exit", "exit_code": ...}`` message."""
        with self.exec_interactive(argv, env=env, cwd=cwd, timeout=timeout) as session:
            def feed() -> None:
                with contextlib.suppress(Exception):  # the command exited, or the stream is over
                    session.send(stdin)
                    session.close_stdin()

            sender = threading.Thread(target=feed, daemon=True, name="vmfork-exec-stdin")
            sender.start()
            final = session.wait(on_stdout=on_stdout, on_stderr=on_stderr)
            sender.join(5.0)
            return final

    def exec_interactive(self, argv: list[str] | str, *, tty: bool = False, rows: int = 0, cols: int = 0,
                         stdin: bytes = b"", env: dict[str, str] | None = None, cwd: str | None = None,
                         timeout: float | None = None) -> ExecSession:
        """Start ``argv`` with its stdin open (``tty``: on a PTY of ``rows`` x ``cols``):
        ``send`` / ``close_stdin`` / ``resize`` while ``recv`` (or iterating) reads its output;
        ``wait`` returns the exit. Closing the session before it exits kills the command."""
        body = _interactive_body(argv, tty=tty, rows=rows, cols=cols, stdin=stdin, env=env, cwd=cwd,
                                 timeout=timeout)
        return ExecSession(self.client, self._path("/exec/ws"), body)

    def read_file(self, path: str) -> bytes:
        return self.client.request("GET", self._path("/files"), params={"path": path}).content

    def write_file(self, path: str, data: bytes, *, tar: bool = False) -> None:
        ctype = "application/x-tar" if tar else "application/octet-stream"
        self.client.request("PUT", self._path("/files"), params={"path": path}, content=data,
                            headers={"content-type": ctype})

    def wait(self, state: str, timeout: float = 30.0) -> models.WaitResult:
        r = models.WaitResult.model_validate(
            self.client.json("GET", self._path("/wait"), params={"state": state, "timeout": timeout}))
        self.info = r.instance
        return r

    def stats(self) -> models.Stats:
        return models.Stats.model_validate(self.client.json("GET", self._path("/stats")))

    def logs(self, tail: int = 100) -> list[str]:
        text = self.client.request("GET", self._path("/logs"), params={"tail": tail}).text
        return [line[6:] for line in text.split("\n") if line.startswith("data: ")]

    def snapshot(self, name: str) -> models.SnapshotResult:
        return models.SnapshotResult.model_validate(
            self.client.json("POST", self._path("/snapshots"), json={"name": name}))


class ExecSession:
    """An exec over the WebSocket ``/instances/{id}/exec/ws`` with its stdin open (see
    :meth:`Instance.exec_interactive`). ``send`` and ``recv`` may be used from two threads."""

    def __init__(self, client: Client, path: str, body: dict[str, Any]) -> None:
        from httpx_ws import connect_ws

        self._cm: Any = connect_ws(path, client.http, max_message_size_bytes=MAX_WS_MESSAGE)
        try:
            self._ws: Any = self._cm.__enter__()
        except httpx.TransportError as e:
            raise _unreachable(client.uds or client.base_url, e) from None
        self.result: dict[str, Any] | None = None  # the final exit message, once received
        self._ws.send_text(json.dumps(body))

    def __enter__(self) -> ExecSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        """More stdin for the command (sent as it reads it: this blocks while it does not)."""
        for message in _stdin_messages(data):
            self._ws.send_bytes(message)

    def close_stdin(self) -> None:
        """End of stdin (on a tty: the VEOF character, ^D)."""
        self._ws.send_text(EOF_MESSAGE)

    def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size (a tty exec; the command gets SIGWINCH)."""
        self._ws.send_text(_resize_message(rows, cols))

    def recv(self, timeout: float | None = None) -> tuple[str, bytes] | None:
        """The next output, ``("stdout" | "stderr", bytes)``, or None once the command has
        exited (``result`` then holds the exit). Raises TimeoutError after ``timeout`` s."""
        import queue

        from httpx_ws import WebSocketDisconnect

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.result is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = self._ws.receive(left)
            except queue.Empty:
                raise TimeoutError("no output from the command yet") from None
            except WebSocketDisconnect:
                raise _closed_early() from None
            event = _decode_output(getattr(msg, "data", None))
            if isinstance(event, dict):
                self.result = event
            elif event is not None:
                return event
        return None

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while (event := self.recv()) is not None:
            yield event

    def wait(self, on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None) -> dict[str, Any]:
        """Read the rest of the output (to the callbacks, or dropped) and return the exit."""
        for stream, data in self:
            cb = on_stdout if stream == "stdout" else on_stderr
            if cb is not None:
                cb(data)
        assert self.result is not None
        return self.result

    def close(self) -> None:
        """Disconnect: a command still running is killed in the guest. The close message is
        not waited for more than CLOSE_WAIT s (a ``send`` blocked while the command reads no
        stdin holds the socket): the connection is then dropped at once."""
        def close_message() -> None:
            with contextlib.suppress(Exception):
                self._ws.close()

        closer = threading.Thread(target=close_message, daemon=True, name="vmfork-exec-close")
        closer.start()
        closer.join(CLOSE_WAIT)
        if closer.is_alive():  # shutdown, not close: that would not wake the blocked send
            with contextlib.suppress(Exception):
                self._ws.stream.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._cm.__exit__(None, None, None)


class Instances:
    def __init__(self, client: Client) -> None:
        self.client = client

    def run(self, name: str, *, memory: str = "256M", vcpus: int = 1, hypervisor: str = "qemu",
            **options: Any) -> Instance:
        """Create instance ``name`` and boot it (returns once its agent answers)."""
        body = {"name": name, "memory": memory, "vcpus": vcpus, "hypervisor": hypervisor, **options}
        return Instance(self.client, models.Instance.model_validate(
            self.client.json("POST", "/instances", json=body)))

    create = run

    def list(self, state: str | None = None) -> list[Instance]:
        rows = self.client.json("GET", "/instances", params={"state": state} if state else None)
        return [Instance(self.client, models.Instance.model_validate(d)) for d in rows]

    def get(self, ref: str) -> Instance:
        return Instance(self.client, models.InstanceDetail.model_validate(
            self.client.json("GET", f"/instances/{ref}")))


class Snapshots:
    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> list[models.Snapshot]:
        return [models.Snapshot.model_validate(d) for d in self.client.json("GET", "/snapshots")]

    def get(self, ref: str) -> models.Snapshot:
        return models.Snapshot.model_validate(self.client.json("GET", f"/snapshots/{ref}"))

    def create(self, instance: str, name: str) -> models.SnapshotResult:
        return models.SnapshotResult.model_validate(
            self.client.json("POST", f"/instances/{instance}/snapshots", json={"name": name}))

    def delete(self, ref: str) -> None:
        self.client.request("DELETE", f"/snapshots/{ref}")

    def fork(self, ref: str, name: str, *, count: int | None = None, target_state: str = "standby") -> builtins.list[Instance]:
        r = models.ForkResult.model_validate(self.client.json(
            "POST", f"/snapshots/{ref}/fork", json={"name": name, "count": count, "target_state": target_state}))
        return [Instance(self.client, i) for i in r.instances]


def _image_path(name: str) -> str:
    return "/images/" + quote(name, safe="")


def _pulled(d: dict[str, Any]) -> models.Image:
    """The image a finished pull gave; a failed pull raises its problem (as ``wait=true`` would)."""
    im = models.Image.model_validate(d)
    if im.status == "failed":
        code = im.error_code or "internal"
        raise ERRORS.get(code, APIError)(im.error_status or 500, code, im.error or "the pull failed", d)
    return im


def _pull_events(lines: Iterator[str], on_progress: Callable[[str], None]) -> models.Image:
    """Read ``POST /images?stream=true``: progress lines, then the image or the problem."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            if event == "image":
                return models.Image.model_validate(json.loads(data))
            if event == "problem":
                d = json.loads(data)
                code = str(d.get("code") or "internal")
                raise ERRORS.get(code, APIError)(int(d.get("status") or 500), code, str(d.get("detail")), d)
            on_progress(data)
        elif not line:
            event = None
    raise APIError(0, "internal", "the pull's event stream ended without its result")


class Images:
    """OCI images: ``pull`` (waits for the result unless ``wait=False``), ``list``, ``get``, ``delete``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def pull(self, name: str, *, insecure: bool = False, fs: str = "ext4", wait: bool = True,
             on_progress: Callable[[str], None] | None = None) -> models.Image:
        """Pull ``name`` for linux/amd64. ``wait=True``: returns the ready image or raises the
        problem (NotFoundError, RegistryError, ...), passing each progress line to
        ``on_progress`` if given (server-sent events); ``wait=False``: returns the pull as
        started (status pending/pulling), to follow with ``get`` or ``wait``."""
        body = {"name": name, "insecure": insecure, "fs": fs}
        if wait and on_progress is not None:
            try:
                with self.client.http.stream("POST", "/images", json=body, params={"stream": "true"}) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise_for_problem(resp)
                    return _pull_events(resp.iter_lines(), on_progress)
            except httpx.TransportError as e:
                raise _unreachable(self.client.uds or self.client.base_url, e) from None
        return models.Image.model_validate(
            self.client.json("POST", "/images", json=body, params={"wait": "true"} if wait else None))

    def list(self) -> builtins.list[models.Image]:
        return [models.Image.model_validate(d) for d in self.client.json("GET", "/images")]

    def get(self, name: str) -> models.Image:
        return models.Image.model_validate(self.client.json("GET", _image_path(name)))

    def wait(self, name: str, timeout: float = 3600.0) -> models.Image:
        """Follow a pull started with ``wait=False`` until it is done (raises its problem)."""
        import time

        deadline, delay = time.monotonic() + timeout, 0.05
        while (d := self.client.json("GET", _image_path(name)))["status"] not in ("ready", "failed"):
            if time.monotonic() > deadline:
                raise APIError(0, "timeout", f"the pull of '{name}' is still {d['status']} after {timeout:g}s", d)
            time.sleep(delay)
            delay = min(delay * 2, IMAGE_POLL_CAP)
        return _pulled(d)

    def delete(self, name: str) -> None:
        """Remove the image (all its refs); BusyError while an instance or snapshot uses it."""
        self.client.request("DELETE", _image_path(name))


# --- async ------------------------------------------------------------------------------------
class AsyncClient:
    """The same API for asyncio: ``await client.instances.run(...)``, ``await inst.exec(...)``."""

    def __init__(self, host: str | None = None, *, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        base, uds, headers = _endpoint(host, token)
        transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
        self.http = httpx.AsyncClient(base_url=base, transport=transport, headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=30.0))
        self.instances = AsyncInstances(self)
        self.snapshots = AsyncSnapshots(self)
        self.images = AsyncImages(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = await self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _unreachable(str(self.http.base_url), e) from None
        raise_for_problem(resp)
        return resp

    async def json(self, method: str, path: str, **kw: Any) -> Any:
        return (await self.request(method, path, **kw)).json()

    async def health(self) -> models.Health:
        return models.Health.model_validate(await self.json("GET", "/health"))


class AsyncInstance:
    def __init__(self, client: AsyncClient, info: models.Instance) -> None:
        self.client, self.info = client, info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def state(self) -> str:
        return self.info.state

    def _path(self, suffix: str = "") -> str:
        return f"/instances/{self.info.id}{suffix}"

    async def _action(self, what: str, body: dict[str, Any] | None = None) -> models.ActionResult:
        r = models.ActionResult.model_validate(await self.client.json("POST", self._path(f"/{what}"), json=body))
        self.info = r.instance
        return r

    async def refresh(self) -> AsyncInstance:
        self.info = models.InstanceDetail.model_validate(await self.client.json("GET", self._path()))
        return self

    async def standby(self) -> models.ActionResult:
        return await self._action("standby")

    async def restore(self) -> models.ActionResult:
        return await self._action("restore")

    async def stop(self, *, force: bool = False) -> models.ActionResult:
        return await self._action("stop", {"force": force})

    async def start(self) -> models.ActionResult:
        return await self._action("start", {})

    async def delete(self, *, force: bool = True) -> None:
        await self.client.request("DELETE", self._path(), params={"force": force})

    async def fork(self, name: str, *, count: int | None = None, from_running: bool = False,
                   target_state: str | None = None) -> list[AsyncInstance]:
        body = {"name": name, "count": count, "from_running": from_running, "target_state": target_state}
        r = models.ForkResult.model_validate(await self.client.json("POST", self._path("/fork"), json=body))
        return [AsyncInstance(self.client, i) for i in r.instances]

    async def exec(self, argv: list[str] | str, *, stdin: bytes | str = "", env: dict[str, str] | None = None,
                   cwd: str | None = None, timeout: float | None = None) -> models.ExecResult:
        return models.ExecResult.model_validate(await self.client.json(
            "POST", self._path("/exec"), json=_exec_body(argv, stdin, env, cwd, timeout)))

    def exec_interactive(self, argv: list[str] | str, *, tty: bool = False, rows: int = 0, cols: int = 0,
                         stdin: bytes = b"", env: dict[str, str] | None = None, cwd: str | None = None,
                         timeout: float | None = None) -> AsyncExecSession:
        """Start ``argv`` with its stdin open (``tty``: on a PTY of ``rows`` x ``cols``), as an
        async context manager: ``await s.write(b)`` / ``close_stdin`` / ``resize`` while
        ``async for stream, data in s`` reads its output; ``await s.wait()`` returns the exit
        code. Leaving the block before it exits (or being cancelled) kills the command."""
        body = _interactive_body(argv, tty=tty, rows=rows, cols=cols, stdin=stdin, env=env, cwd=cwd,
                                 timeout=timeout)
        return AsyncExecSession(self.client, self._path("/exec/ws"), body)

    async def read_file(self, path: str) -> bytes:
        return (await self.client.request("GET", self._path("/files"), params={"path": path})).content

    async def write_file(self, path: str, data: bytes) -> None:
        await self.client.request("PUT", self._path("/files"), params={"path": path}, content=data,
                                  headers={"content-type": "application/octet-stream"})


class AsyncExecSession:
    """The asyncio form of :class:`ExecSession` (see :meth:`AsyncInstance.exec_interactive`):
    one task may ``write`` while another reads the output. Use it as ``async with``, in one
    task (the connection's background tasks live in it)."""

    def __init__(self, client: AsyncClient, path: str, body: dict[str, Any]) -> None:
        self._client, self._path, self._body = client, path, body
        self._cm: Any = None
        self._ws: Any = None
        self.result: dict[str, Any] | None = None  # the final exit message, once received

    async def __aenter__(self) -> AsyncExecSession:
        from httpx_ws import aconnect_ws

        cm: Any = aconnect_ws(self._path, self._client.http, max_message_size_bytes=MAX_WS_MESSAGE)
        try:
            self._ws = await cm.__aenter__()
        except httpx.TransportError as e:
            raise _unreachable(str(self._client.http.base_url), e) from None
        self._cm = cm
        try:
            await self._ws.send_text(json.dumps(self._body))
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def write(self, data: bytes | str) -> None:
        """More stdin for the command (sent as it reads it: this waits while it does not)."""
        for message in _stdin_messages(data):
            await self._ws.send_bytes(message)

    async def close_stdin(self) -> None:
        """End of stdin (on a tty: the VEOF character, ^D)."""
        await self._ws.send_text(EOF_MESSAGE)

    async def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size (a tty exec; the command gets SIGWINCH)."""
        await self._ws.send_text(_resize_message(rows, cols))

    async def recv(self, timeout: float | None = None) -> tuple[str, bytes] | None:
        """The next output, ``("stdout" | "stderr", bytes)``, or None once the command has
        exited (``result`` then holds the exit). Raises TimeoutError after ``timeout`` s."""
        import anyio
        from httpx_ws import WebSocketDisconnect

        with anyio.fail_after(timeout):
            while self.result is None:
                try:
                    msg = await self._ws.receive()
                except WebSocketDisconnect:
                    raise _closed_early() from None
                event = _decode_output(getattr(msg, "data", None))
                if isinstance(event, dict):
                    self.result = event
                elif event is not None:
                    return event
        return None

    def __aiter__(self) -> AsyncExecSession:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        event = await self.recv()
        if event is None:
            raise StopAsyncIteration
        return event

    async def wait(self) -> int:
        """Read the rest of the output (dropped: iterate to get it) and return the exit code
        (the whole exit message is ``result``)."""
        async for _ in self:
            pass
        assert self.result is not None
        return int(self.result["exit_code"])

    async def aclose(self) -> None:
        """Disconnect: a command still running is killed in the guest. The close message is
        not waited for while the server reads no stdin (the command does not read it)."""
        import anyio

        cm, self._cm = self._cm, None
        if cm is None:
            return
        with contextlib.suppress(Exception):
            with anyio.move_on_after(CLOSE_WAIT, shield=True) as scope:
                await self._ws.close()
            if scope.cancelled_caught:  # the close message did not get through: drop the connection
                await self._ws.stream.aclose()
        with contextlib.suppress(Exception):  # not in a scope of ours: it exits the one it entered
            await cm.__aexit__(None, None, None)


class AsyncInstances:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def run(self, name: str, *, memory: str = "256M", vcpus: int = 1, **options: Any) -> AsyncInstance:
        body = {"name": name, "memory": memory, "vcpus": vcpus, **options}
        return AsyncInstance(self.client, models.Instance.model_validate(
            await self.client.json("POST", "/instances", json=body)))

    async def list(self, state: str | None = None) -> list[AsyncInstance]:
        rows = await self.client.json("GET", "/instances", params={"state": state} if state else None)
        return [AsyncInstance(self.client, models.Instance.model_validate(d)) for d in rows]

    async def get(self, ref: str) -> AsyncInstance:
        return AsyncInstance(self.client, models.InstanceDetail.model_validate(
            await self.client.json("GET", f"/instances/{ref}")))


class AsyncSnapshots:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def list(self) -> list[models.Snapshot]:
        return [models.Snapshot.model_validate(d) for d in await self.client.json("GET", "/snapshots")]

    async def create(self, instance: str, name: str) -> models.SnapshotResult:
        return models.SnapshotResult.model_validate(
            await self.client.json("POST", f"/instances/{instance}/snapshots", json={"name": name}))

    async def fork(self, ref: str, name: str, *, count: int | None = None,
                   target_state: str = "standby") -> builtins.list[AsyncInstance]:
        r = models.ForkResult.model_validate(await self.client.json(
            "POST", f"/snapshots/{ref}/fork", json={"name": name, "count": count, "target_state": target_state}))
        return [AsyncInstance(self.client, i) for i in r.instances]


class AsyncImages:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def pull(self, name: str, *, insecure: bool = False, fs: str = "ext4", wait: bool = True) -> models.Image:
        body = {"name": name, "insecure": insecure, "fs": fs}
        return models.Image.model_validate(
            await self.client.json("POST", "/images", json=body, params={"wait": "true"} if wait else None))

    async def list(self) -> builtins.list[models.Image]:
        return [models.Image.model_validate(d) for d in await self.client.json("GET", "/images")]

    async def get(self, name: str) -> models.Image:
        return models.Image.model_validate(await self.client.json("GET", _image_path(name)))

    async def wait(self, name: str, timeout: float = 3600.0) -> models.Image:
        import asyncio
        import time

        deadline, delay = time.monotonic() + timeout, 0.05
        while (d := await self.client.json("GET", _image_path(name)))["status"] not in ("ready", "failed"):
            if time.monotonic() > deadline:
                raise APIError(0, "timeout", f"the pull of '{name}' is still {d['status']} after {timeout:g}s", d)
            await asyncio.sleep(delay)
            delay = min(delay * 2, IMAGE_POLL_CAP)
        return _pulled(d)

    async def delete(self, name: str) -> None:
        await self.client.request("DELETE", _image_path(name))


def iter_sse(resp: httpx.Response) -> Iterator[str]:
    """The ``data:`` lines of a server-sent event stream (``/logs?follow=true``)."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            yield line[6:]
