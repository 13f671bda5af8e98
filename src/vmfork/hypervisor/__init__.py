"""Hypervisor backends behind one small interface (see base.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmfork.errors import HypervisorError, InvalidArgument
from vmfork.hypervisor.base import Capabilities, Hypervisor, VMConfig

if TYPE_CHECKING:
    from vmfork.images import Image

BACKENDS = ("qemu", "firecracker")


def get_hypervisor(name: str) -> Hypervisor:
    if name == "qemu":
        from vmfork.hypervisor.qemu import QemuHypervisor

        return QemuHypervisor()
    if name == "firecracker":
        try:
            from vmfork.hypervisor.firecracker import FirecrackerHypervisor  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise HypervisorError("the firecracker backend is not available in this build") from None
        hv: Hypervisor = FirecrackerHypervisor()
        return hv
    raise InvalidArgument(f"invalid hypervisor '{name}': use one of {', '.join(BACKENDS)}")


def resolve_accel(hv: Hypervisor, image: Image, requested: str,
                  progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Return (accel, why). ``auto`` probes KVM once (cached) and falls back to TCG."""
    from vmfork.hypervisor.accel import kvm_device_problem, probe_kvm

    if hv.name == "firecracker":
        problem = kvm_device_problem()
        if problem or requested == "tcg":
            raise HypervisorError(f"firecracker needs a working KVM: {problem or 'TCG was requested'}")
        from vmfork.hypervisor.fc_probe import cached, probe_userspace

        if progress and cached(hv.version(), image) is None:
            progress("checking whether a guest reaches userspace under Firecracker (a boot probe, cached)")
        fc_probe = probe_userspace(getattr(hv, "binary", "firecracker"), hv.version(), image)
        if not fc_probe.works:
            raise HypervisorError(f"firecracker cannot run a guest on this host: {fc_probe.reason} "
                                  "(see 'vmfork doctor')")
        return "kvm", "firecracker always uses KVM"
    if requested == "tcg":
        return "tcg", "forced with --accel tcg"
    if requested == "kvm":
        problem = kvm_device_problem()
        if problem:
            raise HypervisorError(f"--accel kvm: {problem}")
        return "kvm", "forced with --accel kvm"
    if progress:
        progress("checking whether KVM works here (cached after the first time)")
    probe = probe_kvm(getattr(hv, "binary", "qemu-system-x86_64"), hv.version(), image)
    return ("kvm", probe.reason) if probe.kvm_works else ("tcg", f"KVM not usable: {probe.reason}")


__all__ = ["BACKENDS", "Capabilities", "Hypervisor", "VMConfig", "get_hypervisor", "resolve_accel"]
