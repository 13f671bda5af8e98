"""Which QEMU runs a guest (``hypervisor.qemu_bin``) and how it maps a shared template:
fake QEMU binaries (shell scripts answering ``--version``) in dpkg -x style trees."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfork.hypervisor import qemu_bin
from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.qemu import QemuHypervisor


def fake_qemu(root: Path, version: str, *, share: bool = True) -> str:
    """A ``<root>/usr/bin/qemu-system-x86_64`` that says it is ``version``."""
    b = root / "usr" / "bin" / qemu_bin.BINARY
    b.parent.mkdir(parents=True)
    b.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n")
    b.chmod(0o755)
    if share:
        (root / "usr" / "share" / "qemu").mkdir(parents=True)
    return str(b)


@pytest.fixture()
def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """QEMU 10 in the tools dir, 7.2 on PATH (and nothing else)."""
    monkeypatch.setattr(qemu_bin, "TOOLS_QEMU", tmp_path / "tools")
    q10 = fake_qemu(tmp_path / "tools", "10.0.2")
    q7 = fake_qemu(tmp_path / "sys", "7.2.22", share=False)
    monkeypatch.setenv("PATH", str(Path(q7).parent))
    monkeypatch.delenv(qemu_bin.ENV_BINARY, raising=False)
    qemu_bin._version.cache_clear()  # versions are cached by name: PATH's is a fake here
    yield q10, q7
    qemu_bin._version.cache_clear()


def test_versions() -> None:
    assert qemu_bin.version_tuple("10.0.2") == (10, 0, 2)
    assert qemu_bin.version_tuple("7.2.22") == (7, 2, 22)
    assert qemu_bin.version_tuple("8.2.0-rc1") == (8, 2, 0)
    assert qemu_bin.version_tuple("") == ()
    assert qemu_bin.version_tuple("10.0.2") >= qemu_bin.READONLY_RAM > qemu_bin.version_tuple("7.2.22")


def test_tools_qemu_is_the_default_then_env(two: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    q10, q7 = two
    assert qemu_bin.default_binary() == q10
    assert QemuHypervisor().version() == "10.0.2"
    assert qemu_bin.readonly_ram(q10) and not qemu_bin.readonly_ram(q7)
    monkeypatch.setenv(qemu_bin.ENV_BINARY, q7)
    assert qemu_bin.default_binary() == q7
    os.unlink(q10)
    monkeypatch.delenv(qemu_bin.ENV_BINARY)
    assert qemu_bin.default_binary() == qemu_bin.BINARY  # PATH's


def test_firmware_dir_only_outside_usr(two: tuple[str, str]) -> None:
    q10, q7 = two
    assert qemu_bin.data_args(q10) == ["-L", str(Path(q10).parents[1] / "share" / "qemu")]
    assert qemu_bin.data_args(q7) == []  # no share/qemu beside it
    assert qemu_bin.data_dir("/usr/bin/true") is None


def test_a_snapshot_is_restored_by_the_qemu_that_wrote_it(two: tuple[str, str]) -> None:
    q10, _ = two
    hv = QemuHypervisor()
    cfg = VMConfig(hypervisor="qemu", memory_mib=256, vcpus=1, accel="tcg", image_digest="x", cmdline="")
    assert hv.binary_for(cfg) == q10  # no version recorded: the default
    cfg.vmm_version = "7.2.22"
    assert hv.binary_for(cfg) == qemu_bin.BINARY  # PATH's 7.2
    hv.check_snapshot_compat(cfg, "old")
    assert not hv.readonly_template("7.2.22") and hv.readonly_template("10.0.2")
    cfg.vmm_version = "9.9.9"
    from vmfork.errors import HypervisorError, WrongState

    with pytest.raises(WrongState, match=r"9\.9\.9"):
        hv.check_snapshot_compat(cfg, "odd")
    with pytest.raises(HypervisorError, match=r"no installed QEMU is version 9\.9\.9"):
        hv.binary_for(cfg)


def test_template_backing(two: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU 10 maps the template readonly=on,rom=off, confined or not; 7.2 only unconfined,
    read-write (it cannot open it read-only)."""
    from vmfork import confine

    template = tmp_path / "template"
    template.write_bytes(bytes(1 << 20))
    cfg = VMConfig(hypervisor="qemu", memory_mib=1, vcpus=1, accel="tcg", image_digest="x", cmdline="",
                   template=str(template))

    def backing(version: str) -> str:
        cfg.vmm_version = version
        return str(QemuHypervisor()._template(cfg))

    monkeypatch.setattr(confine, "enabled", lambda: True)
    assert backing("10.0.2") == str(template)
    assert backing("7.2.22") == "None"  # confined 7.2: its own clone
    monkeypatch.setattr(confine, "enabled", lambda: False)
    assert backing("7.2.22") == str(template)
    monkeypatch.setenv("VMFORK_SHARED_RAM", "0")
    assert backing("10.0.2") == "None"
