"""Guest images: content-addressed, built once per set of build inputs.

An image dir ``<images_dir>/<digest[:16]>/`` holds::

    vmlinux         uncompressed ELF kernel with the PVH entry note (QEMU microvm, Firecracker)
    bzImage         the same kernel as Debian ships it
    initramfs.cpio  busybox + modules + /init (stage 1), uncompressed newc cpio
    rootfs.ext4     read-only root filesystem, LABEL=vmfork-root
    overlay.ext4    sparse 2 GiB ext4, LABEL=vmfork-data: copy it for each instance's disk
    vmfork-agent    the guest agent binary (also inside rootfs.ext4)
    image.json      the manifest; written last

Build steps run in ``<images_dir>/.tmp-XXXX`` under an flock on
``<images_dir>/.build.lock`` and are renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork.errors import ImageError, VmforkError
from vmfork.images import build as _build
from vmfork.images.build import RECIPE_VERSION
from vmfork.util import atomic_write_json, fsync_dir, fsync_file, read_json

__all__ = [
    "DIGEST_DIR_LEN",
    "RECIPE_VERSION",
    "Image",
    "ensure_image",
    "image_inputs_digest",
    "list_images",
    "load_image",
]

DIGEST_DIR_LEN = 16
LOCK_NAME = ".build.lock"


@dataclass(frozen=True)
class Image:
    digest: str  # full hex sha256 of the build inputs; dir name is digest[:16]
    dir: Path
    kernel_version: str
    manifest: dict[str, Any] = field(hash=False, compare=False)

    @property
    def vmlinux(self) -> Path:
        return self.dir / _build.VMLINUX

    @property
    def bzimage(self) -> Path:
        return self.dir / _build.BZIMAGE

    @property
    def initramfs(self) -> Path:
        return self.dir / _build.INITRAMFS

    @property
    def rootfs(self) -> Path:
        return self.dir / _build.ROOTFS

    @property
    def overlay_template(self) -> Path:
        return self.dir / _build.OVERLAY

    @property
    def agent(self) -> Path:
        return self.dir / _build.AGENT

    @property
    def short(self) -> str:
        return self.digest[:DIGEST_DIR_LEN]


def image_inputs_digest() -> str:
    """SHA-256 of the build inputs: kernel package (name, version, .deb sha256 from the
    apt lists), busybox (version and binary), the guest files and RECIPE_VERSION."""
    return _build.resolve_inputs().digest


def _dir_for(images_dir: Path, digest: str) -> Path:
    return images_dir / digest[:DIGEST_DIR_LEN]


def load_image(images_dir: Path, digest: str) -> Image:
    """The complete image with this digest (full or its 16-char prefix)."""
    digest = digest.strip().lower()
    if len(digest) < DIGEST_DIR_LEN or any(c not in "0123456789abcdef" for c in digest):
        raise ImageError(f"invalid image digest {digest!r}")
    d = _dir_for(images_dir, digest)
    if not d.is_dir():
        raise ImageError(f"image {digest[:DIGEST_DIR_LEN]} not found in {images_dir}")
    manifest_path = d / _build.MANIFEST
    if not manifest_path.is_file():
        raise ImageError(f"image {d} is incomplete: {_build.MANIFEST} is missing")
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise ImageError(f"image {d}: cannot read {_build.MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict) or not str(manifest.get("digest", "")).startswith(digest):
        raise ImageError(f"image {d}: {_build.MANIFEST} does not belong to digest {digest}")
    missing = [name for name in _build.IMAGE_FILES if not (d / name).is_file()]
    if missing:
        raise ImageError(f"image {d} is incomplete: missing {', '.join(missing)}")
    return Image(
        digest=str(manifest["digest"]),
        dir=d,
        kernel_version=str(manifest.get("kernel_version", "")),
        manifest=manifest,
    )


def list_images(images_dir: Path) -> list[Image]:
    """Complete images in ``images_dir``, newest first."""
    found: list[Image] = []
    if not images_dir.is_dir():
        return found
    for d in images_dir.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        with contextlib.suppress(ImageError):
            found.append(load_image(images_dir, d.name))
    found.sort(key=lambda im: str(im.manifest.get("created", "")), reverse=True)
    return found


@contextlib.contextmanager
def _build_lock(images_dir: Path, progress: Callable[[str], None]) -> Iterator[None]:
    fd = os.open(images_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another image build to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _noop(_msg: str) -> None:
    pass


def ensure_image(images_dir: Path, progress: Callable[[str], None] | None = None) -> Image:
    """Return the default image, building it if absent.

    Idempotent and safe to call concurrently (flock on ``images_dir/.build.lock``).
    If apt cannot resolve the kernel (no apt lists) but an image built from the same
    local inputs exists, that image is used.
    """
    say = progress or _noop
    images_dir.mkdir(parents=True, exist_ok=True)
    try:
        inputs = _build.resolve_inputs()
    except VmforkError as exc:
        local = _build.local_inputs()
        for im in list_images(images_dir):
            if im.manifest.get("local_inputs_digest") == local.digest:
                say(f"cannot check for a newer kernel ({exc}); using image {im.short}")
                return im
        raise
    digest = inputs.digest
    with contextlib.suppress(ImageError):
        return load_image(images_dir, digest)

    with _build_lock(images_dir, say):
        with contextlib.suppress(ImageError):
            return load_image(images_dir, digest)  # built while we waited
        # Leftovers of interrupted builds (every builder holds the lock).
        for stale in images_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = _dir_for(images_dir, digest)
        if final.exists():  # an incomplete image: rebuild it
            say(f"removing incomplete image {final.name}")
            shutil.rmtree(final)
        kernel = "built from Debian's source" if inputs.built_kernel else inputs.kernel.kernel_version
        say(f"building image {digest[:DIGEST_DIR_LEN]} (kernel {kernel})")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=images_dir))
        try:
            manifest = _build.build_into(tmp, inputs, say)
            for name in _build.IMAGE_FILES:
                fsync_file(tmp / name)
            atomic_write_json(tmp / _build.MANIFEST, manifest)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
            fsync_dir(images_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"image {digest[:DIGEST_DIR_LEN]} ready ({manifest['build_seconds']} s)")
    return load_image(images_dir, digest)
