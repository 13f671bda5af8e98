"""The fleet client: ``Fleet(address)``, what ``vmfork fleet ...`` runs.

It keeps no state of its own: every call asks the hosts (their agents) what they hold, and
for a host that is down it names what that host last reported, marked ``lost``. Calls are
routed to the host that holds the instance; forks are placed by a ``Policy``
(``vmfork.fleet.placement``), replicating the snapshot host to host first where needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork import util
from vmfork.errors import AlreadyExists, InvalidArgument, NotFound, VmforkError
from vmfork.fleet import ray_adapter as engine
from vmfork.fleet.placement import HoldersFirst, HostView, Plan, Policy, Request

Progress = Callable[[str], None]
MAX_COUNT = 1000


@dataclass
class HostState:
    name: str
    up: bool
    report: dict[str, Any] | None  # fresh if up, else the last one it published (or None)
    error: str | None = None

    def view(self) -> HostView:
        r = self.report or {}
        return HostView(self.name, len(r.get("instances", [])), frozenset(s["name"] for s in r.get("snapshots", [])),
                        int(r.get("mem_available", 0)), int(r.get("disk_free", 0)))


@dataclass
class ForkResult:
    forks: list[dict[str, Any]] = field(default_factory=list)  # each with its "host"
    failed: dict[str, str] = field(default_factory=dict)  # fork name -> why
    replicated: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"forks": self.forks, "failed": self.failed, "replicated": self.replicated, "plan": self.plan,
                "timings": self.timings}


class Fleet:
    """The vmfork hosts of the Ray cluster at ``address``."""

    def __init__(self, address: str, *, policy: Policy | None = None, progress: Progress | None = None) -> None:
        self.address = address
        self.policy: Policy = policy or HoldersFirst()
        self.progress: Progress = progress or (lambda _m: None)
        engine.connect(address)

    def close(self) -> None:
        engine.disconnect()

    # --- hosts -----------------------------------------------------------------------------------
    def join(self, host: str, data_dir: Path) -> dict[str, Any]:
        return engine.join(host, data_dir)

    def leave(self, host: str) -> None:
        engine.leave(host)

    def states(self) -> list[HostState]:
        names = engine.hosts()
        live = engine.up()

        def one(h: str) -> HostState:
            if h in live:
                try:
                    return HostState(h, True, engine.call(h, "report", timeout=60))
                except VmforkError as e:
                    return HostState(h, False, engine.last_report(h), util.one_line(str(e)))
            return HostState(h, False, engine.last_report(h), "its node is down")

        if not names:
            return []
        with ThreadPoolExecutor(len(names)) as ex:
            return list(ex.map(one, names))

    def hosts(self) -> list[dict[str, Any]]:
        rows = []
        for s in self.states():
            r = s.report or {}
            rows.append({"host": s.name, "up": s.up, "problem": s.error, "cpus": r.get("cpus"),
                         "mem_available": r.get("mem_available"), "disk_free": r.get("disk_free"),
                         "fs": r.get("fs"), "data_dir": r.get("data_dir"),
                         "instances": len(r.get("instances", [])),
                         "snapshots": [x["name"] for x in r.get("snapshots", [])],
                         "reported_at": r.get("reported_at")})
        return rows

    def ps(self, states: list[HostState] | None = None) -> list[dict[str, Any]]:
        """Instances across hosts, each with its host; those of a host that is down are
        ``lost`` (as it last reported them)."""
        rows = []
        for s in states if states is not None else self.states():
            for i in (s.report or {}).get("instances", []):
                row = dict(i) | {"host": s.name}
                if not s.up:
                    row |= {"state": "lost", "last_state": i.get("state"),
                            "problem": f"host '{s.name}' is down ({s.error})"}
                rows.append(row)
        return rows

    def locate(self, name: str) -> str:
        """The live host that holds instance ``name``."""
        for row in self.ps():
            if name in (row["name"], row["id"]):
                if row["state"] == "lost":
                    raise engine.HostDown(f"instance '{name}' is on host '{row['host']}', which is down")
                return str(row["host"])
        raise NotFound(f"instance '{name}' not found on any host")

    # --- routed to the instance's host -----------------------------------------------------------
    def exec(self, name: str, argv: list[str], *, stdin: bytes = b"", timeout: float | None = None) -> dict[str, Any]:
        if not argv:
            raise InvalidArgument("no command given: use 'vmfork fleet exec NAME -- CMD [ARGS...]'")
        host = self.locate(name)
        return dict(engine.call(host, "exec", name, argv, stdin, timeout) | {"host": host})

    def standby(self, name: str) -> dict[str, Any]:
        host = self.locate(name)
        return {"host": host, "timings": engine.call(host, "standby", name)}

    def restore(self, name: str) -> dict[str, Any]:
        host = self.locate(name)
        return {"host": host, "timings": engine.call(host, "restore", name)}

    def rm(self, name: str, force: bool = False) -> str:
        host = self.locate(name)
        engine.call(host, "rm", name, force)
        return host

    # --- snapshots -------------------------------------------------------------------------------
    def _snapshot(self, states: list[HostState], snap: str) -> dict[str, Any]:
        for s in states:
            if s.up:
                for x in (s.report or {}).get("snapshots", []):
                    if snap in (x["name"], x["id"]):
                        return dict(x)
        raise NotFound(f"snapshot '{snap}' is not on any live host")

    def _replicate(self, states: list[HostState], snap: dict[str, Any], source: str, target: str) -> dict[str, Any]:
        rep = next(s.report for s in states if s.name == target) or {}
        with_image = snap["image_digest"] not in rep.get("images", [])
        self.progress(f"replicating '{snap['name']}' {source} -> {target}"
                      f"{' (with its guest image)' if with_image else ''}")
        r = engine.replicate(source, target, snap["name"], with_image,
                             {"name": snap["name"], "digests": snap["digests"]}, self.progress)
        return r | {"source": source, "target": target, "with_image": with_image}

    def replicate(self, snap: str, to: int) -> dict[str, Any]:
        """Make snapshot ``snap`` held by ``to`` live hosts (copying it to those with the most
        free disk). Returns the holders and the copies made."""
        states = self.states()
        s = self._snapshot(states, snap)
        live = [h for h in states if h.up]
        if not 1 <= to <= len(live):
            raise InvalidArgument(f"invalid --to '{to}': between 1 and the {len(live)} live host(s)")
        holders = [h.name for h in live if s["name"] in h.view().snapshots]
        others = sorted((h for h in live if h.name not in holders), key=lambda h: (-h.view().disk_free, h.name))
        targets = [h.name for h in others[: max(0, to - len(holders))]]
        done = self._replicate_all(states, s, {t: holders[i % len(holders)] for i, t in enumerate(targets)})
        failed = {r["target"]: r["error"] for r in done if "error" in r}
        return {"snapshot": s["name"], "holders": holders + [r["target"] for r in done if "error" not in r],
                "copies": [r for r in done if "error" not in r], "failed": failed}

    def _replicate_all(self, states: list[HostState], snap: dict[str, Any], pairs: dict[str, str]) -> list[dict[str, Any]]:
        def one(target: str) -> dict[str, Any]:
            try:
                return self._replicate(states, snap, pairs[target], target)
            except VmforkError as e:
                return {"source": pairs[target], "target": target, "error": util.one_line(str(e))}

        if not pairs:
            return []
        with ThreadPoolExecutor(len(pairs)) as ex:
            return list(ex.map(one, sorted(pairs)))

    # --- fork ------------------------------------------------------------------------------------
    def fork(self, snap: str, name: str, *, count: int = 1, per_host: int | None = None,
             target_state: str = "running") -> ForkResult:
        """Place ``count`` forks of snapshot ``snap`` (``NAME-1`` ... or ``NAME`` alone when
        ``count`` is 1) across the hosts; returns where each landed and which failed, why."""
        util.validate_name(name)
        if not 1 <= count <= MAX_COUNT:
            raise InvalidArgument(f"invalid --count '{count}': between 1 and {MAX_COUNT}")
        if per_host is not None and per_host < 1:
            raise InvalidArgument(f"invalid --per-host '{per_host}': 1 or more")
        names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
        for n in names:
            util.validate_name(n)
        t0 = time.monotonic()
        states = self.states()
        taken = {r["name"]: r["host"] for r in self.ps(states)}
        for n in names:
            if n in taken:
                raise AlreadyExists(f"instance '{n}' already exists (on host '{taken[n]}')")
        s = self._snapshot(states, snap)
        live = [h for h in states if h.up]
        plan: Plan = self.policy.place(Request(s["name"], tuple(names), int(s["memory_mib"]), per_host),
                                       [h.view() for h in live])
        res = ForkResult(failed=dict(plan.unplaced), plan=plan.assign)
        t_plan = time.monotonic()
        for r in self._replicate_all(states, s, plan.replicate):
            if "error" in r:  # the forks meant for that host fail, named
                for n in plan.assign.pop(r["target"], []):
                    res.failed[n] = f"replicating '{s['name']}' to host '{r['target']}' failed: {r['error']}"
            res.replicated.append(r)
        t_rep = time.monotonic()
        pending = [engine.submit(h, "fork", s["name"], n, target_state, tag=n)
                   for h, ns in sorted(plan.assign.items()) for n in ns]
        self.progress("forking: " + ", ".join(f"{h}: {len(ns)}" for h, ns in sorted(plan.assign.items())))
        while pending:
            done, pending = engine.wait(pending, 1.0)
            for p in done:
                try:
                    res.forks.append(dict(p.result()))
                    self.progress(f"{p.tag} on {p.host}: {target_state}")
                except VmforkError as e:
                    res.failed[str(p.tag)] = f"on host '{p.host}': {util.one_line(str(e))}"
                    self.progress(f"{p.tag} on {p.host}: failed")
        res.forks.sort(key=lambda f: names.index(f["name"]))
        t_end = time.monotonic()
        res.timings = {"plan_s": round(t_plan - t0, 4), "replicate_s": round(t_rep - t_plan, 4),
                       "fork_s": round(t_end - t_rep, 4), "total_s": round(t_end - t0, 4)}
        return res
