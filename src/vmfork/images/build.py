"""Building the default guest image: kernel (vmlinux + bzImage), initramfs,
read-only root filesystem, data-disk template and the agent binary."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmfork.errors import ImageError
from vmfork.images import kernel as kern
from vmfork.images.cpio import CpioArchive
from vmfork.images.tools import run_tool
from vmfork.paths import cache_dir
from vmfork.util import sha256_file

# Bump when the recipe (this file's logic) changes in a way that changes the output.
RECIPE_VERSION = 3

GUEST_DIR = Path(__file__).resolve().parent / "guest"
GUEST_FILES = ("init", "rc.boot", "inittab", "passwd", "group", "profile", "agent.c", "vmfork-run.c",
               "vmfork-main")
BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"

ROOT_LABEL = "vmfork-root"
DATA_LABEL = "vmfork-data"
OVERLAY_SIZE = 2 << 30
OVERLAY_JOURNAL_MIB = 8

# Kernel modules the guest needs, in load order (dependencies are added from each
# module's modinfo), with the config symbol that builds them in.
MODULES: tuple[tuple[str, str], ...] = (
    ("virtio_ring", "CONFIG_VIRTIO"),
    ("virtio", "CONFIG_VIRTIO"),
    ("virtio_mmio", "CONFIG_VIRTIO_MMIO"),
    ("virtio_pci_modern_dev", "CONFIG_VIRTIO_PCI_LIB"),
    ("virtio_pci_legacy_dev", "CONFIG_VIRTIO_PCI_LIB_LEGACY"),
    ("virtio_pci", "CONFIG_VIRTIO_PCI"),
    ("virtio_console", "CONFIG_VIRTIO_CONSOLE"),
    ("virtio_blk", "CONFIG_VIRTIO_BLK"),
    ("virtio_net", "CONFIG_VIRTIO_NET"),  # the guest NIC (vmfork.network)
    # seeds the guest's RNG from the host when the VMM offers a virtio-rng device;
    # without one, getrandom() blocks for seconds after a TCG boot
    ("virtio_rng", "CONFIG_HW_RANDOM_VIRTIO"),
    ("ext4", "CONFIG_EXT4_FS"),
    ("overlay", "CONFIG_OVERLAY_FS"),
    ("vsock", "CONFIG_VSOCKETS"),
    ("vmw_vsock_virtio_transport_common", "CONFIG_VIRTIO_VSOCKETS_COMMON"),
    ("vmw_vsock_virtio_transport", "CONFIG_VIRTIO_VSOCKETS"),
)
# Shipped in the initramfs but loaded only when asked for (lib/modules/<name>.order, with
# their dependencies): erofs, for an OCI image root in that format (vmfork.image=erofs).
LAZY_MODULES: tuple[tuple[str, str], ...] = (("erofs", "CONFIG_EROFS_FS"),)
# Must be built in (=y): the initramfs and /dev depend on them.
REQUIRED_BUILTIN = ("CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS", "CONFIG_PVH")

# file names inside an image dir
VMLINUX = "vmlinux"
BZIMAGE = "bzImage"
INITRAMFS = "initramfs.cpio"
ROOTFS = "rootfs.ext4"
OVERLAY = "overlay.ext4"
AGENT = "vmfork-agent"
MANIFEST = "image.json"
IMAGE_FILES = (VMLINUX, BZIMAGE, INITRAMFS, ROOTFS, OVERLAY, AGENT)

Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LocalInputs:
    """Build inputs that need no apt lists."""

    busybox_version: str
    busybox_sha256: str
    guest_files: dict[str, str]  # name -> sha256

    def as_dict(self) -> dict[str, object]:
        return {
            "recipe_version": RECIPE_VERSION,
            "busybox": {"version": self.busybox_version, "sha256": self.busybox_sha256},
            "guest_files": self.guest_files,
        }

    @property
    def digest(self) -> str:
        return sha256_bytes(json.dumps(self.as_dict(), sort_keys=True).encode())


#: VMFORK_KERNEL: "source" builds the guest kernel from Debian's kernel source package
#: (vmfork.images.kernel_build: small config, everything built in, cached); "debian" takes
#: Debian's cloud kernel package as it is, with its modules.
KERNELS = ("source", "debian")
DEFAULT_KERNEL = "debian"


def kernel_choice() -> str:
    v = os.environ.get("VMFORK_KERNEL", "").strip().lower() or DEFAULT_KERNEL
    if v not in KERNELS:
        raise ImageError(f"VMFORK_KERNEL={v!r} is not one of: {', '.join(KERNELS)}")
    return v


@dataclass(frozen=True)
class Inputs:
    local: LocalInputs
    kernel: kern.KernelPackage  # the Debian package; for "source", the one the config starts from
    built_kernel: str | None = None  # kernel_build.recipe_key() when built from source

    @property
    def digest(self) -> str:
        kernel: dict[str, str] = {
            "package": self.kernel.name,
            "version": self.kernel.version,
            "sha256": self.kernel.sha256,
        }
        if self.built_kernel is not None:
            kernel = {"built_from_source": self.built_kernel}
        doc = {**self.local.as_dict(), "kernel": kernel}
        return sha256_bytes(json.dumps(doc, sort_keys=True).encode())


def busybox_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", BUSYBOX_PACKAGE],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError:
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    if not BUSYBOX.exists():
        raise ImageError(
            f"{BUSYBOX} not found: install {BUSYBOX_PACKAGE} (apt-get install {BUSYBOX_PACKAGE})"
        )
    # not from dpkg: take the version from the banner
    banner = subprocess.run([str(BUSYBOX)], capture_output=True, text=True, check=False).stdout
    m = re.search(r"BusyBox (v\S+)", banner)
    return m.group(1) if m else "unknown"


def local_inputs() -> LocalInputs:
    if not BUSYBOX.exists():
        raise ImageError(
            f"{BUSYBOX} not found: install {BUSYBOX_PACKAGE} (apt-get install {BUSYBOX_PACKAGE})"
        )
    guest: dict[str, str] = {}
    for name in GUEST_FILES:
        path = GUEST_DIR / name
        if not path.is_file():
            raise ImageError(f"guest file {path} is missing from the vmfork package")
        guest[name] = sha256_bytes(path.read_bytes())
    return LocalInputs(busybox_version(), sha256_file(BUSYBOX), guest)


def resolve_inputs() -> Inputs:
    if kernel_choice() == "source":  # pinned: needs no apt lists to resolve
        from vmfork.images import kernel_build

        return Inputs(local_inputs(), kernel_build.BASE, kernel_build.recipe_key())
    return Inputs(
        local_inputs(), kern.resolve_kernel_package_cached(cache_dir() / "kernel-package.json")
    )


# -------------------------------------------------------------------- kernel


def parse_kconfig(path: Path) -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            conf[m.group(1)] = m.group(2)
    return conf


def _norm_mod(name: str) -> str:
    return name.replace("-", "_")


def modinfo(ko: bytes) -> dict[str, str]:
    """Key/values of an ELF64 kernel module's .modinfo section."""
    if not ko.startswith(b"\x7fELF") or ko[4] != 2:
        raise ImageError("not an ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _n, str_off, _s = section(shstrndx)
    info: dict[str, str] = {}
    for i in range(shnum):
        name_off, off, size = section(i)
        end = ko.index(b"\0", str_off + name_off)
        if ko[str_off + name_off : end] == b".modinfo":
            for item in ko[off : off + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(errors="replace"), value.decode(errors="replace"))
    return info


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return kern._decompress_cli("zstd", data)
    return data


@dataclass(frozen=True)
class ModuleSet:
    order: list[str]  # load order
    files: dict[str, bytes]  # name -> uncompressed .ko
    builtin: list[str]
    lazy: dict[str, list[str]] = field(default_factory=dict)  # LAZY_MODULES: name -> load order


def collect_modules(modroot: Path, config: dict[str, str]) -> ModuleSet:
    """Pick the needed modules (plus their dependencies) from an unpacked kernel."""
    available: dict[str, Path] = {}
    for p in (modroot / "kernel").rglob("*.ko*"):
        m = re.match(r"^(.*)\.ko(\.xz|\.gz|\.zst)?$", p.name)
        if m:
            available[_norm_mod(m.group(1))] = p
    builtin_file = modroot / "modules.builtin"
    builtin: set[str] = set()
    if builtin_file.exists():
        for line in builtin_file.read_text().splitlines():
            builtin.add(_norm_mod(Path(line.strip()).name.removesuffix(".ko")))

    order: list[str] = []
    files: dict[str, bytes] = {}
    builtins: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, symbol: str | None, needed_by: str | None) -> None:
        name = _norm_mod(name)
        if name in files or name in builtins:
            return
        if name in available:
            if name in visiting:
                raise ImageError(f"kernel module dependency cycle at {name}")
            visiting.add(name)
            data = _read_module(available[name])
            deps = [d for d in modinfo(data).get("depends", "").split(",") if d]
            for dep in deps:
                visit(dep, None, name)
            visiting.discard(name)
            files[name] = data
            order.append(name)
            return
        if name in builtin or (symbol is not None and config.get(symbol) == "y"):
            builtins.append(name)
            return
        why = f" (needed by {needed_by})" if needed_by else ""
        state = f"; {symbol}={config.get(symbol, 'not set')}" if symbol else ""
        raise ImageError(
            f"kernel module {name}{why} is neither built in nor shipped as a module{state}"
        )

    for name, symbol in MODULES:
        visit(name, symbol, None)
    boot = list(order)
    lazy: dict[str, list[str]] = {}
    for name, symbol in LAZY_MODULES:
        n = len(order)
        visit(name, symbol, None)
        lazy[name] = order[n:]
    return ModuleSet(boot, files, builtins, lazy)


def builtin_modules(config: dict[str, str]) -> ModuleSet:
    """A kernel without modules: each needed driver must be built in (PCI ones only with PCI)."""
    builtins: list[str] = []
    missing: list[str] = []
    for name, symbol in (*MODULES, *LAZY_MODULES):
        if config.get(symbol) == "y":
            builtins.append(name)
        elif not (symbol.startswith("CONFIG_VIRTIO_PCI") and config.get("CONFIG_PCI") != "y"):
            missing.append(f"{symbol} ({name})")
    if missing:
        raise ImageError(f"the kernel has modules off but lacks built-in {', '.join(missing)}")
    return ModuleSet([], {}, builtins, {})


def check_kernel_config(config: dict[str, str], kver: str) -> None:
    missing = [s for s in REQUIRED_BUILTIN if config.get(s) != "y"]
    if missing:
        raise ImageError(f"kernel {kver} lacks required built-in options: {', '.join(missing)}")


# --------------------------------------------------------------------- agent


def compile_agent(out: Path, source: str = "agent.c") -> str:
    """Compile the guest agent (or another guest program) statically; returns the compiler used."""
    src = GUEST_DIR / source
    flags = ["-static", "-Os", "-s", "-Wall", "-Wextra", "-o", str(out), str(src)]
    for cc in ("musl-gcc", "gcc"):
        if shutil.which(cc) is None:
            continue
        run_tool([cc, *flags], f"{cc} (compiling the guest agent)")
        return cc
    raise ImageError("no C compiler found: install musl-tools (musl-gcc) or gcc")


# --------------------------------------------------------------- filesystems


def busybox_applets() -> list[str]:
    """Applet paths relative to / (e.g. 'bin/sh'), as busybox installs them."""
    out = run_tool([str(BUSYBOX), "--list-full"], "busybox --list-full")
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


def build_initramfs(
    out: Path, busybox: bytes, applets: list[str], modules: ModuleSet
) -> int:
    arc = CpioArchive()
    for d in ("dev", "proc", "sys", "lower", "data", "newroot", "run", "tmp", "root"):
        arc.add_dir(d)
    arc.add_chardev("dev/console", 5, 1, 0o600)
    arc.add_chardev("dev/null", 1, 3, 0o666)
    arc.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            arc.add_symlink(applet, "/bin/busybox")
    arc.add_file("init", (GUEST_DIR / "init").read_bytes(), 0o755)
    for name in modules.order + [m for lazy in modules.lazy.values() for m in lazy]:
        arc.add_file(f"lib/modules/{name}.ko", modules.files[name], 0o644)
    arc.add_file("lib/modules/load-order", "".join(f"{m}\n" for m in modules.order).encode())
    for name, lazy in modules.lazy.items():
        arc.add_file(f"lib/modules/{name}.order", "".join(f"{m}\n" for m in lazy).encode())
    with open(out, "wb") as f:
        return arc.write(f)


def _deterministic_uuid(digest: str, what: str) -> str:
    return str(uuid.UUID(hashlib.sha256(f"{digest}:{what}".encode()).hexdigest()[:32]))


def _stage_rootfs(root: Path, busybox: Path, applets: list[str], agent: Path) -> None:
    dirs = {
        "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
        "usr/local": 0o755, "usr/local/bin": 0o755, "usr/local/sbin": 0o755, "lib": 0o755,
        "etc": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755,
        "tmp": 0o1777, "root": 0o700, "home": 0o755, "mnt": 0o755, "var": 0o755,
        "var/log": 0o755, "var/tmp": 0o1777, "var/lib": 0o755, "var/cache": 0o755,
    }
    for d, mode in dirs.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    shutil.copyfile(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for applet in applets:
        if applet == "bin/busybox":
            continue
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    shutil.copyfile(agent, root / "sbin/vmfork-agent")
    os.chmod(root / "sbin/vmfork-agent", 0o755)
    # OCI images (vmfork run --image): the main process's starter, chroot helper beside the agent
    compile_agent(root / "sbin/vmfork-run", "vmfork-run.c")
    shutil.copyfile(GUEST_DIR / "vmfork-main", root / "sbin/vmfork-main")
    os.chmod(root / "sbin/vmfork-main", 0o755)
    for name, mode in (("inittab", 0o644), ("rc.boot", 0o755), ("passwd", 0o644),
                       ("group", 0o644), ("profile", 0o644)):
        shutil.copyfile(GUEST_DIR / name, root / "etc" / name)
        os.chmod(root / "etc" / name, mode)
    (root / "etc/hostname").write_text("vmfork\n")
    (root / "etc/shells").write_text("/bin/sh\n/bin/ash\n")
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.utime(p, (0, 0))
    os.utime(root, (0, 0))


def _chown_root_debugfs(image: Path, staging: Path) -> None:
    """Unprivileged builds: mkfs -d copies the builder's uid/gid; make them 0."""
    cmds = []
    for p in sorted(staging.rglob("*")):
        rel = "/" + str(p.relative_to(staging))
        cmds.append(f'sif "{rel}" uid 0\nsif "{rel}" gid 0\n')
    script = image.parent / (image.name + ".debugfs")
    script.write_text("".join(cmds))
    try:
        run_tool(["debugfs", "-w", "-f", str(script), str(image)], "debugfs")
    finally:
        script.unlink()


def build_rootfs(out: Path, staging: Path, digest: str) -> None:
    """A small read-only ext4 image of ``staging`` (no journal: it is never written)."""
    used = 0
    count = 0
    for p in staging.rglob("*"):
        count += 1
        if p.is_file() and not p.is_symlink():
            used += (p.stat().st_size + 4095) // 4096 * 4096
    inodes = (count + 64 + 31) // 32 * 32
    size_mib = ((used + inodes * 256) * 5 // 4 + (2 << 20) + (1 << 20) - 1) >> 20
    run_tool(
        [
            "mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL,
            "-U", _deterministic_uuid(digest, "root"),
            "-b", "4096", "-N", str(inodes), "-m", "0", "-O", "^has_journal,^resize_inode",
            "-E", f"root_owner=0:0,hash_seed={_deterministic_uuid(digest, 'hash')}",
            "-d", str(staging), str(out), f"{size_mib}M",
        ],
        "mkfs.ext4 (root filesystem)",
    )
    if os.geteuid() != 0:
        _chown_root_debugfs(out, staging)
    run_tool(["e2fsck", "-fn", str(out)], "e2fsck (root filesystem)")


def build_overlay_template(out: Path, digest: str) -> None:
    """A sparse ext4 file for the per-instance upper layer: lazy inode table and
    journal init keep its allocated size around a megabyte."""
    with open(out, "wb") as f:
        f.truncate(OVERLAY_SIZE)
    run_tool(
        [
            "mkfs.ext4", "-q", "-F", "-L", DATA_LABEL,
            "-U", _deterministic_uuid(digest, "data"),
            "-m", "0", "-J", f"size={OVERLAY_JOURNAL_MIB}",
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
            str(out),
        ],
        "mkfs.ext4 (data disk template)",
    )


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


# --------------------------------------------------------------------- build


def _debian_kernel(dest: Path, pkg: kern.KernelPackage, work: Path,
                   progress: Progress) -> tuple[ModuleSet, str]:
    """Debian's kernel package: vmlinux and bzImage into ``dest``; its modules."""
    kver = pkg.kernel_version
    debs = cache_dir() / "debs"
    cached = (debs / pkg.deb_name).exists()
    progress(f"kernel: {'checking cached' if cached else 'downloading'} {pkg.deb_name}")
    deb = kern.download_deb(pkg, debs)
    progress(f"kernel: unpacking {deb.name}")
    unpacked = work / "deb"
    unpacked.mkdir()
    kern.unpack_deb(deb, unpacked)
    bz_path = unpacked / "boot" / f"vmlinuz-{kver}"
    config_path = unpacked / "boot" / f"config-{kver}"
    modroot = unpacked / "lib" / "modules" / kver
    for p in (bz_path, config_path, modroot):
        if not p.exists():
            raise ImageError(f"{deb.name} has no {p.relative_to(unpacked)}")
    config = parse_kconfig(config_path)
    check_kernel_config(config, kver)

    progress("kernel: extracting vmlinux from the bzImage")
    bzimage = bz_path.read_bytes()
    elf, compression = kern.extract_vmlinux(bzimage)
    if not kern.has_pvh_note(elf):
        raise ImageError(f"vmlinux of {kver} has no PVH entry note (cannot boot it directly)")
    (dest / VMLINUX).write_bytes(elf)
    (dest / BZIMAGE).write_bytes(bzimage)
    del elf, bzimage

    progress("kernel: collecting modules")
    return collect_modules(modroot, config), compression


def build_into(dest: Path, inputs: Inputs, progress: Progress = _noop) -> dict[str, object]:
    """Build every image file into the empty dir ``dest``; returns the manifest."""
    t0 = time.monotonic()
    digest = inputs.digest
    pkg = inputs.kernel
    kver = pkg.kernel_version
    work = dest / "work"
    work.mkdir()

    if inputs.built_kernel is not None:
        from vmfork.images import kernel_build

        built = kernel_build.ensure_kernel(progress)
        if built.key != inputs.built_kernel:
            raise ImageError("the kernel recipe changed during the image build; build again")
        kver = built.release
        config = parse_kconfig(built.config)
        check_kernel_config(config, kver)
        shutil.copyfile(built.vmlinux, dest / VMLINUX)
        shutil.copyfile(built.bzimage, dest / BZIMAGE)
        compression = "none (built from source)"
        modules = builtin_modules(config)
        source: dict[str, object] = {"kernel_source": {
            "package": kernel_build.SOURCE.name, "version": kernel_build.SOURCE.version,
            "sha256": kernel_build.SOURCE.sha256, "recipe_key": built.key,
            "build_seconds": built.build_seconds}}
    else:
        modules, compression = _debian_kernel(dest, pkg, work, progress)
        source = {}

    progress("agent: compiling")
    compiler = compile_agent(dest / AGENT)

    progress("initramfs: writing")
    busybox = BUSYBOX.read_bytes()
    applets = busybox_applets()
    build_initramfs(dest / INITRAMFS, busybox, applets, modules)

    progress("root filesystem: creating")
    staging = work / "root"
    _stage_rootfs(staging, BUSYBOX, applets, dest / AGENT)
    build_rootfs(dest / ROOTFS, staging, digest)

    progress("data disk template: creating")
    build_overlay_template(dest / OVERLAY, digest)

    shutil.rmtree(work)
    files = {
        name: {"size": (dest / name).stat().st_size, "allocated": allocated_bytes(dest / name)}
        for name in IMAGE_FILES
    }
    return {
        "format": 1,
        "digest": digest,
        "local_inputs_digest": inputs.local.digest,
        "recipe_version": RECIPE_VERSION,
        "kernel_version": kver,
        "kernel": "source" if inputs.built_kernel is not None else "debian",
        "kernel_package": pkg.name,
        "kernel_package_version": pkg.version,
        "kernel_compression": compression,
        "deb": {"name": pkg.deb_name, "sha256": pkg.sha256},
        **source,
        "busybox_version": inputs.local.busybox_version,
        "busybox_sha256": inputs.local.busybox_sha256,
        "guest_files": inputs.local.guest_files,
        "agent_compiler": compiler,
        "modules": modules.order,
        "modules_lazy": modules.lazy,
        "modules_builtin": modules.builtin,
        "labels": {"root": ROOT_LABEL, "data": DATA_LABEL},
        "files": files,
        "build_seconds": round(time.monotonic() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
