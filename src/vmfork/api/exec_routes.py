"""Exec (request/response and WebSocket streaming) and files, through the guest agent.

WebSocket protocol of ``/instances/{id}/exec/ws``:
- the client sends one text message, a JSON ``ExecStart``: ``argv``, ``env``, ``cwd``,
  ``timeout``, initial ``stdin``/``stdin_b64``, and
  - ``stream_stdin``: the command's stdin stays open; each binary message is more stdin,
    written as the command reads it (flow control end to end: the server stops reading the
    socket while about ``MAX_PENDING_STDIN`` bytes wait for the command), and the text
    ``{"type": "eof"}`` closes it;
  - ``tty`` (implies ``stream_stdin``): the command runs on a PTY of ``rows`` x ``cols``
    (default 24x80, ``TERM=xterm``), its session's controlling terminal; its output
    (stdout and stderr) comes as stdout; ``{"type": "resize", "rows": R, "cols": C}``
    resizes it (the command gets SIGWINCH); ``eof`` sends the terminal's VEOF (^D);
- the server sends the output as binary messages, the first byte naming the stream
  (1 stdout, 2 stderr), then a text ``{"type": "exit", "exit_code": N, "timed_out": B,
  "signal": S|null}`` or ``{"type": "error", "code": ..., "detail": ...}``, and closes;
- a client that goes away (or sends a malformed message: an ``error`` answers it) ends
  the guest command: it is killed, with or without a tty. While the command does not read
  its stdin and the client's unread stdin fills the window, the server does not read the
  socket (so it cannot see the client go there): it sends an empty binary message every
  ``PROBE_S`` seconds instead, which fails once the client is gone (clients ignore it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from pydantic import Field, ValidationError

from vmfork import models, util
from vmfork.api.app import State, blocking, state
from vmfork.api.problems import ApiError, classify, responses
from vmfork.errors import VmforkError
from vmfork.guest.agent import ExecStdin

router = APIRouter(tags=["exec"])
Dep = Annotated[State, Depends(state)]
STDOUT, STDERR = 1, 2


# stdin received from a WebSocket client and not yet taken by the command (beyond it, one
# message more at most: the server stops reading the socket)
MAX_PENDING_STDIN = 1 << 20
# output per WebSocket message (the guest agent sends 64 KiB chunks; a frame may hold 16 MiB)
OUTPUT_MESSAGE = 64 << 10
# seconds between two empty messages to the client while its stdin waits for the command
# (the window is full): a client that went away is seen at the second or third
PROBE_S = 2.0


class ExecStart(models.ExecRequest):
    tty: bool = Field(default=False, description="Run on a PTY (implies stream_stdin).")
    rows: int = Field(default=0, ge=0, le=65535, description="The PTY's rows (0: 24).")
    cols: int = Field(default=0, ge=0, le=65535, description="The PTY's columns (0: 80).")
    stream_stdin: bool = Field(default=False, description="stdin stays open: binary messages feed it, "
                                                          "{'type':'eof'} closes it.")


class _Abort:
    """The abort function of a running exec, callable before it is known (it then runs as
    soon as the exec starts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fn: Callable[[], None] | None = None
        self.wanted = False

    def set(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._fn = fn
            if not self.wanted:
                return
        fn()

    def __call__(self) -> None:
        with self._lock:
            self.wanted = True
            fn = self._fn
        if fn is not None:
            fn()


def _stdin(body: models.ExecRequest) -> bytes:
    if body.stdin_b64 is not None:
        if body.stdin:
            raise ApiError(400, "invalid", "give stdin or stdin_b64, not both")
        try:
            return base64.b64decode(body.stdin_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid", "stdin_b64 is not valid base64") from None
    return body.stdin.encode()


def _check_argv(argv: list[str]) -> None:
    if not argv[0]:
        raise ApiError(400, "invalid", "argv[0] must not be empty")
    if any("\0" in a for a in argv):
        raise ApiError(400, "invalid", "argv must not contain NUL characters")


def _check_env(env: dict[str, str] | None, cwd: str | None) -> None:
    for k, v in (env or {}).items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ApiError(400, "invalid", f"invalid env name or value: {util.one_line(k)[:100]!r}")
    if cwd is not None and (not cwd or "\0" in cwd):
        raise ApiError(400, "invalid", "cwd must be a non-empty path without NUL")


@router.post("/instances/{id}/exec", response_model=models.ExecResult, responses=responses(404, 409, 502),
             summary="Run a command in the guest and return its exit code and output (bounded)")
async def exec_(id: str, body: models.ExecRequest, st: Dep, request: Request,
                binary: bool = False) -> dict[str, Any]:
    _check_argv(body.argv)
    _check_env(body.env, body.cwd)
    stdin = _stdin(body)
    abort = _Abort()

    def work() -> dict[str, Any]:
        t0 = time.monotonic()
        with st.metrics.timed("exec"):
            r = st.mgr.exec(id, body.argv, stdin=stdin, timeout=body.timeout, env=body.env, cwd=body.cwd,
                            max_output=models.MAX_EXEC_OUTPUT, on_start=abort.set)
        enc: Callable[[bytes], str] = (lambda b: base64.b64encode(b).decode()) if binary \
            else (lambda b: b.decode(errors="replace"))
        return {"exit_code": r.exit_code, "stdout": enc(r.stdout), "stderr": enc(r.stderr),
                "timed_out": r.timed_out, "signal": r.signal, "stdout_dropped": r.stdout_dropped,
                "stderr_dropped": r.stderr_dropped, "encoding": "base64" if binary else "utf-8",
                "seconds": round(time.monotonic() - t0, 4)}

    async with st.auto.activity(st, id), st.exec_slot(id):
        task = asyncio.ensure_future(blocking(st, work))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    abort()  # the client is gone: its command is killed in the guest
                    with contextlib.suppress(Exception):
                        await task
                    raise ApiError(400, "invalid", "client disconnected")
        except asyncio.CancelledError:
            abort()  # the server is shutting down and gave up waiting for it
            raise


@router.websocket("/instances/{id}/exec/ws")
async def exec_ws(ws: WebSocket, id: str) -> None:
    st: State = ws.app.state.vmfork
    with st.metrics.counted("exec_streams"):
        await _exec_ws(ws, st, id)


async def _exec_ws(ws: WebSocket, st: State, id: str) -> None:
    await ws.accept()

    async def fail(code: str, detail: str) -> None:
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps({"type": "error", "code": code, "detail": util.one_line(detail)[:2000]}))
            await ws.close(1000)

    try:
        first = await ws.receive_text()
        body = ExecStart.model_validate_json(first)
        _check_argv(body.argv)
        _check_env(body.env, body.cwd)
        stdin = _stdin(body)
    except WebSocketDisconnect:
        return
    except ValidationError as e:
        await fail("invalid", "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:5]))
        return
    except ApiError as e:
        await fail(e.code, e.detail)
        return
    except (ValueError, KeyError, AttributeError) as e:
        await fail("invalid", f"bad message: {e}")
        return

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=64)
    abort = _Abort()
    interactive = body.stream_stdin or body.tty
    pipe: asyncio.Future[ExecStdin] = loop.create_future()

    def put(item: tuple[int, bytes]) -> None:  # from the exec thread: waits for room
        stream, data = item
        for i in range(0, len(data), OUTPUT_MESSAGE):  # bounded: 64 messages of OUTPUT_MESSAGE
            if abort.wanted:
                raise ConnectionAbortedError("the client went away")
            asyncio.run_coroutine_threadsafe(queue.put((stream, data[i:i + OUTPUT_MESSAGE])), loop).result()

    def got_stdin(p: ExecStdin) -> None:  # from the exec thread, once the command runs
        def settle() -> None:
            if not pipe.done():
                pipe.set_result(p)

        loop.call_soon_threadsafe(settle)

    def work() -> Any:
        try:
            with st.metrics.timed("exec"):
                return st.mgr.exec(id, body.argv, stdin=stdin, timeout=body.timeout, env=body.env,
                                   cwd=body.cwd, on_start=abort.set,
                                   on_stdout=lambda b: put((STDOUT, b)), on_stderr=lambda b: put((STDERR, b)),
                                   on_stdin=got_stdin if interactive else None, tty=body.tty,
                                   rows=body.rows, cols=body.cols)
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(queue.put(None), loop)

    try:
        async with st.auto.activity(st, id), st.exec_slot(id):
            await _stream(ws, st, work, queue, abort, fail, pipe if interactive else None)
    except VmforkError as e:  # the instance is not there
        await fail(classify(e)[1], str(e))


class _ClientError(Exception):
    """A malformed message of the client during the exec."""


async def _feed(ws: WebSocket, st: State, pipe: asyncio.Future[ExecStdin] | None) -> None:
    """Read the client's messages until it goes away: stdin, eof and resizes (in order)
    to the command. Returns when the client is gone; raises _ClientError on a bad message."""
    pending = 0
    room = asyncio.Event()
    todo: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def writer() -> None:
        nonlocal pending
        p = await pipe if pipe is not None else None
        while True:
            kind, arg = await todo.get()
            if p is None:
                continue
            with contextlib.suppress(BrokenPipeError, ValueError, VmforkError):  # it exited: dropped
                if kind == "data":
                    await blocking(st, p.write, arg)
                elif kind == "eof":
                    await blocking(st, p.close)
            if kind == "data":
                pending -= len(arg)
                room.set()

    task = asyncio.ensure_future(writer())
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                if pipe is None:
                    raise _ClientError("stdin data, but the exec was started without stream_stdin")
                data = msg["bytes"]
                if pending > MAX_PENDING_STDIN:
                    with st.metrics.counted("exec_stdin_full"):
                        while pending > MAX_PENDING_STDIN:  # the command is not reading: neither do we
                            room.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(room.wait(), PROBE_S)
                                continue
                            await ws.send_bytes(b"")  # WebSocketDisconnect once the client is gone
                pending += len(data)
                todo.put_nowait(("data", data))
                continue
            try:
                ctl = json.loads(msg.get("text") or "")
                kind = ctl["type"] if isinstance(ctl, dict) else None
            except (ValueError, KeyError):
                kind = None
            if pipe is None or kind not in ("eof", "resize"):
                raise _ClientError("expected stdin bytes, {'type': 'eof'} or {'type': 'resize', 'rows': R, "
                                   "'cols': C}" + ("" if pipe is not None else " (with stream_stdin or tty)"))
            if kind == "eof":
                todo.put_nowait(("eof", None))
                continue
            rows, cols = ctl.get("rows"), ctl.get("cols")
            if not (isinstance(rows, int) and isinstance(cols, int) and 0 < rows <= 65535 and 0 < cols <= 65535):
                raise _ClientError("resize needs integer rows and cols, 1 to 65535")
            if pipe.done():  # not queued behind stdin: a resize is not data
                await blocking(st, pipe.result().resize, rows, cols)
            else:
                def resize(f: asyncio.Future[ExecStdin], r: int = rows, c: int = cols) -> None:
                    f.result().resize(r, c)

                pipe.add_done_callback(resize)
    finally:
        task.cancel()


async def _stream(ws: WebSocket, st: State, work: Callable[[], Any], queue: asyncio.Queue[tuple[int, bytes] | None],
                  abort: _Abort, fail: Callable[[str, str], Any], pipe: asyncio.Future[ExecStdin] | None) -> None:
    task = asyncio.ensure_future(blocking(st, work))
    bad: list[str] = []

    async def watch_client() -> None:
        try:
            await _feed(ws, st, pipe)
        except _ClientError as e:
            bad.append(str(e))
        except Exception:
            pass
        abort()
        while not queue.empty():  # unblock a writer waiting for room
            queue.get_nowait()
        if bad:
            await fail("invalid", bad[0])

    watcher = asyncio.ensure_future(watch_client())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            await ws.send_bytes(bytes([item[0]]) + item[1])
        try:
            r = await task
        except VmforkError as e:
            _, code = classify(e)
            if not bad:
                await fail(code, str(e))
            return
        if bad:
            return
        await ws.send_text(json.dumps({"type": "exit", "exit_code": r.exit_code, "timed_out": r.timed_out,
                                       "signal": r.signal}))
        await ws.close(1000)
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        abort()
    finally:
        if not task.done():
            abort()
            while not queue.empty():
                queue.get_nowait()
            with contextlib.suppress(BaseException):
                await task
        if bad:
            with contextlib.suppress(BaseException):
                await watcher
        watcher.cancel()


# --- files --------------------------------------------------------------------------------
_READ = ('if [ -d "$1" ]; then printf d; exec tar -C "$1" -cf - .; '
         'elif [ -f "$1" ]; then printf f; exec cat -- "$1"; '
         'else echo "$1: no such file or directory" >&2; exit 44; fi')
_WRITE_FILE = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
_WRITE_TAR = 'mkdir -p -- "$1" && tar -C "$1" -xf -'
TAR = "application/x-tar"


def _check_path(path: str) -> None:
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise ApiError(400, "invalid", "path must be an absolute guest path (at most 4096 bytes, no NUL)")


def _guest_text(b: bytes) -> str:
    return util.one_line(b[:500].decode(errors="replace").strip())


@router.get("/instances/{id}/files", responses=responses(404, 409, 413, 502) | {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                      TAR: {"schema": {"type": "string", "format": "binary"}}},
          "description": "The file's bytes, or a tar stream of a directory."}},
    summary="Read a guest file (or a directory as a tar stream)")
async def get_file(id: str, path: Annotated[str, Query(min_length=1, max_length=4096, pattern="^/")], st: Dep) -> Response:
    _check_path(path)
    async with st.auto.activity(st, id), st.exec_slot(id):
        r = await blocking(st, st.mgr.exec, id, ["sh", "-c", _READ, "sh", path], timeout=120,
                           max_output=models.MAX_FILE_BYTES + 1)
    if r.exit_code == 44:
        raise ApiError(404, "not_found", f"{_guest_text(r.stderr)} (in the guest)")
    if r.exit_code != 0 or not r.stdout:
        raise ApiError(400, "invalid", f"reading {path} failed in the guest: {_guest_text(r.stderr)}")
    if r.stdout_dropped or len(r.stdout) > models.MAX_FILE_BYTES + 1:
        raise ApiError(413, "too_large", f"{path} is larger than {models.MAX_FILE_BYTES} bytes")
    kind, data = r.stdout[:1], r.stdout[1:]
    return Response(data, media_type=TAR if kind == b"d" else "application/octet-stream")


@router.put("/instances/{id}/files", status_code=204, responses=responses(404, 409, 413, 502),
            openapi_extra={"requestBody": {"content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                TAR: {"schema": {"type": "string", "format": "binary"}}}}},
            summary="Write a guest file (or unpack a tar stream into a directory)")
async def put_file(id: str, path: Annotated[str, Query(min_length=1, max_length=4096, pattern="^/")], st: Dep, request: Request) -> Response:
    _check_path(path)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > models.MAX_FILE_BYTES:
            raise ApiError(413, "too_large", f"the body exceeds {models.MAX_FILE_BYTES} bytes")
        parts.append(chunk)
    is_tar = request.headers.get("content-type", "").split(";")[0].strip() == TAR
    script = _WRITE_TAR if is_tar else _WRITE_FILE
    async with st.auto.activity(st, id), st.exec_slot(id):
        r = await blocking(st, st.mgr.exec, id, ["sh", "-c", script, "sh", path], stdin=b"".join(parts),
                           timeout=120)
    if r.exit_code != 0:
        raise ApiError(400, "invalid", f"writing {path} failed in the guest: {_guest_text(r.stderr)}")
    return Response(status_code=204)
