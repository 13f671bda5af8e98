"""/images: pull (a job the server runs; 202, or ``wait=true`` for the result), list, get and
delete OCI images; the built-in guest image is listed too (``kind`` builtin).

A pull runs in a worker thread through the same ``Store`` as ``vmfork image pull`` (its flock
serialises pulls, against the CLI too). The server keeps each pull in flight, and the last
failed pull of each name (until a pull of that name succeeds or it is deleted), in memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vmfork import models
from vmfork.api import problems
from vmfork.api.app import State, blocking, state
from vmfork.api.problems import responses
from vmfork.errors import Busy, NotFound, VmforkError
from vmfork.util import one_line

router = APIRouter(tags=["images"])
Dep = Annotated[State, Depends(state)]
MAX_FAILED = 64  # failed pulls remembered (the oldest are forgotten first)
MAX_LINES = 1000  # progress lines a pull keeps for its streams (the oldest are dropped first)
NAME_DOC = "An image reference (URL-encoded or not: `127.0.0.1:5000/app:1`) or digest (`sha256:...`, 12+ hex)."


@dataclass
class Pull:
    name: str  # the normalised reference
    insecure: bool
    fs: str
    started: float = field(default_factory=time.monotonic)
    status: str = "pending"
    progress: str | None = None
    digest: str | None = None
    error: str | None = None
    error_code: str | None = None
    error_status: int | None = None
    finished: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Future[None] | None = None
    lines: list[str] = field(default_factory=list)  # progress lines, the last MAX_LINES
    dropped: int = 0  # lines dropped from the head of ``lines``

    def on_progress(self, msg: str) -> None:
        """Called from the worker thread with the store's and the tools' progress lines."""
        self.progress = one_line(msg)[:300]
        self.lines.append(self.progress)
        if len(self.lines) > MAX_LINES:
            del self.lines[0]
            self.dropped += 1
        if msg.startswith("waiting for another"):
            self.status = "pending"
        elif msg.startswith(("umoci", "converting")):
            self.status = "converting"
        elif msg.startswith(("pulling", "skopeo")):
            self.status = "pulling"

    def view(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        return {"name": self.name, "kind": "oci", "status": self.status, "digest": self.digest,
                "progress": self.progress, "error": self.error, "error_code": self.error_code,
                "error_status": self.error_status, "seconds": round(end - self.started, 3)}


def pulls(st: State) -> dict[str, Pull]:
    d: dict[str, Pull] = st.pulls
    return d


def normalise(text: str) -> str | None:
    from vmfork.images import oci

    with contextlib.suppress(VmforkError):
        return str(oci.parse_ref(text))
    return None


def _oci_view(st: State, im: Any, name: str | None = None) -> dict[str, Any]:
    meta, spec = im.meta, im.spec
    env = dict(str(e).split("=", 1) for e in spec.get("env", []) if "=" in str(e))
    return {"name": name if name in im.refs else (im.refs[0] if im.refs else im.digest), "kind": "oci",
            "status": "ready", "digest": im.digest, "refs": list(im.refs), "fs": im.fs,
            "size_bytes": int(meta.get("rootfs_allocated_bytes", 0)),
            "compressed_size_bytes": int(meta.get("compressed_size", 0)), "created_at": meta.get("created"),
            "entrypoint": spec.get("entrypoint"), "cmd": spec.get("cmd"), "env": env,
            "working_dir": spec.get("workdir"), "user": spec.get("user") or None,
            "used_by": st.mgr.image_users(im.digest), "dir": str(im.dir),
            "seconds": meta.get("pull_seconds")}


def _last_failure(st: State, refs: Any) -> dict[str, Any]:
    """The error of a failed re-pull of one of ``refs`` (the image shown is the older one)."""
    for r in refs:
        p = pulls(st).get(r)
        if p is not None and p.status == "failed":
            return {"error": p.error, "error_code": p.error_code, "error_status": p.error_status}
    return {}


def _list(st: State) -> list[dict[str, Any]]:
    from vmfork.images import list_images

    rows = [{"name": i.digest[:16], "kind": "builtin", "status": "ready", "digest": i.digest, "dir": str(i.dir),
             "kernel_version": i.kernel_version} for i in list_images(st.mgr.dd.images)]
    have: set[str] = set()
    for im in st.mgr.oci_store().images():
        rows.append(_oci_view(st, im) | _last_failure(st, im.refs))
        have.update(im.refs)
    rows += [p.view() for p in list(pulls(st).values()) if p.status != "failed" or p.name not in have]
    return rows


def _get(st: State, name: str) -> dict[str, Any]:
    key = normalise(name)
    p = pulls(st).get(key) if key else None
    if p is not None and p.status != "failed":
        return p.view()
    try:
        im = st.mgr.oci_store().get(name)
    except NotFound:
        if p is not None:
            return p.view()
        raise
    return _oci_view(st, im, key) | _last_failure(st, [key] if key in im.refs else [])


async def _run(st: State, p: Pull, body: models.PullImage) -> None:
    from vmfork.images.store import Store

    def work() -> Any:
        with st.metrics.timed("pull"):
            return Store(st.mgr.dd.images, p.on_progress).pull(body.name, insecure=body.insecure, fmt=body.fs)

    try:
        im = await blocking(st, work)
        p.status, p.digest, p.progress = "ready", im.digest, None
        if pulls(st).get(p.name) is p:
            del pulls(st)[p.name]
    except Exception as e:  # every failure is the pull's result, kept for GET
        import errno

        enospc = isinstance(e, OSError) and e.errno == errno.ENOSPC
        status, code = (507, "no_space") if enospc else problems.classify(e)
        p.status, p.error, p.error_code, p.error_status = "failed", one_line(str(e))[:2000], code, status
        failed = [k for k, v in pulls(st).items() if v.status == "failed"]
        for k in failed[:-MAX_FAILED]:
            del pulls(st)[k]
    finally:
        p.finished = time.monotonic()
        p.done.set()


IMAGE_200: dict[int | str, dict[str, Any]] = {200: {
    "model": models.Image, "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "wait=true: the pull is done, the image. stream=true: server-sent events, one `data:` "
                   "per progress line (escaped), then `event: image` with the image (JSON) or `event: "
                   "problem` with the problem (JSON)."},
             202: {"model": models.Image, "description": "The pull started (or one of this name is in "
                   "progress): follow it with GET /images/{name}."}}


@router.post("/images", status_code=202, response_model=models.Image, responses=responses(404, 409, 502, 507)
             | IMAGE_200, summary="Pull an OCI image (linux/amd64) and convert it to a root filesystem")
async def pull_image(body: models.PullImage, st: Dep, request: Request, wait: bool = False,
                     stream: bool = False) -> Any:
    """Starts the pull and answers 202 at once (as hypeman's `POST /images`): the image's `status`
    goes pending → pulling → converting → ready or failed (`error`, `error_code`), as `GET
    /images/{name}` shows. With `wait=true` the answer comes when the pull is done: 200 and the
    image, or the problem (404 `not_found` when the registry has no such image or not for
    linux/amd64, 502 `registry_error` when it cannot be reached or refuses, 507 `no_space`).
    With `stream=true`: the progress as server-sent events, then the image or the problem. A
    pull of a name already in progress is joined, not started again; a client that goes away
    does not stop the pull."""
    from vmfork.images import oci

    name = str(oci.parse_ref(body.name))  # a bad reference: 400 invalid, before any work
    p = pulls(st).get(name)
    if p is not None and p.status != "failed":
        if (p.insecure, p.fs) != (body.insecure, body.fs):
            raise Busy(f"a pull of '{name}' with other options (insecure={p.insecure}, fs={p.fs}) is in progress")
    else:
        p = pulls(st)[name] = Pull(name, body.insecure, body.fs)
        p.task = asyncio.ensure_future(_run(st, p, body))
    if stream:
        return StreamingResponse(_events(st, p, request), media_type="text/event-stream")
    if not wait:
        return p.view()
    await p.done.wait()
    if p.status == "failed":
        assert p.error_status is not None and p.error_code is not None
        return problems.problem(p.error_status, p.error_code, p.error or "", request.url.path)
    return JSONResponse(await blocking(st, _get, st, name), status_code=200)


def _sse(data: str, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


async def _events(st: State, p: Pull, request: Request) -> AsyncIterator[str]:
    """The pull's progress lines (from its first one kept), as they come; then its result."""
    sent = 0  # lines sent, counted from the pull's first
    while True:
        finished = p.done.is_set()
        start = max(sent - p.dropped, 0)
        new = p.lines[start:]
        sent = p.dropped + start + len(new)
        for line in new:
            yield _sse(line)
        if finished:
            break
        if await request.is_disconnected():
            return  # the pull goes on: GET /images/{name} shows it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.done.wait(), 0.2)
    if p.status == "failed":
        body = {"type": "about:blank", "title": problems.TITLES.get(p.error_code or "", p.error_code),
                "status": p.error_status, "detail": p.error, "code": p.error_code, "instance": "/images"}
        yield _sse(json.dumps(body), "problem")
    else:
        yield _sse(json.dumps(await blocking(st, _get, st, p.name)), "image")


@router.get("/images", response_model=list[models.Image], responses=responses(),
            summary="OCI images, pulls in progress or failed, and the built-in guest image")
async def list_images(st: Dep) -> list[dict[str, Any]]:
    return await blocking(st, _list, st)


@router.get("/images/{name:path}", response_model=models.Image, responses=responses(404),
            summary="Get an image (or its pull) by reference or digest", description=NAME_DOC)
async def get_image(name: str, st: Dep) -> dict[str, Any]:
    return await blocking(st, _get, st, name)


@router.delete("/images/{name:path}", status_code=204, responses=responses(404, 409),
               summary="Remove an image (all its refs); refused (409 busy) while an instance or named "
                       "snapshot uses it", description=NAME_DOC)
async def delete_image(name: str, st: Dep) -> None:
    key = normalise(name)
    p = pulls(st).get(key) if key else None
    if p is not None and p.status != "failed":
        raise Busy(f"a pull of '{key}' is in progress: delete it once it is done")

    def work() -> None:
        try:
            im = st.mgr.oci_store().remove(name, st.mgr.image_users)
        except NotFound:
            if p is None:
                raise
            im = None
        for r in [key, *(im.refs if im is not None else ())]:
            if r is not None and (q := pulls(st).get(r)) is not None and q.status == "failed":
                del pulls(st)[r]

    await blocking(st, work)
