"""Admission control: start a guest only if the filesystem can hold all the RAM it can claim.

The rule (also in ``vmfork.space``): let ``claim(g)`` be what guest ``g`` can still make
the filesystem allocate for its RAM, i.e. its RAM size minus the bytes of its mem-file
that are allocated and owned by that file alone (shared, reflinked extents do not count:
writing them allocates a copy). Starting guests ``new`` is admitted when

    free space  >=  sum(claim(g) for g in new)
                  + sum(claim(g) for every other guest running on this filesystem)
                  + the watchdog's low-water mark

so that, with every guest writing all its RAM, the watchdog never has to act. Per case:
a fresh boot (``run``, ``start``) claims its whole RAM; a restore claims its RAM minus the
blocks its snapshot's mem-file owns; a fork to running claims its whole RAM (on XFS its
mem-file shares every extent; on ext4 the copy itself uses the space its own blocks hold);
a fork of a running source also raises the source's claim to its whole RAM (its mem-file
now shares its extents with the fork; counted so on every filesystem, which over-counts
on ext4 by what the source owns). Blocks still in the page cache (delayed allocation) are
reserved and count as allocated. Only the guests of this data dir are known; other users
of the filesystem are not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import NoSpace
from vmfork.fs import extent_stats, filesystem_type, free_bytes
from vmfork.space.watermarks import fmt, low_water


@dataclass(frozen=True)
class Claim:
    """What one guest can still make the filesystem allocate for its RAM."""

    name: str
    ram_bytes: int
    claim_bytes: int


def ram_claim(name: str, ram_bytes: int, mem_file: Path | None) -> Claim:
    """The claim of a guest with ``ram_bytes`` of RAM in ``mem_file`` (None or missing:
    fresh RAM, all of it can be claimed)."""
    if mem_file is None:
        return Claim(name, ram_bytes, ram_bytes)
    try:
        st = os.stat(mem_file)
    except FileNotFoundError:
        return Claim(name, ram_bytes, ram_bytes)
    try:
        own = extent_stats(mem_file, sync=False).exclusive_bytes
    except OSError:  # no FIEMAP (tmpfs, ...): no sharing there either
        own = st.st_blocks * 512
    return Claim(name, ram_bytes, max(0, ram_bytes - own))


def check(what: str, new: list[Claim], running: list[Claim], where: Path, *, overcommit: bool = False) -> None:
    """Raise NoSpace unless the free space on ``where``'s filesystem covers the claims of
    ``new`` and ``running`` plus the low-water mark (nothing is checked with ``overcommit``)."""
    if overcommit:
        return
    free = free_bytes(where)
    mine = sum(c.claim_bytes for c in new)
    others = sum(c.claim_bytes for c in running)
    reserve = low_water()
    if free >= mine + others + reserve:
        return
    ram = sum(c.ram_bytes for c in new)
    parts = [f"its {fmt(ram)} of guest RAM can still claim {fmt(mine)}"]
    if others:
        parts.append(f"{len(running)} running guest{'s' if len(running) != 1 else ''} "
                     f"on this filesystem can claim {fmt(others)} more")
    parts.append(f"the watchdog keeps {fmt(reserve)} free")
    raise NoSpace(f"not enough space for {what}: {fmt(free)} free on {where} ({filesystem_type(where)}), "
                  f"but {', '.join(parts)}; free some space or use --overcommit")
