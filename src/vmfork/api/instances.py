"""/instances: create, list, get, delete, standby, restore, stop, start, fork, logs, wait, stats."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from vmfork import models, util
from vmfork.api.app import State, blocking, state
from vmfork.api.problems import ApiError, responses
from vmfork.errors import InvalidArgument

router = APIRouter(tags=["instances"])
Dep = Annotated[State, Depends(state)]
# Lines of a console log that /logs sends at most for ``tail``, and bytes per line.
MAX_TAIL = 10000
MAX_LINE = 4096
IdPath = Annotated[str, "id or name"]


def view(st: State, inst: Any, *, detail: bool = False, seconds: float | None = None) -> dict[str, Any]:
    d = st.mgr.describe(inst, detail=detail)
    d["auto_standby"] = st.auto.settings().get(inst.id)
    if seconds is not None:
        d["seconds"] = round(seconds, 4)
    return d


def _get(st: State, ref: str, detail: bool = False) -> dict[str, Any]:
    return view(st, st.mgr.find(ref), detail=detail)


def _oci_options(body: models.CreateInstance) -> dict[str, Any]:
    """``image`` and its main process's overrides, as ``vmfork run --image REF -e K=V -w DIR
    --entrypoint CMD -- ARGS`` gives them to the Manager; none of them without an image.
    (Not nullable in the schema, and bounds checked here: fuzzers send null, or drop a bound,
    as an "invalid" value, and that would be a valid request that boots a VM.)"""
    given = [k for k in ("env", "entrypoint", "cmd", "workdir") if getattr(body, k)]
    if body.image in ("", "default"):
        if given:
            raise ApiError(400, "invalid", f"{', '.join(given)}: only with an OCI image ('image'); the built-in "
                           "image has no main process (pass env and cwd to exec instead)")
        return {}
    for what, n, cap in [("image", len(body.image), 512), ("env", len(body.env), 1024),
                         ("entrypoint", len(body.entrypoint), 256), ("cmd", len(body.cmd), 4096),
                         ("workdir", len(body.workdir), 4096)]:
        if n > cap:
            raise ApiError(400, "invalid", f"{what}: at most {cap} {'characters' if what in ('image', 'workdir') else 'items'}")
    for k, v in body.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ApiError(400, "invalid", f"env: invalid variable name {util.one_line(k)[:100]!r} "
                           "(letters, digits and _, not starting with a digit)")
        if "\0" in v:
            raise ApiError(400, "invalid", f"env {k}: NUL bytes are not allowed")
    for arg in [*body.entrypoint, *body.cmd, body.workdir]:
        if "\0" in arg:
            raise ApiError(400, "invalid", "entrypoint, cmd and workdir: NUL bytes are not allowed")
    main = {"env": [f"{k}={v}" for k, v in body.env.items()], "workdir": body.workdir or None,
            "entrypoint": body.entrypoint or None, "args": body.cmd or None}
    return {"oci_image": body.image, "main": main}


@router.post("/instances", status_code=201, response_model=models.Instance,
             responses=responses(404, 409, 502, 507), summary="Create and start an instance")
async def create_instance(body: models.CreateInstance, st: Dep) -> dict[str, Any]:
    oci = _oci_options(body)
    from vmfork.network.spec import build as net_spec

    mode = body.network or ("default" if (body.publish or body.allow or body.egress != "allow") else "none")
    network = net_spec(mode, body.publish, body.egress, body.allow)
    memory_mib = util.parse_memory(body.memory)
    limits = {"cpus": body.cpus, "pids": body.pids_limit, "io_weight": body.io_weight,
              "memory_limit_mib": util.parse_size(body.memory_limit, "memory limit") >> 20
              if body.memory_limit else None}

    def work() -> dict[str, Any]:
        t0 = time.monotonic()
        with st.metrics.timed("run"):
            inst = st.mgr.run(body.name, memory_mib=memory_mib, vcpus=body.vcpus, hypervisor=body.hypervisor,
                              accel=body.accel, limits=limits, overcommit=body.overcommit, network=network, **oci)
        if body.auto_standby is not None:
            st.auto.set(inst.id, body.auto_standby)
        return view(st, inst, seconds=time.monotonic() - t0)

    return await blocking(st, work)


@router.get("/instances", response_model=list[models.Instance], responses=responses(),
            summary="List instances")
async def list_instances(st: Dep, state: Annotated[models.State | None, Query()] = None) -> list[dict[str, Any]]:
    def work() -> list[dict[str, Any]]:
        rows = [view(st, i) for i in st.mgr.instances()]
        return [r for r in rows if state is None or r["state"] == state]

    return await blocking(st, work)


@router.get("/instances/{id}", response_model=models.InstanceDetail, responses=responses(404),
            summary="Get an instance (by id or name)")
async def get_instance(id: str, st: Dep) -> dict[str, Any]:
    return await blocking(st, _get, st, id, True)


@router.delete("/instances/{id}", status_code=204, responses=responses(404, 409),
               summary="Remove an instance (running ones too unless force=false)")
async def delete_instance(id: str, st: Dep, force: bool = True) -> None:
    await st.auto.release(st, id)

    def work() -> None:
        with st.metrics.timed("rm"):
            st.mgr.rm(id, force=force)

    await blocking(st, work)


def _action(op: str, st: State, id: str, fn: Any, **kw: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    with st.metrics.timed(op):
        out = fn(id, **kw)
    secs = time.monotonic() - t0
    timings = out if isinstance(out, dict) else {}
    result = out if isinstance(out, str) else None
    return {"instance": view(st, st.mgr.find(id), seconds=secs), "result": result, "timings": timings}


@router.post("/instances/{id}/standby", response_model=models.ActionResult, responses=responses(404, 409, 502),
             summary="Put a running instance in standby (snapshot to disk, VMM stopped)")
async def standby(id: str, st: Dep) -> dict[str, Any]:
    return await blocking(st, _action, "standby", st, id, st.mgr.standby)


@router.post("/instances/{id}/restore", response_model=models.ActionResult,
             responses=responses(404, 409, 502, 507), summary="Restore an instance from standby")
async def restore(id: str, st: Dep, overcommit: bool = False) -> dict[str, Any]:
    await st.auto.release(st, id)
    return await blocking(st, _action, "restore", st, id, st.mgr.restore, overcommit=overcommit)


@router.post("/instances/{id}/stop", response_model=models.ActionResult, responses=responses(404, 409, 502),
             summary="Stop an instance (the guest powers off)")
async def stop(id: str, st: Dep, body: models.StopRequest | None = None) -> dict[str, Any]:
    return await blocking(st, _action, "stop", st, id, st.mgr.stop, force=bool(body and body.force))


@router.post("/instances/{id}/start", response_model=models.ActionResult,
             responses=responses(404, 409, 502, 507), summary="Cold-boot a stopped instance")
async def start(id: str, st: Dep, body: models.StartRequest | None = None) -> dict[str, Any]:
    def fn(ref: str, **kw: Any) -> str:
        st.mgr.start(ref, **kw)
        return "started"

    return await blocking(st, _action, "start", st, id, fn, overcommit=bool(body and body.overcommit))


@router.post("/instances/{id}/fork", status_code=201, response_model=models.ForkResult,
             responses=responses(404, 409, 502, 507), summary="Fork an instance (copy-on-write)")
async def fork(id: str, body: models.ForkRequest, st: Dep) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with st.metrics.timed("fork"):
            if body.count is None:
                if body.partial:
                    raise InvalidArgument("partial needs count")
                inst, timings = st.mgr.fork(id, body.name, from_running=body.from_running,
                                            target_state=body.target_state, overcommit=body.overcommit)
                forks = [inst]
            else:
                forks, timings = st.mgr.fork_count(id, body.name, count=body.count,
                                                   from_running=body.from_running,
                                                   target_state=body.target_state, partial=body.partial,
                                                   overcommit=body.overcommit)
        return {"instances": [view(st, f) for f in forks], "timings": timings}

    return await blocking(st, work)


@router.get("/instances/{id}/wait", response_model=models.WaitResult, responses=responses(404),
            summary="Wait until an instance is in a state (or the timeout passes)")
async def wait(id: str, st: Dep, state: models.State,
               timeout: Annotated[float, Query(ge=0, le=3600)] = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        d = await blocking(st, _get, st, id)
        if d["state"] == state or time.monotonic() >= deadline:
            return {"reached": d["state"] == state, "state": d["state"], "instance": d}
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, 1.0)


def _sse_line(line: bytes) -> str:
    text = util.one_line(line[:MAX_LINE].rstrip(b"\r\n").decode(errors="replace"))
    return f"data: {text}\n\n"


@router.get("/instances/{id}/logs", responses=responses(404) | {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "The console log as server-sent events, one line per event (escaped)."}},
    summary="The guest console log (SSE)")
async def logs(id: str, st: Dep, request: Request,
               tail: Annotated[int, Query(ge=0, le=MAX_TAIL)] = 100, follow: bool = False) -> StreamingResponse:
    inst = await blocking(st, st.mgr.find, id)
    path = inst.g.console_log

    def last_lines() -> tuple[list[bytes], int]:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - (tail + 1) * MAX_LINE))
                data = f.read()
        except FileNotFoundError:
            return [], 0
        lines = data.splitlines(keepends=True)
        return (lines[-tail:] if tail else []), size

    async def events() -> AsyncIterator[str]:
        lines, pos = await blocking(st, last_lines)
        for line in lines:
            yield _sse_line(line)
        if not follow:
            return
        partial = b""
        while not await request.is_disconnected():
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read(1 << 20)
            except FileNotFoundError:
                return  # the instance was removed
            if chunk:
                pos += len(chunk)
                *full, partial = (partial + chunk).split(b"\n")
                for line in full:
                    yield _sse_line(line)
                if len(partial) > MAX_LINE:
                    yield _sse_line(partial)
                    partial = b""
            else:
                yield ": keep-alive\n\n"
                await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream")


def _stats(st: State, ref: str) -> dict[str, Any]:
    from vmfork import fs

    inst = st.mgr.find(ref)
    d = st.mgr.describe(inst)
    out: dict[str, Any] = {"id": inst.id, "name": inst.name, "state": d["state"],
                           "memory_bytes": inst.memory_mib << 20}
    pid = d.get("pid")
    if pid:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out["cpu_seconds"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 3)
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, val = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[f"{key.lower()}_bytes"] = int(val.split()[0]) << 10
        except (OSError, ValueError, IndexError):
            pass
    disk = inst.g.disk
    if disk.exists():
        out["disk_bytes"] = disk.stat().st_size
        out["disk_allocated_bytes"] = fs.allocated_bytes(disk)
        try:
            out["disk_shared_bytes"] = fs.extent_stats(disk, sync=False).shared_bytes
        except OSError:
            pass  # no FIEMAP here
    mem = inst.g.snapshot_latest / "memory"
    if mem.exists():
        out["snapshot_allocated_bytes"] = fs.allocated_bytes(mem)
    return out


@router.get("/instances/{id}/stats", response_model=models.Stats, responses=responses(404),
            summary="CPU seconds, RSS/PSS of the VMM, disk allocated and shared")
async def stats(id: str, st: Dep) -> dict[str, Any]:
    return await blocking(st, _stats, st, id)
