"""The guest kernel built from Debian's source package: its recipe (config fragment,
module list, cache key), the checks on the resulting config, and the choice between it
and Debian's cloud kernel (VMFORK_KERNEL)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmfork.errors import ImageError
from vmfork.images import build
from vmfork.images import kernel as kern
from vmfork.images import kernel_build as kb


def fragment_values() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in kb.FRAGMENT.read_text().splitlines():
        if m := re.match(r"^(CONFIG_\w+)=(.*)$", line):
            out[m.group(1)] = m.group(2)
        elif m := re.match(r"^# (CONFIG_\w+) is not set$", line):
            out[m.group(1)] = "n"
        else:
            assert line == "" or line.startswith("# "), f"not a config line: {line!r}"
    return out


def test_fragment_builds_in_what_the_guest_needs() -> None:
    v = fragment_values()
    assert v["CONFIG_MODULES"] == "n"
    for sym in build.REQUIRED_BUILTIN:
        assert v[sym] == "y", sym
    for _name, sym in (*build.MODULES, *build.LAZY_MODULES):
        if sym.startswith("CONFIG_VIRTIO_PCI"):
            continue
        if sym == "CONFIG_VIRTIO_VSOCKETS_COMMON":  # selected by CONFIG_VIRTIO_VSOCKETS
            continue
        assert v.get(sym) == "y", f"{sym} is not built in by the fragment"
    assert v["CONFIG_PCI"] == "n"


def test_modules_list_names_the_debian_modules_in_use() -> None:
    mods = {ln.strip() for ln in kb.MODULES_LIST.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    wanted = {name for name, sym in (*build.MODULES, *build.LAZY_MODULES)
              if not sym.startswith("CONFIG_VIRTIO_PCI") and name != "ext4"}
    assert wanted <= mods


def test_check_fragment_reports_drift(tmp_path: Path) -> None:
    frag = tmp_path / "frag"
    frag.write_text("# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n")
    good = tmp_path / "good"
    good.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\nCONFIG_D=y\n")
    assert kb.check_fragment(good, frag) == []
    bad = tmp_path / "bad"
    bad.write_text("CONFIG_B=y\nCONFIG_C=\"y\"\n")
    drift = kb.check_fragment(bad, frag)
    assert len(drift) == 3
    assert "CONFIG_A=y (got not set)" in drift[0]
    assert "CONFIG_B=y" in drift[1]


def test_builtin_modules() -> None:
    conf = {sym: "y" for _n, sym in (*build.MODULES, *build.LAZY_MODULES)}
    ms = build.builtin_modules(conf)
    assert ms.order == [] and ms.files == {} and ms.lazy == {}
    assert "erofs" in ms.builtin and "virtio_blk" in ms.builtin
    no_pci = {k: v for k, v in conf.items() if not k.startswith("CONFIG_VIRTIO_PCI")}
    assert "virtio_pci" not in build.builtin_modules(no_pci).builtin
    with pytest.raises(ImageError, match="CONFIG_VIRTIO_PCI"):
        build.builtin_modules({**no_pci, "CONFIG_PCI": "y"})
    with pytest.raises(ImageError, match=r"CONFIG_EROFS_FS \(erofs\)"):
        build.builtin_modules({**conf, "CONFIG_EROFS_FS": "m"})


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFORK_KERNEL", raising=False)
    assert build.kernel_choice() == build.DEFAULT_KERNEL
    monkeypatch.setenv("VMFORK_KERNEL", " Debian ")
    assert build.kernel_choice() == "debian"
    monkeypatch.setenv("VMFORK_KERNEL", "tiny")
    with pytest.raises(ImageError, match="VMFORK_KERNEL='tiny' is not one of: source, debian"):
        build.kernel_choice()


def test_recipe_key_follows_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = kb.recipe_key()
    assert key == kb.recipe_key()
    frag = tmp_path / "config.fragment"
    frag.write_text(kb.FRAGMENT.read_text() + "# CONFIG_EXTRA is not set\n")
    monkeypatch.setattr(kb, "FRAGMENT", frag)
    assert kb.recipe_key() != key


def test_image_digest_differs_by_kernel() -> None:
    local = build.LocalInputs("1", "a" * 64, {})
    debian = build.Inputs(local, kb.BASE)
    source = build.Inputs(local, kb.BASE, kb.recipe_key())
    assert debian.digest != source.digest
    assert kb.SOURCE.deb_name == "linux-source-6.1_6.1.192-3_all.deb"
    assert kern.KernelPackage("x", "1:2", "s", "f").deb_name == "x_1%3a2_amd64.deb"


def test_cached_kernel_matches_its_recipe() -> None:
    """The real built kernel, when this machine has built it."""
    built = kb.load_cached()
    if built is None:
        pytest.skip("no guest kernel built from source in the cache (built by the first image build)")
    assert kb.check_fragment(built.config) == []
    build.builtin_modules(build.parse_kconfig(built.config))
    with open(built.vmlinux, "rb") as f:
        assert kern.has_pvh_note(f.read())


def test_qemu_boots_the_source_kernel_without_acpi(tmp_path: Path) -> None:
    """The source kernel has no PCI, so ACPI cannot load microvm's tables: its machine gets
    acpi=off (virtio-mmio devices on the command line, MP table); Debian's keeps ACPI."""
    from vmfork.hypervisor.base import VMConfig
    from vmfork.hypervisor.qemu import QemuHypervisor
    from vmfork.images import Image

    cfg = VMConfig("qemu", 256, 1, "tcg", "d" * 64, "console=ttyS0")
    for kernel, acpi_off in (("source", True), ("debian", False), (None, False)):
        im = Image("d" * 64, tmp_path, "k", {"kernel": kernel} if kernel else {})
        argv = QemuHypervisor("qemu-system-x86_64").argv(cfg, im)
        machine = argv[argv.index("-M") + 1]
        assert machine.startswith("microvm,")
        assert ("acpi=off" in machine.split(",")) == acpi_off, (kernel, machine)
