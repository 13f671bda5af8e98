"""Build the guest image, check its files, boot it once under QEMU (TCG) and drive
the guest agent through the host client."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmfork.errors import ImageError
from vmfork.guest import AgentClient, wait_ready
from vmfork.guest import protocol as proto
from vmfork.images import Image, ensure_image, image_inputs_digest, load_image
from vmfork.images.kernel import has_pvh_note

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
boots = pytest.mark.vm


# ------------------------------------------------------------------ the image


def fs_label(path: Path) -> str:
    out = subprocess.run(["e2label", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_manifest_and_files(image: Image) -> None:
    m = image.manifest
    assert m["digest"] == image.digest and image.dir.name == image.digest[:16]
    assert m["kernel_version"] == image.kernel_version
    assert len(m["deb"]["sha256"]) == 64
    assert m["busybox_version"]
    for name, info in m["files"].items():
        assert (image.dir / name).stat().st_size == info["size"]
    needed = {"virtio_mmio", "virtio_blk", "virtio_console", "overlay", "vsock", "erofs"}
    if m.get("kernel") == "source":  # built from Debian's source: no modules, all built in
        src = m["kernel_source"]
        assert src["package"] == "linux-source-6.1" and len(src["sha256"]) == 64 and src["recipe_key"]
        assert m["modules"] == [] and m["modules_lazy"] == {}
        assert needed <= set(m["modules_builtin"])
    else:
        assert image.kernel_version.endswith("-cloud-amd64")
        assert m["deb"]["name"].startswith(f"linux-image-{image.kernel_version}_")
        assert needed - {"erofs"} <= set(m["modules"])


def test_kernel_files(image: Image) -> None:
    elf = image.vmlinux.read_bytes()
    assert elf.startswith(b"\x7fELF") and has_pvh_note(elf)
    assert image.bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    assert image.initramfs.read_bytes()[:6] == b"070701"


def test_disks(image: Image) -> None:
    assert fs_label(image.rootfs) == "vmfork-root"
    assert fs_label(image.overlay_template) == "vmfork-data"
    st = image.overlay_template.stat()
    allocated = st.st_blocks * 512
    print(f"overlay template: {st.st_size >> 20} MiB, {allocated / 2**20:.2f} MiB allocated")
    assert st.st_size >= 1 << 30
    assert allocated < 20 << 20, "overlay template is not sparse"
    assert image.rootfs.stat().st_size < 64 << 20


def test_idempotent_and_load(image: Image) -> None:
    assert image_inputs_digest() == image.digest
    t0 = time.monotonic()
    again = ensure_image(image.dir.parent)
    warm = time.monotonic() - t0
    print(f"warm ensure_image: {warm * 1000:.0f} ms")
    assert again.dir == image.dir and again.digest == image.digest
    assert load_image(image.dir.parent, image.digest[:16]).dir == image.dir
    with pytest.raises(ImageError, match="not found"):
        load_image(image.dir.parent, "0" * 64)


# ------------------------------------------------------------------- one boot


def host_tsc_khz() -> int:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo")


@dataclass
class Booted:
    dir: Path
    agent_sock: Path
    proc: subprocess.Popen[bytes]
    boot_seconds: float

    def connect(self, timeout: float = 10.0) -> AgentClient:
        return AgentClient.connect_unix(self.agent_sock, timeout=timeout)

    def console(self) -> str:
        p = self.dir / "console.log"
        return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture(scope="module")
def vm(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    d = tmp_path_factory.mktemp("vm")
    disk = d / "disk.ext4"
    subprocess.run(["cp", "--sparse=always", str(image.overlay_template), str(disk)], check=True)
    append = f"console=ttyS0 tsc_early_khz={host_tsc_khz()} quiet vmfork.hostname=itest"
    argv = [
        qemu, "-accel", "tcg", "-no-user-config", "-nodefaults", "-display", "none",
        "-smp", "1", "-m", "256M",
        "-object", f"memory-backend-file,id=mem,size=256M,mem-path={d}/memory,share=on",
        "-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,memory-backend=mem"
              + (",acpi=off" if image.manifest.get("kernel") == "source" else ""),  # as vmfork boots it
        "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs), "-append", append,
        "-chardev", f"file,id=con,path={d}/console.log,append=on", "-serial", "chardev:con",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={d}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent",
        "-drive", f"file={image.rootfs},format=raw,if=none,id=root,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"file={disk},format=raw,if=none,id=data",
        "-device", "virtio-blk-device,drive=data",
        "-device", "virtio-rng-device",
    ]
    t0 = time.monotonic()
    with open(d / "qemu.err", "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        client = wait_ready(
            lambda: AgentClient.connect_unix(d / "agent.sock", timeout=1.0),
            60.0,
            alive=lambda: proc.poll() is None,
        )
        client.close()
        booted = Booted(d, d / "agent.sock", proc, time.monotonic() - t0)
        print(f"boot to agent ready: {booted.boot_seconds:.2f}s")
        yield booted
    except BaseException:
        print("console:\n" + (d / "console.log").read_text(errors="replace")
              if (d / "console.log").exists() else "no console log")
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@boots
def test_boot_time_and_console(vm: Booted) -> None:
    assert vm.boot_seconds < 30
    console = vm.console()
    assert "vmfork: guest ready" in console
    assert "vmfork-agent: serving on virtio-serial port" in console


@boots
def test_echo_and_stderr_exit_code(vm: Booted) -> None:
    with vm.connect() as c:
        r = c.exec(["echo", "hello", "world"])
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"hello world\n", b"")
        r = c.exec(["sh", "-c", "echo oops >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (3, b"", b"oops\n", False)


@boots
def test_guest_setup(vm: Booted) -> None:
    with vm.connect() as c:
        assert c.exec(["hostname"]).stdout == b"itest\n"
        mounts = c.exec(["cat", "/proc/mounts"]).stdout.decode()
        assert "overlay / overlay" in mounts
        assert "tmpfs /tmp tmpfs" in mounts and "tmpfs /run tmpfs" in mounts
        assert "vmfork-data" not in vm.console()  # the data disk was found (no tmpfs fallback)
        rng = c.exec(["cat", "/sys/class/misc/hw_random/rng_current"]).stdout
        assert rng.startswith(b"virtio_rng"), rng


@boots
def test_binary_output(vm: Booted) -> None:
    with vm.connect() as c:
        r = c.exec(["sh", "-c", "head -c 1000000 /dev/urandom > /tmp/rnd && sha256sum /tmp/rnd"])
        guest_sha = r.stdout.split()[0].decode()
        r = c.exec(["cat", "/tmp/rnd"])
        assert r.exit_code == 0 and len(r.stdout) == 1_000_000
        assert hashlib.sha256(r.stdout).hexdigest() == guest_sha
        r = c.exec(["head", "-c", "100000", "/dev/zero"])
        assert r.stdout == b"\0" * 100000


@boots
def test_timeout(vm: Booted) -> None:
    with vm.connect() as c:
        t0 = time.monotonic()
        r = c.exec(["sleep", "30"], timeout=1)
        assert r.timed_out and r.exit_code == 124
        assert time.monotonic() - t0 < 10


@boots
def test_stdin(vm: Booted) -> None:
    data = os.urandom(300_000)
    with vm.connect() as c:
        r = c.exec(["sha256sum"], stdin=data)
        assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        assert c.exec(["tr", "a-z", "A-Z"], stdin=b"shout\n").stdout == b"SHOUT\n"


@boots
def test_disk_write_survives_reconnect(vm: Booted) -> None:
    with vm.connect() as c:
        r = c.exec(["sh", "-c", "echo kept > /root/file && sync"])
        assert r.exit_code == 0
    # drop a connection in the middle of a command too: once it has printed its first line
    c = vm.connect()
    req = c._send(proto.EXEC, proto.encode_exec(["sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.1; done"]))
    first = c._recv(req, time.monotonic() + 30, "the command's first line")
    assert first.type == proto.STDOUT and first.payload.startswith(b"1\n")
    c.close()
    with vm.connect() as c:
        r = c.exec(["cat", "/root/file"])
        assert r.stdout == b"kept\n"
        c.set_time()
        guest_now = float(c.exec(["date", "+%s"]).stdout)
        assert abs(guest_now - time.time()) < 5
        c.sync()


@boots
def test_zz_poweroff(vm: Booted) -> None:
    with vm.connect() as c:
        c.poweroff()
    assert vm.proc.wait(timeout=30) == 0
