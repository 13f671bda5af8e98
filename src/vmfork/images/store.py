"""The store of OCI images: one read-only root filesystem per manifest digest.

    images/oci/<hex>/rootfs.img     ext4 (or erofs), LABEL=vmfork-image, shared read-only
    images/oci/<hex>/image.json     digest, format, run spec (Entrypoint, Cmd, Env, ...), sizes
    images/oci/refs.json            ref → digest (tags), written atomically
    images/oci/.tmp-*               a pull or import in progress (never valid; removed by
                                    the next store command and by ``recover``)
    images/oci/.lock                flock held by every writer

An image is built in a temp dir and committed by one rename; refs.json is updated after.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork.errors import Busy, ImageError, NotFound, VmforkError
from vmfork.images import oci
from vmfork.images import rootfs as rootfs_mod
from vmfork.util import atomic_write_json, fsync_dir, fsync_file, read_json

Progress = Callable[[str], None]
ROOTFS = "rootfs.img"
META = "image.json"
REFS = "refs.json"


def _noop(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class OciImage:
    digest: str  # sha256:<hex> of the manifest
    dir: Path
    meta: dict[str, Any] = field(hash=False, compare=False)
    refs: tuple[str, ...] = ()

    @property
    def rootfs(self) -> Path:
        return self.dir / ROOTFS

    @property
    def fs(self) -> str:
        return str(self.meta.get("fs", "ext4"))

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.meta.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


class Store:
    def __init__(self, images_dir: Path, progress: Progress | None = None) -> None:
        self.root = images_dir / "oci"
        self.progress = progress or _noop

    # --- locking and recovery -------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress("waiting for another image pull to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._clean_tmp()
            yield
        finally:
            os.close(fd)

    def _clean_tmp(self) -> list[str]:
        """Under the lock: every .tmp-* is a dead pull's (every writer holds the lock)."""
        removed = []
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(f"removed the unfinished image pull {stale.name}")
        return removed

    def recover(self) -> list[str]:
        if not self.root.is_dir():
            return []
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []  # a pull is running: its temp dir is live
            return self._clean_tmp()
        finally:
            os.close(fd)

    # --- reading --------------------------------------------------------------------------
    def _refs(self) -> dict[str, str]:
        try:
            refs = read_json(self.root / REFS)
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in refs.items()} if isinstance(refs, dict) else {}

    def _load(self, d: Path, refs: dict[str, str]) -> OciImage | None:
        try:
            meta = read_json(d / META)
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not (d / ROOTFS).is_file():
            return None
        digest = str(meta.get("digest", ""))
        if digest != f"sha256:{d.name}":
            return None
        return OciImage(digest, d, meta, tuple(sorted(r for r, dg in refs.items() if dg == digest)))

    def images(self) -> list[OciImage]:
        if not self.root.is_dir():
            return []
        refs = self._refs()
        found = [im for d in sorted(self.root.iterdir())
                 if not d.name.startswith(".") and d.is_dir() and (im := self._load(d, refs))]
        found.sort(key=lambda im: str(im.meta.get("created", "")), reverse=True)
        return found

    def get(self, text: str) -> OciImage:
        """The image a ref (as pulled or tagged) or a digest (sha256:..., or 12+ hex) names."""
        text = text.strip()
        refs = self._refs()
        wanted = refs.get(text)
        if wanted is None:
            with contextlib.suppress(VmforkError):
                wanted = refs.get(str(oci.parse_ref(text)))
        if wanted is None:
            hexd = text.removeprefix("sha256:")
            if re.fullmatch(r"[0-9a-f]{12,64}", hexd):
                hits = [d for d in self.root.glob(f"{hexd}*") if d.is_dir()] if self.root.is_dir() else []
                if len(hits) == 1:
                    wanted = f"sha256:{hits[0].name}"
        if wanted is not None:
            im = self._load(self.root / wanted.removeprefix("sha256:"), refs)
            if im is not None:
                return im
        raise NotFound(f"image '{text}' not found: pull it with 'vmfork image pull {text}'")

    def by_digest(self, digest: str) -> OciImage:
        im = self._load(self.root / digest.removeprefix("sha256:"), self._refs())
        if im is None:
            raise ImageError(f"image {digest} is not in the store (removed?)")
        return im

    # --- writing --------------------------------------------------------------------------
    def pull(self, text: str, *, insecure: bool = False, fmt: str = rootfs_mod.DEFAULT_FORMAT) -> OciImage:
        ref = oci.parse_ref(text)
        tls_off = insecure or ref.local
        return self._add(f"docker://{ref}", str(ref), insecure=tls_off, fmt=fmt)

    def import_(self, source: str, tag: str | None = None, *, fmt: str = rootfs_mod.DEFAULT_FORMAT) -> OciImage:
        src = oci.import_source(source)
        name = str(oci.parse_ref(tag)) if tag else None
        return self._add(src, name, fmt=fmt)

    def _add(self, src: str, ref: str | None, *, insecure: bool = False, fmt: str) -> OciImage:
        t0 = time.monotonic()
        with self._lock():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                self.progress(f"pulling {src}")
                layout = tmp / "layout"
                oci.copy_to_layout(src, layout, self.progress, insecure=insecure)
                img = oci.read_layout(layout)
                hexd = img.manifest_digest.removeprefix("sha256:")
                final = self.root / hexd
                pulled_s = time.monotonic() - t0
                if self._load(final, {}) is None:
                    if final.exists():
                        shutil.rmtree(final)  # not loadable: incomplete, rebuild it
                    out = tmp / "image"
                    out.mkdir()
                    t_unpack = time.monotonic()
                    oci.unpack(layout, tmp / "rootfs", self.progress)
                    spec = oci.run_spec(img.config, tmp / "rootfs")
                    unpack_s = time.monotonic() - t_unpack
                    self.progress(f"converting to a read-only {fmt} root filesystem")
                    convert_s = rootfs_mod.convert(tmp / "rootfs", out / ROOTFS, fmt)
                    fsync_file(out / ROOTFS)
                    meta = {
                        "format": 1, "digest": img.manifest_digest, "fs": fmt,
                        "config_digest": img.manifest["config"]["digest"],
                        "layers": len(img.manifest.get("layers", [])),
                        "compressed_size": img.size,
                        "rootfs_bytes": (out / ROOTFS).stat().st_size,
                        "rootfs_allocated_bytes": (out / ROOTFS).stat().st_blocks * 512,
                        "spec": spec,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "image_created": str(img.config.get("created", "")),
                        "source": src, "pull_seconds": round(pulled_s, 2),
                        "unpack_seconds": round(unpack_s, 2), "convert_seconds": round(convert_s, 2),
                    }
                    atomic_write_json(out / META, meta)
                    os.chmod(out, 0o755)
                    os.rename(out, final)
                    fsync_dir(self.root)
                else:
                    self.progress(f"image {img.manifest_digest[:19]} already in the store")
                if ref is not None:
                    refs = self._refs()
                    refs[ref] = img.manifest_digest
                    atomic_write_json(self.root / REFS, refs)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        im = self.by_digest(img.manifest_digest)
        self.progress(f"image {im.short} ready ({time.monotonic() - t0:.1f} s)")
        return im

    def tag(self, im: OciImage, ref: str) -> None:
        with self._lock():
            refs = self._refs()
            refs[str(oci.parse_ref(ref))] = im.digest
            atomic_write_json(self.root / REFS, refs)

    def remove(self, text: str, users: Callable[[str], list[str]]) -> OciImage:
        """Remove an image (all its refs); refuse while ``users(digest)`` names any user."""
        with self._lock():
            im = self.get(text)
            used = users(im.digest)
            if used:
                raise Busy(f"image '{text}' is used by {', '.join(used[:5])}"
                                 + (f" and {len(used) - 5} more" if len(used) > 5 else "")
                                 + ": remove them first")
            refs = {r: d for r, d in self._refs().items() if d != im.digest}
            atomic_write_json(self.root / REFS, refs)
            trash = self.root / f".tmp-rm-{im.dir.name}"
            os.rename(im.dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return im
