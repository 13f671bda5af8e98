"""A Debian image with the packages asked for, from the Debian mirror this host's apt uses:
debootstrap --variant=minbase, then umoci makes it a real OCI image (one layer). Cached in
``~/.cache/vmfork/oci/`` per (suite, mirror, packages) between runs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vmfork.errors import ImageError, InvalidArgument
from vmfork.images.tools import run_tool
from vmfork.paths import cache_dir

Progress = Callable[[str], None]
RECIPE = 1
_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def apt_mirror() -> tuple[str, str]:
    """(mirror URL, suite) of the host's Debian main archive, from /etc/apt/sources*."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.is_file() and p.suffix in (".list", ".sources", ""):
            texts.append(p.read_text(errors="replace"))
    text = "\n".join(texts)
    for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+", text, re.M):
        if "security" not in m.group(1) and "/debian" in m.group(1):
            return m.group(1), m.group(2)
    for block in re.split(r"\n\s*\n", text):
        uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
        suites = re.search(r"^Suites:\s*(\S+)", block, re.M)
        if uris and suites and "security" not in uris.group(1) and "/debian" in uris.group(1):
            return uris.group(1), suites.group(1)
    raise ImageError("no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d")


def build(packages: list[str], *, suite: str | None = None, progress: Progress = lambda _m: None) -> Path:
    """The OCI archive of a minbase Debian with ``packages`` (built once, then cached)."""
    for p in packages:
        if not _PKG.match(p):
            raise InvalidArgument(f"invalid Debian package name {p!r}")
    mirror, host_suite = apt_mirror()
    suite = suite or host_suite
    key = hashlib.sha256(json.dumps([RECIPE, mirror, suite, sorted(set(packages))]).encode()).hexdigest()[:16]
    cache = cache_dir() / "oci"
    out = cache / f"debian-{suite}-{key}.oci.tar"
    if out.is_file():
        progress(f"debian: using the cached {out}")
        return out
    cache.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise ImageError("building a Debian image needs root (debootstrap)")
    work = Path(tempfile.mkdtemp(prefix=".debian-", dir=cache))
    try:
        layout, bundle = work / "layout", work / "bundle"
        run_tool(["umoci", "init", "--layout", str(layout)], "umoci init")
        run_tool(["umoci", "new", "--image", f"{layout}:latest"], "umoci new")
        run_tool(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], "umoci unpack")
        progress(f"debian: debootstrap --variant=minbase {suite} from {mirror} "
                 f"(+ {', '.join(packages) or 'nothing'}); takes a few minutes")
        argv = ["debootstrap", "--variant=minbase"]
        if packages:
            argv.append("--include=" + ",".join(packages))
        run_tool([*argv, suite, str(bundle / "rootfs"), mirror], "debootstrap")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            d = bundle / "rootfs" / junk
            if d.is_dir():
                for f in d.iterdir():
                    if f.is_file():
                        f.unlink()
        progress("debian: making the OCI image (umoci repack)")
        run_tool(["umoci", "repack", "--image", f"{layout}:latest", str(bundle)], "umoci repack")
        run_tool(["umoci", "config", "--image", f"{layout}:latest", "--author", "vmfork image build",
                  "--config.cmd", "/bin/bash", "--config.workingdir", "/",
                  "--config.env", "LANG=C.UTF-8"], "umoci config")
        run_tool(["umoci", "gc", "--layout", str(layout)], "umoci gc")
        tmp_tar = work / "image.oci.tar"
        run_tool(["tar", "-C", str(layout), "-cf", str(tmp_tar), "."], "tar")
        os.rename(tmp_tar, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"debian: cached {out}")
    return out
