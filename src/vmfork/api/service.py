"""/health, /capabilities, /resources, /metrics and /snapshots."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from vmfork import __version__, models
from vmfork.api.app import State, blocking, state
from vmfork.api.instances import view
from vmfork.api.problems import responses

router = APIRouter()
Dep = Annotated[State, Depends(state)]


@router.get("/health", response_model=models.Health, tags=["service"], summary="Liveness")
async def health(st: Dep) -> dict[str, Any]:
    return {"status": "ok", "version": __version__, "uptime_s": round(time.monotonic() - st.started, 3)}


def _capabilities(st: State) -> dict[str, Any]:
    from vmfork import fs
    from vmfork.hypervisor import get_hypervisor
    from vmfork.hypervisor.accel import kvm_device_problem

    hvs = {name: get_hypervisor(name).available() for name in ("qemu", "firecracker")}
    kvm = kvm_device_problem()
    return {
        "hypervisors": hvs,
        "accel": {"tcg": True, "kvm": kvm is None, "kvm_problem": kvm},
        "reflink": fs.reflink_supported(st.mgr.dd.guests),
        "filesystem": fs.filesystem_type(st.mgr.dd.guests),
        "features": ["fork", "fork_count", "standby", "restore", "snapshots", "exec", "exec_ws", "files",
                     "logs", "metrics", "images", "image_pull"],
    }


@router.get("/capabilities", response_model=models.Capabilities, tags=["service"], responses=responses(),
            summary="Backends, acceleration, reflink and features of this host")
async def capabilities(st: Dep) -> dict[str, Any]:
    return await blocking(st, _capabilities, st)


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, val = line.partition(":")
            out[key] = int(val.split()[0]) << 10
    return out


def _states(st: State) -> tuple[dict[str, int], int]:
    counts = dict.fromkeys(models.STATES, 0)
    ram = 0
    for inst in st.mgr.instances():
        s = st.mgr.describe(inst)["state"]
        counts[s] = counts.get(s, 0) + 1
        if s in ("running", "paused"):
            ram += inst.memory_mib << 20
    return counts, ram


def _resources(st: State) -> dict[str, Any]:
    mem = _meminfo()
    vfs = os.statvfs(st.mgr.dd.root)
    counts, ram = _states(st)
    return {"cpus": os.cpu_count() or 1, "memory_bytes": mem.get("MemTotal", 0),
            "memory_available_bytes": mem.get("MemAvailable", 0),
            "disk_bytes": vfs.f_blocks * vfs.f_frsize, "disk_free_bytes": vfs.f_bavail * vfs.f_frsize,
            "instances": counts, "allocated_memory_bytes": ram}


@router.get("/resources", response_model=models.Resources, tags=["service"], responses=responses(),
            summary="Host capacity and what the instances take of it")
async def resources(st: Dep) -> dict[str, Any]:
    return await blocking(st, _resources, st)


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"], responses=responses(),
            summary="Prometheus text: instances by state, operation latency histograms")
async def metrics(st: Dep) -> PlainTextResponse:
    counts, _ = await blocking(st, _states, st)
    return PlainTextResponse(st.metrics.render(counts), media_type="text/plain; version=0.0.4")


# --- snapshots --------------------------------------------------------------------------------
def snap_view(st: State, s: Any, problem: str | None = None) -> dict[str, Any]:
    d = {k: v for k, v in s.to_json().items() if k in models.Snapshot.model_fields}
    return d | {"dir": str(s.dir), "logical_bytes": s.logical_bytes, "problem": problem}


def _store(st: State) -> Any:
    from vmfork.instances.snapshot_ops import store

    return store(st.mgr)


@router.post("/instances/{id}/snapshots", status_code=201, response_model=models.SnapshotResult,
             tags=["snapshots"], responses=responses(404, 409, 502, 507),
             summary="Take a named snapshot of an instance (running or in standby)")
async def create_snapshot(id: str, body: models.SnapshotCreate, st: Dep) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with st.metrics.timed("snapshot"):
            s, timings = st.mgr.snapshot_create(id, body.name)
        return {"snapshot": snap_view(st, s), "timings": timings}

    return await blocking(st, work)


@router.get("/snapshots", response_model=list[models.Snapshot], tags=["snapshots"], responses=responses(),
            summary="List named snapshots")
async def list_snapshots(st: Dep) -> list[dict[str, Any]]:
    return await blocking(st, lambda: [snap_view(st, s) for s in _store(st).all()])


@router.get("/snapshots/{id}", response_model=models.Snapshot, tags=["snapshots"], responses=responses(404),
            summary="Get a named snapshot (by id or name)")
async def get_snapshot(id: str, st: Dep) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        store = _store(st)
        s = store.find(id)
        return snap_view(st, s, store.quick_problem(s))

    return await blocking(st, work)


@router.delete("/snapshots/{id}", status_code=204, tags=["snapshots"], responses=responses(404, 409),
               summary="Remove a named snapshot (its forks keep working)")
async def delete_snapshot(id: str, st: Dep) -> None:
    await blocking(st, lambda: _store(st).rm(id))


@router.post("/snapshots/{id}/fork", status_code=201, response_model=models.ForkResult, tags=["snapshots"],
             responses=responses(404, 409, 502, 507), summary="Fork instances from a named snapshot")
async def fork_snapshot(id: str, body: models.SnapshotFork, st: Dep) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        with st.metrics.timed("fork"):
            forks, timings = st.mgr.snapshot_fork(id, body.name, count=body.count, target_state=body.target_state,
                                                  partial=body.partial, overcommit=body.overcommit)
        return {"instances": [view(st, f) for f in forks], "timings": timings}

    return await blocking(st, work)
