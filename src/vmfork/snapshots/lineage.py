"""Lineage (``vmfork tree``): instances and snapshots as one tree.

An instance hangs under the instance or snapshot it was forked from; a snapshot under the
instance it was taken of. An ancestor that was removed stays in the tree, marked deleted
(its name is known from what was made of it), so a fork of a deleted template still shows
where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Node:
    kind: str  # instance, snapshot
    id: str
    name: str
    parent: tuple[str, str, str] | None = None  # (kind, id, name) of what it came from
    deleted: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "name": self.name, "deleted": self.deleted,
                **self.info, "children": [c.to_json() for c in self.children]}


def build(nodes: list[Node]) -> list[Node]:
    """Link ``nodes`` by their ``parent``; missing parents become deleted nodes. Returns the roots."""
    by_key = {(n.kind, n.id): n for n in nodes}
    order = list(nodes)
    i = 0
    while i < len(order):  # deleted ancestors are added as they are found
        n = order[i]
        i += 1
        if n.parent is None:
            continue
        kind, pid, pname = n.parent
        if (kind, pid) not in by_key:
            ghost = Node(kind, pid, pname, deleted=True)
            by_key[(kind, pid)] = ghost
            order.append(ghost)
    roots = []
    for n in order:
        p = by_key.get((n.parent[0], n.parent[1])) if n.parent else None
        if p is None or p is n:
            roots.append(n)
        else:
            p.children.append(n)
    return _without_dead_leaves(roots)


def _without_dead_leaves(nodes: list[Node]) -> list[Node]:
    """A deleted node stays only while something made from it is still there."""
    out = []
    for n in nodes:
        n.children = _without_dead_leaves(n.children)
        if not n.deleted or n.children:
            out.append(n)
    return out


def render(roots: list[Node]) -> list[str]:
    """Text lines, one per node, drawn as a tree."""
    lines: list[str] = []

    def label(n: Node) -> str:
        what = "snapshot " if n.kind == "snapshot" else ""
        extra = " (deleted)" if n.deleted else f"  [{n.info['state']}]" if "state" in n.info else ""
        return f"{what}{n.name}{extra}"

    def walk(n: Node, prefix: str, last: bool, top: bool) -> None:
        lines.append(label(n) if top else f"{prefix}{'└── ' if last else '├── '}{label(n)}")
        sub = prefix if top else prefix + ("    " if last else "│   ")
        for k, c in enumerate(n.children):
            walk(c, sub, k == len(n.children) - 1, False)

    for r in roots:
        walk(r, "", True, True)
    return lines
