"""Export and import of a named snapshot: one tar archive (GNU, sparse: holes are not
stored), zstd-compressed, streamable (``-o -`` / ``-``).

    vmfork-snapshot/export.json         format, what is inside, digests of the image's files
    vmfork-snapshot/snapshot/...        the snapshot's files and its snapshot.json
    vmfork-snapshot/image/...           with --with-image: the guest image it needs

The archive is written by ``tar --sparse | zstd`` (the real tools: their errors reach the
user as they wrote them). An import unpacks into ``snapshots/.import-<id>``, checks the
structure (regular files with known names only) and every digest, and only then renames
the snapshot (and a missing image) into place: a corrupt or truncated archive leaves
nothing visible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from vmfork import util
from vmfork.errors import ExternalToolError, InvalidArgument, WrongState
from vmfork.snapshots.digest import file_digest
from vmfork.snapshots.store import FILES, META, Snapshot, Store

TOP = "vmfork-snapshot"
EXPORT_META = "export.json"
SNAPSHOT_NAMES = {*FILES, META, "manifest.json"}
Progress = Callable[[str], None]


def _tool(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stderr=subprocess.PIPE, close_fds=True, **kw)
    except OSError as e:
        raise ExternalToolError(argv[0], f"cannot run it: {e.strerror}") from None


def _check(p: subprocess.Popen[bytes], what: str) -> None:
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.wait() != 0:
        raise ExternalToolError(what, util.one_line(err.strip())[:500] or f"exit {p.returncode}")


def _pump(src: IO[bytes], dst: IO[bytes], progress: Progress, what: str) -> int:
    """Copy src to dst, reporting the bytes moved every second."""
    total, last = 0, time.monotonic()
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        total += len(chunk)
        now = time.monotonic()
        if now - last >= 1.0:
            progress(f"{what}: {total >> 20} MiB")
            last = now
    dst.flush()
    return total


@contextlib.contextmanager
def _staged(store: Store, snap: Snapshot, image_dir: Path | None) -> Iterator[Path]:
    """A directory of hard links to what goes into the archive (nothing is copied)."""
    stage = store.root / f".export-{util.new_id()}"
    top = stage / TOP
    try:
        (top / "snapshot").mkdir(0o700, parents=True)
        for name in sorted(SNAPSHOT_NAMES):
            os.link(snap.dir / name, top / "snapshot" / name)
        meta: dict[str, Any] = {"format": 1, "snapshot": snap.id, "image": None}
        if image_dir is not None:
            files = {}
            for d, _dirs, names in os.walk(image_dir):
                for n in names:
                    src = Path(d) / n
                    rel = src.relative_to(image_dir)
                    if not stat.S_ISREG(os.lstat(src).st_mode):
                        continue
                    (top / "image" / rel.parent).mkdir(0o700, parents=True, exist_ok=True)
                    os.link(src, top / "image" / rel)
                    files[str(rel)] = file_digest(src)
            meta["image"] = {"digest": snap.image_digest, "dir": image_dir.name, "files": files}
        util.atomic_write_json(top / EXPORT_META, meta, durable=False)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export(store: Store, snap: Snapshot, out: IO[bytes], *, image_dir: Path | None,
           progress: Progress, level: int = 3) -> dict[str, Any]:
    t0 = time.monotonic()
    with store.using(snap):
        store.check(snap, "exported")
        with _staged(store, snap, image_dir) as stage:
            tar = _tool(["tar", "--sparse", "--format=gnu", "--numeric-owner", "-C", str(stage), "-cf", "-", TOP],
                        stdout=subprocess.PIPE)
            assert tar.stdout is not None
            zstd = _tool(["zstd", "-q", f"-{level}", "-T0", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE)
            tar.stdout.close()
            assert zstd.stdout is not None
            try:
                written = _pump(zstd.stdout, out, progress, f"exporting '{snap.name}'")
            finally:
                _check(tar, "tar")
                _check(zstd, "zstd")
    secs = time.monotonic() - t0
    progress(f"exported '{snap.name}': {written >> 20} MiB in {secs:.2f}s")
    return {"name": snap.name, "id": snap.id, "bytes": written, "seconds": round(secs, 3),
            "with_image": image_dir is not None}


def _only_regular(root: Path) -> None:
    for d, dirs, names in os.walk(root):
        for n in [*dirs, *names]:
            p = Path(d) / n
            mode = os.lstat(p).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise WrongState(f"archive holds '{p.relative_to(root)}', which is not a regular file")


def import_(store: Store, src: IO[bytes], *, name: str | None, images: Path,
            hypervisor_problem: Callable[[str], str | None], progress: Progress) -> tuple[Snapshot, dict[str, Any]]:
    """Unpack, check everything, then make the snapshot visible (one rename)."""
    if name is not None:
        util.validate_name(name, "snapshot name")
    t0 = time.monotonic()
    sid = store.new_id()
    tmp = store.root / f".import-{sid}"
    with store.building(sid) as building:  # holds snap-<sid>.lock: recovery leaves tmp alone
        tmp.mkdir(0o700)
        try:
            zstd = _tool(["zstd", "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert zstd.stdout is not None and zstd.stdin is not None
            tar = _tool(["tar", "-x", "--no-same-owner", "--no-same-permissions", "--delay-directory-restore",
                         "-C", str(tmp), "-f", "-"], stdin=zstd.stdout)
            zstd.stdout.close()
            feeder_error: list[BaseException] = []

            def feed() -> None:
                try:
                    _pump(src, zstd.stdin, progress, "importing")  # type: ignore[arg-type]
                except BrokenPipeError:
                    pass
                except BaseException as e:  # reported after the tools said why
                    feeder_error.append(e)
                finally:
                    with contextlib.suppress(OSError):
                        zstd.stdin.close()  # type: ignore[union-attr]

            th = threading.Thread(target=feed, daemon=True)
            th.start()
            th.join()
            _check(zstd, "zstd (reading the archive)")
            _check(tar, "tar (unpacking the archive)")
            if feeder_error:
                raise feeder_error[0]
            util.crashpoint("import:unpacked")
            snap, image = _checked(tmp, name, images, hypervisor_problem, progress, store.check_name_free)
            t_checked = time.monotonic()
            # Visible from here: the image first (content-addressed: an existing one is kept),
            # then the snapshot.
            if image is not None:
                final_img = images / image[1]
                if not final_img.exists():
                    os.rename(image[0], final_img)
                    util.fsync_dir(images)
            from vmfork.forkvm.copier import fsync_tree

            sdir = tmp / TOP / "snapshot"
            snap.id = sid
            util.atomic_write_json(sdir / META, snap.to_json(), durable=False)
            fsync_tree(sdir, parent=False)
            for f in os.listdir(sdir):  # into the .tmp-<sid> that is renamed into place
                os.rename(sdir / f, building / f)
            util.fsync_dir(building)
            shutil.rmtree(tmp, ignore_errors=True)
            with store.lock():
                store.check_name_free(snap.name)
                os.rename(building, store.root / sid)
                util.fsync_dir(store.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    snap.dir = store.root / sid
    secs = time.monotonic() - t0
    progress(f"imported '{snap.name}' ({sid}) in {secs:.2f}s")
    return snap, {"seconds": round(secs, 3), "check_s": round(t_checked - t0, 3)}


def _checked(tmp: Path, name: str | None, images: Path, hypervisor_problem: Callable[[str], str | None],
             progress: Progress, name_free: Callable[[str], None]) -> tuple[Snapshot, tuple[Path, str] | None]:
    top = tmp / TOP
    if not (top / "snapshot").is_dir() or not (top / EXPORT_META).is_file():
        raise WrongState("not a vmfork snapshot archive (no vmfork-snapshot/snapshot/ in it)")
    _only_regular(tmp)
    extra = set(os.listdir(top / "snapshot")) - SNAPSHOT_NAMES
    if extra:
        raise WrongState(f"archive holds unknown snapshot files: {', '.join(sorted(extra))[:200]}")
    try:
        meta = util.read_json(top / EXPORT_META)
        snap = Snapshot.from_json(util.read_json(top / "snapshot" / META), top / "snapshot")
    except (OSError, ValueError, TypeError) as e:
        raise WrongState(f"archive metadata is unreadable: {e}") from None
    if name is not None:
        snap.name = name
    util.validate_name(snap.name, "snapshot name")
    name_free(snap.name)  # fail before the digests are read (checked again at the commit)
    problem = hypervisor_problem(snap.hypervisor)
    if problem:
        raise WrongState(f"snapshot '{snap.name}' needs hypervisor '{snap.hypervisor}', not usable here: {problem}")
    progress("checking digests")
    for f in FILES:
        want = snap.files.get(f, {})
        got = file_digest(top / "snapshot" / f)
        if got != {"size": want.get("size"), "digest": want.get("digest")}:
            raise WrongState(f"archive is corrupt: snapshot file {f} does not match its recorded digest")
    from vmfork.instances import integrity

    bad = integrity.problem(top / "snapshot", snap.memory_mib << 20)
    if bad:
        raise WrongState(f"archive is corrupt: {bad}")
    image: tuple[Path, str] | None = None
    from vmfork.images import load_image

    try:
        load_image(images, snap.image_digest)
        have_image = True
    except Exception:
        have_image = False
    if not have_image:
        img = meta.get("image") if isinstance(meta, dict) else None
        if not img:
            raise WrongState(f"snapshot '{snap.name}' needs guest image {snap.image_digest[:16]}, which is not "
                             "on this host: export it with --with-image") from None
        for rel, want in dict(img.get("files", {})).items():
            p = top / "image" / rel
            if not p.resolve().is_relative_to((top / "image").resolve()) or not p.is_file() \
                    or file_digest(p) != want:
                raise WrongState(f"archive is corrupt: image file {rel} does not match its recorded digest")
        dirname = str(img.get("dir", ""))
        if not dirname or "/" in dirname or dirname.startswith("."):
            raise InvalidArgument("archive names an invalid image dir")
        image = (top / "image", dirname)
    return snap, image
