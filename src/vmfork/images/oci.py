"""OCI images in: skopeo speaks the registry protocol (Docker v2 and OCI manifests, an index
resolved to linux/amd64, gzip/zstd layers, digests verified, bearer auth, the Docker/Podman
credential files), umoci unpacks the layers as an OCI runtime does (whiteouts, opaque dirs).

Everything here works in a temp dir the caller gives; ``store`` commits the result."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmfork.errors import (
    ExternalToolError,
    ImageError,
    InvalidArgument,
    NoSpace,
    RegistryError,
    RegistryNotFound,
    WrongPlatform,
)

Progress = Callable[[str], None]

ARCH = "amd64"
OS = "linux"
DEFAULT_REGISTRY = "docker.io"
LAYOUT_TAG = "img"
_REF = re.compile(r"^[a-z0-9][a-z0-9._/:@+-]*$", re.IGNORECASE)
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
IMPORT_TRANSPORTS = ("oci-archive:", "oci:", "docker-archive:")


@dataclass(frozen=True)
class Ref:
    """A normalised registry reference: ``host[:port]/repo:tag`` or ``host/repo@sha256:...``."""

    host: str
    repo: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        return f"{self.host}/{self.repo}" + (f"@{self.digest}" if self.digest else f":{self.tag}")

    @property
    def local(self) -> bool:
        return self.host.rsplit(":", 1)[0] in _LOCAL_HOSTS or self.host in _LOCAL_HOSTS


def parse_ref(text: str) -> Ref:
    """Parse a Docker-style reference (``alpine``, ``127.0.0.1:5000/x/y:tag``, ``r/x@sha256:...``)."""
    text = text.strip().removeprefix("docker://")
    if not text or not _REF.match(text) or "//" in text or text.endswith(("/", ":", "@")):
        raise InvalidArgument(f"invalid image reference {text!r}")
    name, _, digest = text.partition("@")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise InvalidArgument(f"invalid digest in image reference {text!r}: use @sha256:<64 hex>")
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, rest
    else:
        host, repo = DEFAULT_REGISTRY, name
        if "/" not in repo:
            repo = f"library/{repo}"
    if not repo or repo != repo.lower():
        raise InvalidArgument(f"invalid image reference {text!r}: the repository must be lower case")
    return Ref(host=host, repo=repo, tag=tag or ("" if digest else "latest"), digest=digest)


def import_source(text: str) -> str:
    """Check a local source (``oci-archive:F``, ``oci:DIR[:tag]``, ``docker-archive:F``)."""
    if not text.startswith(IMPORT_TRANSPORTS):
        raise InvalidArgument(f"invalid import source {text!r}: use oci-archive:FILE, oci:DIR[:TAG] "
                              "or docker-archive:FILE")
    path = text.split(":", 1)[1]
    if text.startswith("oci:") and ":" in path and not Path(path).exists():
        path = path.rsplit(":", 1)[0]
    if not path or not Path(path).exists():
        raise InvalidArgument(f"import source {text!r}: {path or '(no path)'} does not exist")
    return text


# ------------------------------------------------------------------------- skopeo


def _skopeo_message(stderr: str) -> str:
    """skopeo's own words on one line (its fatal ``msg="..."``, unquoted)."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    for line in reversed(lines):
        m = re.search(r'level=fatal msg="((?:[^"\\]|\\.)*)"', line)
        if m:
            return m.group(1).encode().decode("unicode_escape", errors="replace")
    return " | ".join(lines[-3:]) or "failed"


def _run_streaming(argv: list[str], tool: str, progress: Progress) -> None:
    """Run a tool, its stdout lines to ``progress``; failure → its own message, on one line."""
    try:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LC_ALL": "C"}) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            for line in proc.stdout:
                if line.strip():
                    progress(f"{tool}: {line.strip()}")
            err = proc.stderr.read()
            rc = proc.wait()
    except FileNotFoundError as exc:
        raise ExternalToolError(tool, f"{argv[0]} not found (run 'make setup')") from exc
    if rc != 0:
        raise ExternalToolError(tool, _skopeo_message(err) if tool == "skopeo" else
                                " | ".join(err.strip().splitlines()[-3:]) or f"exit status {rc}")


def authfile() -> str | None:
    """REGISTRY_AUTH_FILE, else ~/.docker/config.json if present (skopeo also reads its own
    ${XDG_RUNTIME_DIR}/containers/auth.json when given none)."""
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return env
    docker = Path.home() / ".docker" / "config.json"
    return str(docker) if docker.is_file() else None


def copy_to_layout(src: str, layout: Path, progress: Progress, *, insecure: bool = False) -> None:
    """skopeo copy ``src`` (a transport:ref) into the OCI layout dir ``layout`` (tag ``img``)."""
    argv = ["skopeo", "--override-os", OS, "--override-arch", ARCH, "copy", "--quiet=false"]
    if src.startswith("docker://"):
        if insecure:
            argv.append("--src-tls-verify=false")
        auth = authfile()
        if auth:
            argv += ["--src-authfile", auth]
    argv += [src, f"oci:{layout}:{LAYOUT_TAG}"]
    try:
        _run_streaming(argv, "skopeo", progress)
    except ExternalToolError as e:
        if not src.startswith("docker://") or e.tool_message.endswith("(run 'make setup')"):
            raise
        raise registry_error(e.tool_message) from None


# The registry's answers that mean "no such image" (Docker v2 / OCI distribution error codes).
_NOT_FOUND = re.compile(r"manifest unknown|name unknown|no image found in manifest list|"
                        r"\b404 \(Not Found\)", re.IGNORECASE)


def registry_error(message: str) -> ExternalToolError | NoSpace:
    """What a failed pull from a registry was: no such image (the caller's mistake), no
    space here (ours), else the registry's failure (unreachable, refused, bad data)."""
    if "no space left on device" in message:
        return NoSpace(f"skopeo failed: {message}")
    if _NOT_FOUND.search(message):
        return RegistryNotFound("skopeo", message)
    return RegistryError("skopeo", message)


# -------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class LayoutImage:
    manifest_digest: str  # sha256:<hex> of the manifest as stored
    manifest: dict[str, Any]
    config: dict[str, Any]  # the image config (architecture, os, config: {Env, Cmd, ...})

    @property
    def size(self) -> int:
        return sum(int(x.get("size", 0)) for x in self.manifest.get("layers", []))


def _blob(layout: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise ImageError(f"unsupported digest {digest!r} in the image")
    return (layout / "blobs" / "sha256" / hexd).read_bytes()


def read_layout(layout: Path) -> LayoutImage:
    """The one image skopeo wrote into ``layout``; refuse another platform than linux/amd64."""
    try:
        index = json.loads((layout / "index.json").read_text())
        desc = next(m for m in index["manifests"]
                    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == LAYOUT_TAG)
        manifest = json.loads(_blob(layout, desc["digest"]))
        config = json.loads(_blob(layout, manifest["config"]["digest"]))
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as e:
        raise ImageError(f"the pulled image is unreadable: {e}") from None
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if plat != f"{OS}/{ARCH}":
        raise WrongPlatform(f"the image is for {plat}, not {OS}/{ARCH}: vmfork guests run {OS}/{ARCH}")
    return LayoutImage(str(desc["digest"]), manifest, config)


def unpack(layout: Path, rootfs: Path, progress: Progress) -> None:
    """umoci raw unpack: the layers in order, whiteouts and opaque dirs applied as an OCI
    runtime does (no mtree, no runtime config: the user is resolved by ``resolve_user``)."""
    progress("umoci: unpacking the layers")
    _run_streaming(["umoci", "raw", "unpack", "--image", f"{layout}:{LAYOUT_TAG}", str(rootfs)], "umoci",
                   lambda _m: None)


def _image_file(rootfs: Path, rel: str) -> list[list[str]]:
    """The colon-separated lines of a file of the image (not one a symlink leads out of it)."""
    path = rootfs / rel
    root = os.path.realpath(rootfs)
    real = os.path.realpath(path)
    if not real.startswith(root + os.sep) or not os.path.isfile(real):
        return []
    with open(real, errors="replace") as f:
        return [line.rstrip("\n").split(":") for line in f.read(1 << 20).splitlines() if line and line[0] != "#"]


def resolve_user(rootfs: Path, user: str) -> dict[str, Any]:
    """``User`` (name, uid, name:group, uid:gid, ...) against the image's /etc/passwd and
    /etc/group, as runc does: {uid, gid, gids (supplementary), home}."""
    name, _, group = user.partition(":")
    passwd = [x for x in _image_file(rootfs, "etc/passwd") if len(x) >= 7]
    groups = [x for x in _image_file(rootfs, "etc/group") if len(x) >= 4]
    uid, gid, home, login = 0, 0, "/", ""
    if name:
        row = next((x for x in passwd if x[0] == name or (name.isdigit() and x[2] == name)), None)
        if row is not None:
            login, home = row[0], row[5] or "/"
            uid, gid = int(row[2]) if row[2].isdigit() else 0, int(row[3]) if row[3].isdigit() else 0
        elif name.isdigit():
            uid = int(name)
        else:
            raise ImageError(f"the image's User {user!r}: no user {name!r} in its /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((x for x in groups if x[0] == group), None)
            if grow is None or not grow[2].isdigit():
                raise ImageError(f"the image's User {user!r}: no group {group!r} in its /etc/group")
            gid = int(grow[2])
    gids = sorted({int(x[2]) for x in groups if login and x[2].isdigit() and login in x[3].split(",")} - {gid})
    return {"uid": uid, "gid": gid, "gids": gids, "home": home}


def run_spec(image_config: dict[str, Any], rootfs: Path) -> dict[str, Any]:
    """What the guest needs to start the main process: Entrypoint, Cmd, Env, WorkingDir, User
    (as written, and resolved to numbers against the image's own files)."""
    c = image_config.get("config") or {}
    env = [str(x) for x in (c.get("Env") or [])]
    names = {e.split("=", 1)[0] for e in env}
    if "PATH" not in names:
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    user = resolve_user(rootfs, str(c.get("User") or ""))
    if "HOME" not in names:
        env.append(f"HOME={user['home']}")
    return {
        "entrypoint": [str(x) for x in (c.get("Entrypoint") or [])],
        "cmd": [str(x) for x in (c.get("Cmd") or [])],
        "env": env,
        "workdir": str(c.get("WorkingDir") or "/"),
        "user": str(c.get("User") or ""),
        "uid": user["uid"],
        "gid": user["gid"],
        "gids": user["gids"],
    }
