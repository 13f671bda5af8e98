"""The QEMU command line: a restore leaves out what only a cold boot reads."""

from __future__ import annotations

from pathlib import Path

from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.qemu import QemuHypervisor
from vmfork.images import Image


def _argv(incoming: bool) -> list[str]:
    cfg = VMConfig(hypervisor="qemu", memory_mib=256, vcpus=1, accel="tcg", image_digest="d" * 64,
                   cmdline="console=ttyS0 vmfork.hostname=a", id="abc")
    image = Image(digest="d" * 64, dir=Path("/images/dddd"), kernel_version="6.1", manifest={})
    return QemuHypervisor(binary="qemu-system-x86_64").argv(cfg, image, incoming=incoming)


def test_boot_passes_kernel_initramfs_and_cmdline() -> None:
    argv = _argv(incoming=False)
    assert argv[argv.index("-kernel") + 1].endswith("vmlinux")
    assert "-initrd" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 vmfork.hostname=a"
    assert "-incoming" not in argv


def test_restore_leaves_them_out_and_waits_for_the_state() -> None:
    # A restored guest's kernel is in its RAM; QEMU kept a private mapping of vmlinux (2 MiB
    # touched) in every fork for nothing.
    argv = _argv(incoming=True)
    for opt in ("-kernel", "-initrd", "-append"):
        assert opt not in argv
    assert argv[-3:] == ["-S", "-incoming", "defer"]
    assert _argv(incoming=False)[:3] == argv[:3]  # same VMM, same name
