"""Test images built with umoci (exact layer tars for the whiteout cases) and a real
registry (Debian's docker-registry, the CNCF distribution server) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tools_missing() -> str | None:
    for tool in ("skopeo", "umoci", "docker-registry", "musl-gcc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run `make setup`)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(work: Path) -> Iterator[str]:
    """A registry on 127.0.0.1 (plain HTTP, deletes enabled); yields its host:port."""
    port = free_port()
    (work / "data").mkdir(parents=True, exist_ok=True)
    conf = work / "config.yml"
    conf.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(work / "registry.log", "wb") as log, \
            subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=log, stderr=log) as proc:
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {(work / 'registry.log').read_text()}")
                time.sleep(0.05)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def probe_binary(work: Path) -> Path:
    out = work / "probe"
    if not out.exists():
        run("musl-gcc", "-static", "-Os", "-s", "-o", str(out), str(HERE / "probe.c"))
    return out


class Layer:
    """One layer tar, entries exactly as written (whiteouts included)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by write)

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> Layer:
        info.mtime = 1_700_000_000
        info.uid = info.gid = 0
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    def dir(self, path: str, mode: int = 0o755) -> Layer:
        info = tarfile.TarInfo(path)
        info.type, info.mode = tarfile.DIRTYPE, mode
        return self._add(info)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> Layer:
        info = tarfile.TarInfo(path)
        info.size, info.mode = len(data), mode
        return self._add(info, data)

    def symlink(self, path: str, target: str) -> Layer:
        info = tarfile.TarInfo(path)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        return self._add(info)

    def whiteout(self, path: str) -> Layer:
        parent, _, name = path.rpartition("/")
        return self.file(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")

    def opaque(self, dir_path: str) -> Layer:
        return self.file(f"{dir_path}/.wh..wh..opq", b"")

    def write(self, path: Path) -> Path:
        self.tar.close()
        path.write_bytes(self.buf.getvalue())
        return path


def image(layout: Path, tag: str, layers: list[Layer], *, config: dict[str, list[str] | str] | None = None,
          arch: str | None = None) -> str:
    """An OCI image ``layout:tag`` of ``layers`` (gzip, as umoci writes them) and ``config``
    (umoci config options without the --config. prefix: entrypoint, cmd, env, workingdir, user)."""
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", str(layout))
    ref = f"{layout}:{tag}"
    run("umoci", "new", "--image", ref)
    for i, layer in enumerate(layers):
        tar = layer.write(layout.parent / f"{tag}-layer{i}.tar")
        run("umoci", "raw", "add-layer", "--image", ref, str(tar))
    args: list[str] = []
    for key, value in (config or {}).items():
        for v in ([value] if isinstance(value, str) else value):
            args += [f"--config.{key}", v]
    if arch:
        args += ["--architecture", arch]
    if args:
        run("umoci", "config", "--image", ref, *args)
    return ref


def push(oci_ref: str, registry_host: str, name: str) -> str:
    """skopeo copy an OCI layout image to the test registry; returns the pullable ref."""
    dest = f"{registry_host}/{name}"
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci_ref}", f"docker://{dest}")
    return dest


def blob_paths(registry_data: Path) -> list[Path]:
    return sorted((registry_data / "docker/registry/v2/blobs/sha256").glob("*/*/data"))


def manifest_of(registry_host: str, name: str) -> dict[str, object]:
    out = run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{registry_host}/{name}")
    return dict(json.loads(out))
