"""The pieces of a standby's commit that make it cost what the guest dirtied: the fsyncs
issued together, the page-cache drop, and the refusal of a device-state-only save of a VMM
whose RAM is a private mapping (on this very process)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from vmfork import util
from vmfork.bench.probes import cache_stat
from vmfork.errors import HypervisorError
from vmfork.hypervisor import shared_ram

MiB = 1 << 20


def _stat(path: Path) -> tuple[int, int]:
    st = cache_stat(path)
    if st is None:
        pytest.skip("cachestat(2) is not available (Linux < 6.5): the page cache cannot be read")
    return st


def _dirty_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib * 256):  # 4 KiB writes
            f.write(os.urandom(16) * 256)


def test_fsync_together_makes_all_durable_and_raises_the_error(tmp_path: Path) -> None:
    files = [tmp_path / f"f{i}" for i in range(4)]
    for p in files:
        _dirty_file(p, 1)
    util.fsync_together([*files, tmp_path])
    assert [_stat(p)[1] for p in files] == [0] * len(files)  # nothing dirty left
    with pytest.raises(FileNotFoundError):
        util.fsync_together([files[0], tmp_path / "missing", files[1]])
    util.fsync_together([files[2]])
    util.fsync_together([])


def test_drop_page_cache_drops_clean_pages_only(tmp_path: Path) -> None:
    f = tmp_path / "memory"
    _dirty_file(f, 2)
    cached, _ = _stat(f)
    if cached == 0:
        pytest.skip(f"{tmp_path} keeps no page cache")
    util.fsync_file(f)
    util.drop_page_cache(f)
    assert _stat(f)[0] < 256 * 1024  # clean and unmapped: gone (a few pages may be re-read)
    util.drop_page_cache(tmp_path / "missing")  # best effort: no error


@pytest.mark.parametrize("flags", [mmap.MAP_PRIVATE, mmap.MAP_SHARED])
def test_a_private_ram_mapping_not_found_as_the_template_is_refused(tmp_path: Path, flags: int) -> None:
    size = 3 * MiB + 5 * shared_ram.PAGE  # a size nothing else in this process maps
    ram = tmp_path / "other-file"
    ram.write_bytes(b"\0" * size)
    with open(ram, "r+b") as f:
        mm = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        if flags == mmap.MAP_PRIVATE:
            with pytest.raises(HypervisorError, match=f"private mapping of {ram}"):
                shared_ram.check_ram_not_private(os.getpid(), size)
        else:  # the guest's own file, shared: its RAM is in the file
            shared_ram.check_ram_not_private(os.getpid(), size)
        shared_ram.check_ram_not_private(os.getpid(), size + shared_ram.PAGE)  # no such mapping
    finally:
        mm.close()
