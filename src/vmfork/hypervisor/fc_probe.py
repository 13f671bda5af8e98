"""Can a guest reach userspace under this Firecracker on this host? A real, short boot probe.

Like the QEMU KVM probe (accel.py), and for the same reason: ``/dev/kvm`` existing, and even
Firecracker's ``InstanceStart`` succeeding, say nothing about whether a guest runs. On a
PVM-style KVM the guest kernel runs for a while and then the VMM stops with
``KVM_EXIT_INTERNAL_ERROR``. The probe boots the image's kernel with ``vmfork.probe=1`` (the
guest init prints ``VMFORK-PROBE-OK`` and powers off), through the backend's own request
shapes, and waits for the marker, for the VMM to stop (its own last error lines are the
reason), or for the timeout. The answer is cached per host kernel + Firecracker version +
guest kernel.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmfork import retry
from vmfork.errors import HypervisorError
from vmfork.hypervisor.accel import MARKER, kvm_device_problem
from vmfork.hypervisor.firecracker_api import FirecrackerAPI, FirecrackerUnreachable
from vmfork.images import Image
from vmfork.paths import cache_dir
from vmfork.util import atomic_write_json

CACHE = "firecracker-probe.json"
DEFAULT_TIMEOUT = 180.0  # the Debian kernel dies 35-95 s (by load) into a boot on a PVM-style KVM


@dataclass
class UserspaceProbe:
    works: bool
    reason: str
    seconds: float
    key: str


def probe_key(fc_version: str, image: Image) -> str:
    return f"host={platform.release()} firecracker={fc_version} guest={image.kernel_version}"


def cached(fc_version: str, image: Image) -> UserspaceProbe | None:
    try:
        d = json.loads((cache_dir() / CACHE).read_text())
        probe = UserspaceProbe(**d)
    except (OSError, ValueError, TypeError):
        return None
    return probe if probe.key == probe_key(fc_version, image) else None


def probe_userspace(binary: str, fc_version: str, image: Image, timeout: float | None = None,
                    use_cache: bool = True) -> UserspaceProbe:
    key = probe_key(fc_version, image)
    if use_cache:
        hit = cached(fc_version, image)
        if hit is not None:
            return hit
    problem = kvm_device_problem()
    if problem:
        return UserspaceProbe(False, problem, 0.0, key)  # not cached: the device may appear later
    timeout = timeout if timeout is not None else float(os.environ.get("VMFORK_FC_PROBE_TIMEOUT", DEFAULT_TIMEOUT))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmfork-fcprobe-") as tmp:
        works, reason = _boot(binary, image, Path(tmp), timeout)
    result = UserspaceProbe(works, reason, round(time.monotonic() - t0, 3), key)
    atomic_write_json(cache_dir() / CACHE, asdict(result), durable=False)
    return result


def _boot(binary: str, image: Image, d: Path, timeout: float) -> tuple[bool, str]:
    from vmfork.hypervisor.firecracker import vmm_error_lines

    log, console = d / "vmm.log", d / "console.log"
    console.touch()
    with open(log, "ab") as out:
        out.write(b"--- probe\n")
        out.flush()
        p = subprocess.Popen([binary, "--api-sock", "fc.sock", "--id", "vmfork-probe"], cwd=d,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    t0 = time.monotonic()
    try:
        api = FirecrackerAPI(str(d / "fc.sock"))
        with api:
            for _ in retry.attempts(10.0):
                if p.poll() is not None:
                    return False, f"Firecracker exited at once: {vmm_error_lines(log)}"
                try:
                    dialect = api.negotiate()
                    break
                except FirecrackerUnreachable:
                    continue
            else:
                return False, "Firecracker's API socket did not answer within 10s"
            try:
                if dialect.serial_endpoint:
                    api.put_serial(serial_out_path=str(console))
                api.put_boot_source(str(image.vmlinux), initrd_path=str(image.initramfs),
                                    boot_args="console=ttyS0 reboot=k panic=-1 pci=off vmfork.probe=1")
                api.put_machine_config(vcpu_count=1, mem_size_mib=128)
                api.instance_start()
            except HypervisorError as e:
                return False, f"Firecracker refused the probe boot: {e}"
        while time.monotonic() - t0 < timeout:
            if MARKER in console.read_bytes() or MARKER in log.read_bytes():  # before v1.14: stdout
                return True, f"a probe boot reached the guest's userspace in {time.monotonic() - t0:.1f}s"
            if p.poll() is not None:
                return False, (f"the VMM stopped {time.monotonic() - t0:.0f}s into a probe boot, before the "
                               f"guest reached userspace: {vmm_error_lines(log)}")
            time.sleep(0.1)
        return False, f"a probe boot did not reach the guest's userspace within {timeout:.0f}s (the VMM still ran)"
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
