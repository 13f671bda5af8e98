"""Which accelerator works here: KVM only if a probe boot reaches the guest's init.

``/dev/kvm`` existing is not enough: on these machines it is a PVM-style KVM on which a
stock kernel hangs. The probe boots the image's kernel with ``vmfork.probe=1`` (the guest
init prints ``VMFORK-PROBE-OK`` and powers off) under ``-accel kvm`` with a timeout. The
answer is cached per host kernel + QEMU version + guest kernel.
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

from vmfork.images import Image
from vmfork.paths import cache_dir
from vmfork.util import atomic_write_json

MARKER = b"VMFORK-PROBE-OK"


@dataclass
class AccelProbe:
    kvm_works: bool
    reason: str
    seconds: float
    key: str


def kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def _probe_key(qemu_version: str, image: Image) -> str:
    return f"host={platform.release()} qemu={qemu_version} guest={image.kernel_version}"


def probe_kvm(binary: str, qemu_version: str, image: Image, timeout: float | None = None,
              use_cache: bool = True) -> AccelProbe:
    key = _probe_key(qemu_version, image)
    cache = cache_dir() / "accel-probe.json"
    if use_cache:
        try:
            d = json.loads(cache.read_text())
            if d.get("key") == key:
                return AccelProbe(**d)
        except (OSError, ValueError, TypeError):
            pass
    problem = kvm_device_problem()
    if problem:
        return AccelProbe(False, problem, 0.0, key)  # not cached: the device may appear later
    timeout = timeout if timeout is not None else float(os.environ.get("VMFORK_KVM_PROBE_TIMEOUT", "8"))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmfork-kvmprobe-") as tmp:
        console = Path(tmp) / "console"
        console.touch()
        from vmfork.hypervisor.qemu_bin import data_args

        argv = [binary, *data_args(binary), "-accel", "kvm", "-cpu", "host", "-no-user-config", "-nodefaults",
                "-display", "none", "-no-reboot", "-m", "128M",
                "-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on",
                "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs),
                "-append", "console=ttyS0 panic=-1 vmfork.probe=1",
                "-serial", f"file:{console}"]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        ok = False
        reason = ""
        try:
            while time.monotonic() - t0 < timeout:
                if MARKER in console.read_bytes():
                    ok = True
                    break
                if p.poll() is not None:
                    err = (p.stderr.read() if p.stderr else b"").decode(errors="replace").strip()
                    first = err.splitlines()[0] if err else "no message"
                    reason = f"QEMU exited under -accel kvm: {first.removeprefix(binary + ': ').removeprefix(os.path.basename(binary) + ': ')}"
                    break
                time.sleep(0.05)
            else:
                reason = f"a probe boot under -accel kvm did not reach the guest init within {timeout:.0f}s (KVM present but not usable)"
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stderr:
                p.stderr.close()
    result = AccelProbe(ok, "probe boot reached the guest init under KVM" if ok else reason,
                        round(time.monotonic() - t0, 3), key)
    atomic_write_json(cache, asdict(result), durable=False)
    return result
