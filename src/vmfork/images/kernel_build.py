"""The guest kernel built from Debian's own kernel source package (``VMFORK_KERNEL=source``).

Reproducible and cached: the source package ``linux-source-6.1`` and the cloud kernel
whose config is the starting point are pinned (version and .deb SHA-256); the config is
that cloud config reduced by ``make localmodconfig`` to the modules in
``kernel/modules.lst``, then changed by ``kernel/config.fragment`` (modules off: all
built in); the build's timestamp, user, host and version are fixed. The result
(``vmlinux``, ``bzImage``, ``config``) is cached in ``<cache>/kernels/<key>/``, the key
being the SHA-256 of all of that plus the compiler's version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import ExternalToolError, ImageError
from vmfork.images import kernel as kern
from vmfork.images.tools import run_tool
from vmfork.paths import cache_dir
from vmfork.util import sha256_file

# Bump when the steps below change in a way that changes the kernel.
RECIPE_VERSION = 1

SOURCE = kern.KernelPackage(
    "linux-source-6.1", "6.1.192-3",
    "5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67",
    "pool/updates/main/l/linux/linux-source-6.1_6.1.192-3_all.deb", arch="all",
)
# The config to start from: Debian's cloud kernel of the same version.
BASE = kern.KernelPackage(
    "linux-image-6.1.0-57-cloud-amd64", "6.1.192-3",
    "4fdd0172a8c3f41a97e92465b2ac1867e1c10d82d7aeed3d26ee7a5d14df1754",
    "pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb",
)
RECIPE_DIR = Path(__file__).resolve().parent / "kernel"
FRAGMENT = RECIPE_DIR / "config.fragment"
MODULES_LIST = RECIPE_DIR / "modules.lst"
TARBALL = "usr/src/linux-source-6.1.tar.xz"
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "2025-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "vmfork",
    "KBUILD_BUILD_HOST": "vmfork",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
    "TZ": "UTC",
}
TOOLS = ("make", "gcc", "flex", "bison", "bc", "perl", "tar", "xz")
SETUP_HINT = "run `make setup` (it installs the kernel build tools)"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltKernel:
    dir: Path
    key: str
    release: str  # `make kernelrelease`
    build_seconds: float

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.dir / "bzImage"

    @property
    def config(self) -> Path:
        return self.dir / "config"


def _compiler_version() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return "none"
    return out.splitlines()[0] if out else "unknown"


def recipe() -> dict[str, object]:
    """Everything the kernel depends on; its hash is the cache key."""
    return {
        "recipe_version": RECIPE_VERSION,
        "source": {"package": SOURCE.name, "version": SOURCE.version, "sha256": SOURCE.sha256},
        "base_config": {"package": BASE.name, "version": BASE.version, "sha256": BASE.sha256},
        "fragment_sha256": sha256_file(FRAGMENT),
        "modules_sha256": sha256_file(MODULES_LIST),
        "env": BUILD_ENV,
        "compiler": _compiler_version(),
    }


def recipe_key() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def load_cached(key: str | None = None) -> BuiltKernel | None:
    key = key or recipe_key()
    d = kernels_dir() / key[:16]
    try:
        doc = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if doc.get("key") != key or not all((d / n).is_file() for n in ("vmlinux", "bzImage", "config")):
        return None
    return BuiltKernel(d, key, str(doc["release"]), float(doc["build_seconds"]))


@contextlib.contextmanager
def _lock(path: Path, progress: Progress) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("kernel: waiting for another kernel build to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_kernel(progress: Progress) -> BuiltKernel:
    """The cached kernel for the current recipe, built first if absent (minutes)."""
    key = recipe_key()
    cached = load_cached(key)
    if cached is not None:
        return cached
    root = kernels_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".build.lock", progress):
        cached = load_cached(key)
        if cached is not None:
            return cached
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = root / key[:16]
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            release, seconds = _build(tmp, progress)
            (tmp / "build.json").write_text(json.dumps({
                "key": key, "release": release, "build_seconds": seconds, "recipe": recipe(),
            }, indent=1, sort_keys=True))
            shutil.rmtree(tmp / "work")
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    built = load_cached(key)
    if built is None:
        raise ImageError(f"the kernel built into {final} cannot be read back")
    return built


def _fetch(pkg: kern.KernelPackage, progress: Progress) -> Path:
    debs = cache_dir() / "debs"
    progress(f"kernel: {'checking cached' if (debs / pkg.deb_name).exists() else 'downloading'} {pkg.deb_name}")
    try:
        return kern.download_deb(pkg, debs)
    except ExternalToolError as e:
        raise ExternalToolError(e.tool, f"{e.tool_message} (the kernel recipe pins {pkg.name} {pkg.version}; "
                                "VMFORK_KERNEL=debian uses Debian's cloud kernel instead)") from None


def _deb_member(deb: Path, member: str, dest: Path) -> None:
    """Extract one member of a .deb's data archive into ``dest``."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as p:
        tar = subprocess.run(["tar", "-x", "-C", str(dest), f"./{member}"], stdin=p.stdout,
                             capture_output=True, text=True, check=False)
    if p.returncode != 0 or tar.returncode != 0:
        raise ExternalToolError("dpkg-deb/tar", tar.stderr.strip() or f"cannot extract {member} from {deb.name}")


def check_fragment(config: Path, fragment: Path = FRAGMENT) -> list[str]:
    """Lines of the fragment that the final config does not carry (it drifted)."""
    have = config.read_text().splitlines()
    values = {m.group(1): m.group(2) for m in (re.match(r"^(CONFIG_\w+)=(.*)$", ln) for ln in have) if m}
    bad = []
    for line in fragment.read_text().splitlines():
        if m := re.match(r"^(CONFIG_\w+)=(.*)$", line):
            if values.get(m.group(1)) != m.group(2):
                bad.append(f"{line} (got {values.get(m.group(1), 'not set')})")
        elif (m := re.match(r"^# (CONFIG_\w+) is not set$", line)) and values.get(m.group(1), "n") != "n":
            bad.append(f"{line} (got {m.group(1)}={values[m.group(1)]})")
    return bad


def _make(src: Path, args: list[str], env: dict[str, str], progress: Progress, what: str,
          stdin: str | None = None) -> str:
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    argv = [*nice, "make", "--no-print-directory", "-C", str(src), *args]
    if stdin is not None:  # config questions: take every default
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise ExternalToolError(f"make {what}", (proc.stderr or proc.stdout).strip()[-2000:])
        return proc.stdout
    tail: list[str] = []
    compiled = 0
    t0 = last = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        assert p.stdout is not None
        for line in p.stdout:
            tail = [*tail[-29:], line.rstrip()]
            if line.startswith("  CC "):
                compiled += 1
                now = time.monotonic()
                if now - last >= 15:
                    last = now
                    progress(f"kernel: {what}: {compiled} files compiled ({now - t0:.0f} s)")
    if p.returncode != 0:
        raise ExternalToolError(f"make {what}", "\n".join(tail))
    return "\n".join(tail)


def _build(out: Path, progress: Progress) -> tuple[str, float]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ImageError(f"building the guest kernel needs {', '.join(missing)}: {SETUP_HINT}")
    t0 = time.monotonic()
    work = out / "work"
    work.mkdir()
    source_deb = _fetch(SOURCE, progress)
    base_deb = _fetch(BASE, progress)
    progress(f"kernel: unpacking {SOURCE.name} {SOURCE.version}")
    _deb_member(source_deb, TARBALL, work)
    src = work / "linux"
    src.mkdir()
    run_tool(["tar", "-xJf", str(work / TARBALL), "-C", str(src), "--strip-components=1"], "tar")
    (work / TARBALL).unlink()
    _deb_member(base_deb, f"boot/config-{BASE.kernel_version}", work)
    shutil.copyfile(work / "boot" / f"config-{BASE.kernel_version}", src / ".config")

    env = {**os.environ, **BUILD_ENV}
    progress("kernel: configuring (localmodconfig + config.fragment)")
    lsmod = work / "lsmod"
    mods = [ln.split()[0] for ln in MODULES_LIST.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    lsmod.write_text("Module                  Size  Used by\n" + "".join(f"{m}  16384  0\n" for m in mods))
    _make(src, [f"LSMOD={lsmod}", "localmodconfig"], env, progress, "localmodconfig", stdin="\n" * 5000)
    run_tool([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(src), str(src / ".config"),
              str(FRAGMENT)], "merge_config.sh", cwd=src)
    _make(src, ["olddefconfig"], env, progress, "olddefconfig", stdin="")
    drift = check_fragment(src / ".config")
    if drift:
        raise ImageError("the kernel config does not take config.fragment's values: " + "; ".join(drift))
    jobs = str(os.cpu_count() or 1)
    progress(f"kernel: compiling with make -j{jobs} (several minutes; cached afterwards)")
    _make(src, [f"-j{jobs}", "bzImage"], env, progress, "bzImage")
    release = _make(src, ["-s", "kernelrelease"], env, progress, "kernelrelease", stdin="").strip()
    elf = (src / "vmlinux").read_bytes()
    if not kern.has_pvh_note(elf):
        raise ImageError("the built vmlinux has no PVH entry note (CONFIG_PVH)")
    del elf
    for name, path in (("vmlinux", src / "vmlinux"), ("bzImage", src / "arch/x86/boot/bzImage"),
                       ("config", src / ".config")):
        shutil.copyfile(path, out / name)
    seconds = round(time.monotonic() - t0, 1)
    progress(f"kernel: {release} built in {seconds:.0f} s")
    return release, seconds


def main() -> None:
    """``python -m vmfork.images.kernel_build``: build (or find) the cached kernel (make setup)."""
    import sys

    from vmfork.errors import VmforkError
    from vmfork.images.build import kernel_choice

    try:
        if kernel_choice() != "source":
            print("guest kernel: Debian's cloud kernel package (VMFORK_KERNEL=debian): nothing to build")
            return
        built = ensure_kernel(lambda msg: print(msg, flush=True))
    except VmforkError as exc:
        sys.exit(f"vmfork: {exc}")
    print(f"kernel {built.release} ({built.key[:16]}) at {built.dir}, built in {built.build_seconds:.0f} s")


if __name__ == "__main__":
    main()
