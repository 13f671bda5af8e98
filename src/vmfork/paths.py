"""Where vmfork keeps things: the data dir layout and the per-user cache."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import VmforkError

#: Modes of what vmfork creates in a data dir: guest RAM, disks, snapshots, sockets and logs
#: are the guest's secrets (and a socket is a root shell in it), for the owner only.
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
#: The umask of vmfork and of the VMMs it starts (files QEMU creates: RAM, console, sockets).
PRIVATE_UMASK = 0o077


class DataDirError(VmforkError):
    """The data dir cannot be used (not a directory, not writable, read-only filesystem)."""


def _reason(root: Path, e: OSError) -> str:
    """Why ``root`` cannot be a data dir, from the error of a stat or mkdir there."""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        for p in (root, *root.parents):  # name the file in the way
            if p.exists() and not p.is_dir():
                return "not a directory" if p == root else f"'{p}' is not a directory"
        return "not a directory"
    text = os.strerror(e.errno) if e.errno else str(e)
    return text[:1].lower() + text[1:]


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

    def exists(self) -> bool:
        """Whether the data dir is there (read-only commands create nothing when it is not).

        Raises DataDirError when the path is there but is not a directory, or lies under a
        file."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise DataDirError(f"data dir '{self.root}': {_reason(self.root, e)}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise DataDirError(f"data dir '{self.root}': not a directory")
        return True

    def ensure(self) -> DataDir:
        """Create the data dir (mode 0700, as its parts) or tighten it; check it is writable.

        Every failure is one DataDirError line naming the data dir (a file in the way,
        a read-only filesystem, no permission)."""
        self.exists()
        for p in (self.root, self.guests, self.images, self.locks):
            try:
                if p is self.root:
                    p.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)
                else:
                    p.mkdir(PRIVATE_DIR, exist_ok=True)
                if stat.S_IMODE(p.stat().st_mode) != PRIVATE_DIR:
                    os.chmod(p, PRIVATE_DIR)  # made by an older vmfork, or under another umask
            except OSError as e:
                where = "" if p is self.root else f" ({p.name}/)"
                raise DataDirError(f"data dir '{self.root}'{where}: {_reason(self.root, e)}") from None
        if not os.access(self.locks, os.W_OK):
            ro = os.statvfs(self.locks).f_flag & os.ST_RDONLY
            why = "read-only file system" if ro else "permission denied"
            raise DataDirError(f"data dir '{self.root}' is not writable: {why}")
        return self
