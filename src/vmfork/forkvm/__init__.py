"""Copy-on-write cloning of guest directories (reflink, else sparse copy)."""

from vmfork.forkvm.copier import (
    FICLONE,
    CopyError,
    CopyMode,
    CopyStats,
    SkipFn,
    allocated_bytes,
    clone_file,
    clone_tree,
    default_skip,
    filesystem_type,
    reflink_supported,
    sparse_copy_file,
)

__all__ = [
    "FICLONE",
    "CopyError",
    "CopyMode",
    "CopyStats",
    "SkipFn",
    "allocated_bytes",
    "clone_file",
    "clone_tree",
    "default_skip",
    "filesystem_type",
    "reflink_supported",
    "sparse_copy_file",
]
