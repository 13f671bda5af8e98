"""Copy-on-write cloning of guest directories (reflink, else sparse copy)."""

from vmfork.forkvm.copier import (
    CopyError,
    CopyMode,
    CopyStats,
    SkipFn,
    clone_file,
    clone_tree,
    default_skip,
    sparse_copy_file,
)

__all__ = [
    "CopyError",
    "CopyMode",
    "CopyStats",
    "SkipFn",
    "clone_file",
    "clone_tree",
    "default_skip",
    "sparse_copy_file",
]
