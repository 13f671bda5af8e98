"""``hypervisor.shared_ram`` on this very process: a real private file mapping, real pagemap."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from vmfork.errors import HypervisorError
from vmfork.hypervisor import shared_ram

PAGE = shared_ram.PAGE


def test_runs() -> None:
    assert shared_ram.runs([]) == []
    assert shared_ram.runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]


def test_own_pages_of_a_private_mapping_are_found_and_written_elsewhere(tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.write_bytes(bytes(range(256)) * (16 * PAGE // 256))
    size = 16 * PAGE
    with open(template, "r+b") as f:
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        for p in range(16):  # every page read: present, from the file
            assert mm[p * PAGE] == 0
        mm[3 * PAGE:3 * PAGE + 5] = b"fork!"
        mm[9 * PAGE] = 7
        m = shared_ram.mapping_of(os.getpid(), template, size)
        assert m is not None
        assert m.ino == template.stat().st_ino
        pages = shared_ram.private_pages(os.getpid(), m.start, size)
        assert pages == [3, 9]

        own = tmp_path / "own"
        own.write_bytes(template.read_bytes())  # the fork's clone: another inode
        written = shared_ram.write_private(shared_ram.PrivateRam(os.getpid(), m.start, pages), own, m)
        assert written == 2 * PAGE
        assert own.read_bytes() == bytes(mm)
        assert template.read_bytes() == bytes(range(256)) * (size // 256)  # never written

        with pytest.raises(HypervisorError, match="template"):
            shared_ram.write_private(shared_ram.PrivateRam(os.getpid(), m.start, pages), template, m)
        assert template.read_bytes() == bytes(range(256)) * (size // 256)
    finally:
        mm.close()


def test_no_mapping_of_a_file_not_mapped(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_bytes(bytes(PAGE))
    assert shared_ram.mapping_of(os.getpid(), f, PAGE) is None


def test_mode_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORK_SHARED_RAM", "yes")
    from vmfork.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="VMFORK_SHARED_RAM"):
        shared_ram.enabled(True)
    monkeypatch.setenv("VMFORK_SHARED_RAM", "0")
    assert not shared_ram.enabled(True)
    assert shared_ram.usable_template("/nonexistent", PAGE, readonly=True) is None
