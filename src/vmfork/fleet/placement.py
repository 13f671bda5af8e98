"""Where forks go: the placement policy of a fleet (pluggable).

A policy gets what every live host reported (``HostView``) and one request (``Request``:
a snapshot, how many forks, their names, the most instances a host may hold) and returns a
``Plan``: which fork goes to which host, and which hosts must first get the snapshot
(replicated from which holder). It decides only; the fleet client carries the plan out,
and each host still admits or refuses a fork itself (memory and disk, as on one host).

The default, ``HoldersFirst``:

1. a host has *room* for ``min(per_host - instances it holds, free RAM / guest RAM,
   free disk / guest RAM)`` more forks (a fork to running claims its whole RAM, on the
   filesystem and in memory);
2. hosts that already hold the snapshot come first (a reflink fork there costs
   milliseconds), the one with the most room first, then by name;
3. when the holders are full, the snapshot is replicated to the hosts without it that have
   the most room, one replication per new host, each from the holder with the fewest
   replications assigned so far (the load of sending spreads over the holders);
4. forks are dealt round-robin over the chosen hosts, each up to its room, so they spread.

Forks that fit nowhere are returned in ``Plan.unplaced`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

MiB = 1 << 20


@dataclass(frozen=True)
class HostView:
    """What a live host reported, as placement needs it."""

    name: str
    instances: int
    snapshots: frozenset[str]  # names of the snapshots it holds
    mem_available: int  # bytes
    disk_free: int  # bytes, on its data dir's filesystem


@dataclass(frozen=True)
class Request:
    snapshot: str
    names: tuple[str, ...]
    memory_mib: int  # guest RAM of one fork
    per_host: int | None = None  # most instances a host may hold (None: only memory and disk limit)


@dataclass
class Plan:
    assign: dict[str, list[str]] = field(default_factory=dict)  # host -> fork names
    replicate: dict[str, str] = field(default_factory=dict)  # new host -> holder it copies from
    unplaced: dict[str, str] = field(default_factory=dict)  # fork name -> why

    def host_of(self, name: str) -> str | None:
        return next((h for h, ns in self.assign.items() if name in ns), None)


class Policy(Protocol):
    def place(self, req: Request, hosts: list[HostView]) -> Plan: ...


def room(h: HostView, req: Request) -> int:
    ram = max(1, req.memory_mib) * MiB
    r = min(h.mem_available // ram, h.disk_free // ram)
    if req.per_host is not None:
        r = min(r, req.per_host - h.instances)
    return max(0, r)


class HoldersFirst:
    """The default policy (see the module's docstring)."""

    def place(self, req: Request, hosts: list[HostView]) -> Plan:
        plan = Plan()
        rooms = {h.name: room(h, req) for h in hosts}
        holders = sorted((h for h in hosts if req.snapshot in h.snapshots), key=lambda h: (-rooms[h.name], h.name))
        if not holders:
            plan.unplaced = {n: f"no live host holds snapshot '{req.snapshot}'" for n in req.names}
            return plan
        chosen = [h.name for h in holders if rooms[h.name] > 0]
        need = len(req.names) - sum(rooms[h] for h in chosen)
        others = sorted((h for h in hosts if req.snapshot not in h.snapshots and rooms[h.name] > 0),
                        key=lambda h: (-rooms[h.name], h.name))
        sent = {h.name: 0 for h in holders}
        for h in others:
            if need <= 0:
                break
            src = min(sent, key=lambda s: (sent[s], s))
            sent[src] += 1
            plan.replicate[h.name] = src
            chosen.append(h.name)
            need -= rooms[h.name]
        left = dict((h, rooms[h]) for h in chosen)
        names = list(req.names)
        while names and any(left.values()):
            for c in chosen:
                if names and left[c] > 0:
                    plan.assign.setdefault(c, []).append(names.pop(0))
                    left[c] -= 1
        for n in names:
            plan.unplaced[n] = "no live host has room for it (instances per host, free memory or disk)"
        return plan
