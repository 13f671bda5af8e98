"""Where vmfork keeps things: the data dir layout and the per-user cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> Path:
    env = os.environ.get("VMFORK_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vmfork"


def cache_dir() -> Path:
    """Per-user cache shared by all data dirs: downloaded .debs, KVM probe results."""
    env = os.environ.get("VMFORK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmfork"


@dataclass(frozen=True)
class DataDir:
    """The layout of one data dir.

    root/
      guests/<id>/            one instance (see instances.layout)
      guests/.tmp-<id>/       a fork or create under construction (removed at start-up)
      images/<digest>/        a built guest image (content-addressed)
      locks/                  lock files (never cloned with a guest)
    """

    root: Path

    @property
    def guests(self) -> Path:
        return self.root / "guests"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def ensure(self) -> DataDir:
        for p in (self.root, self.guests, self.images, self.locks):
            p.mkdir(parents=True, exist_ok=True)
        return self
