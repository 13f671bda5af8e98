"""``vmfork doctor``: what this host can do, checked rather than assumed."""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmfork.paths import DataDir, cache_dir


def _latest_image(images: Path) -> Any:
    from vmfork.images import list_images

    built = list_images(images)
    return built[0] if built else None


def _firecracker(add: Callable[[str, str, str], None], img: Any, progress: Callable[[str], None]) -> None:
    """The binary (where from, version, supported?) and a real boot probe: does a guest reach
    userspace under it here? (fc_probe.py; cached)"""
    from vmfork.hypervisor.fc_probe import cached, probe_userspace
    from vmfork.hypervisor.firecracker import FirecrackerHypervisor
    from vmfork.hypervisor.firecracker_api import SUPPORTED

    fc = FirecrackerHypervisor()
    problem = fc.available()
    if problem:
        add("firecracker", "warn", f"{problem} (--hypervisor firecracker cannot run here)")
        return
    add("firecracker", "ok", f"{fc.binary} (from {fc.source}) v{fc.version()}: in the supported range {SUPPORTED}")
    if img is None:
        add("firecracker probe", "warn", "no guest image built yet (run 'vmfork image build'); not probed")
        return
    if cached(fc.version(), img) is None:
        progress("probing Firecracker with a real boot: does a guest reach userspace? (cached; up to 3 min)")
    p = probe_userspace(fc.binary, fc.version(), img)
    add("firecracker probe", "ok" if p.works else "warn",
        p.reason if p.works else f"a guest cannot reach userspace under Firecracker on this host: {p.reason}")


def run_checks(data_dir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    from vmfork.fs import filesystem_type, reflink_supported
    from vmfork.hypervisor.accel import kvm_device_problem, probe_kvm
    from vmfork.hypervisor.qemu import QemuHypervisor

    checks: list[dict[str, str]] = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"name": name, "status": status, "detail": detail})

    dd = DataDir(data_dir)  # checked, never created: doctor only looks
    exists = dd.exists()
    add("host", "info", f"{platform.system()} {platform.release()} {platform.machine()}")
    qemu = QemuHypervisor()
    problem = qemu.available()
    if problem:
        add("qemu", "fail", problem)
    else:
        from vmfork.hypervisor import qemu_bin

        ro = "opens a fork's shared template read-only" if qemu_bin.readonly_ram(qemu.binary) else (
            "opens a fork's template read-write: confined forks map their own clones (QEMU >= 8.2 "
            "needed; make setup installs 10.0.2 into .tools/qemu)")
        add("qemu", "ok", f"{shutil.which(qemu.binary)} {qemu.version()}: {ro}")
    kvm = kvm_device_problem()
    add("/dev/kvm", "warn" if kvm else "ok", kvm or "present and accessible")
    accel = "tcg"
    img = _latest_image(dd.images)
    if img is None:
        add("image", "warn", "no guest image built yet (run 'vmfork image build'); KVM not probed")
    else:
        add("image", "ok", f"{img.digest} kernel {img.kernel_version}")
        if not problem:
            progress("probing KVM with a real boot (cached)")
            p = probe_kvm(qemu.binary, qemu.version(), img)
            accel = "kvm" if p.kvm_works else "tcg"
            add("kvm probe", "ok" if p.kvm_works else "warn", p.reason)
    add("accel", "info", f"'--accel auto' uses {accel}")
    probe = dd.root if exists else next(p for p in dd.root.parents if p.is_dir())
    fs = filesystem_type(probe)
    reflink = reflink_supported(probe)  # its scratch files are removed
    add("data dir", "info", f"{dd.root} on {fs}" if exists else
        f"{dd.root} does not exist yet (the first 'vmfork run' creates it); {probe} is on {fs}")
    add("copy-on-write", "ok" if reflink else "warn",
        "FICLONE reflink works: forks share the source's blocks"
        if reflink else f"no reflink on {fs}: forks use a sparse copy (data is copied, holes kept)")
    _firecracker(add, img, progress)
    for tool in ("busybox", "mkfs.ext4", "cpio", "dpkg-deb", "apt-get", "lz4"):
        path = shutil.which(tool)
        add(tool, "ok" if path else "fail", path or "missing: run 'make setup'")
    cc = shutil.which("musl-gcc") or shutil.which("gcc")
    add("C compiler", "ok" if cc else "fail", cc or "missing (musl-tools or gcc): run 'make setup'")
    from vmfork.confine.doctor import checks as confine_checks

    for name, status, detail in confine_checks(probe, None if problem else qemu.binary):  # scratch files removed
        add(name, status, detail)
    from vmfork.network import doctor_checks as network_checks

    for name, status, detail in network_checks():
        add(name, status, detail)
    add("cache dir", "info", str(cache_dir()))
    return {"checks": checks, "accel": accel, "reflink": reflink, "filesystem": fs,
            "data_dir": str(dd.root)}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_checks(Path("."), print), indent=2))
