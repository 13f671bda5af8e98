"""The guest kernel: Debian's cloud kernel package, fetched with apt (never installed),
and the ELF ``vmlinux`` extracted from its bzImage."""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from vmfork.errors import ExternalToolError, ImageError
from vmfork.images.tools import run_tool
from vmfork.util import sha256_file

METAPACKAGE = "linux-image-cloud-amd64"

_APT_HINT = "run `make setup` (apt-get update) so apt knows the kernel package"


@dataclass(frozen=True)
class KernelPackage:
    name: str  # linux-image-6.1.0-NN-cloud-amd64
    version: str  # Debian version, e.g. 6.1.192-2
    sha256: str  # of the .deb, from the apt lists
    filename: str  # pool path from the apt lists
    arch: str = "amd64"

    @property
    def kernel_version(self) -> str:
        return self.name.removeprefix("linux-image-")

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _run(argv: list[str], tool: str, cwd: Path | None = None) -> str:
    """run_tool, with a hint where apt does not know the kernel package."""
    try:
        return run_tool(argv, tool, cwd)
    except ExternalToolError as e:
        if "Unable to locate package" in e.tool_message or "No packages found" in e.tool_message:
            raise ExternalToolError(tool, f"{e.tool_message}; {_APT_HINT}") from None
        raise


def resolve_kernel_package(metapackage: str = METAPACKAGE) -> KernelPackage:
    """Resolve the metapackage to the real kernel package apt would install now."""
    out = _run(["apt-cache", "depends", metapackage], "apt-cache")
    names = re.findall(r"^\s*Depends:\s*(linux-image-\S+)\s*$", out, re.MULTILINE)
    if not names:
        raise ExternalToolError(
            "apt-cache", f"{metapackage} has no linux-image dependency in the apt lists; {_APT_HINT}"
        )
    name = names[0]
    show = _run(["apt-cache", "show", "--no-all-versions", name], "apt-cache")
    fields = dict(re.findall(r"^(Version|SHA256|Filename): (\S+)$", show, re.MULTILINE))
    if not {"Version", "SHA256", "Filename"} <= fields.keys():
        raise ExternalToolError(
            "apt-cache", f"no Version/SHA256 for {name} in the apt lists; {_APT_HINT}"
        )
    return KernelPackage(name, fields["Version"], fields["SHA256"], fields["Filename"])


_APT_STATE = (Path("/var/lib/apt/lists"), Path("/etc/apt"))


def apt_state_fingerprint() -> str | None:
    """Changes whenever apt's view of the archive may change (update, sources, pins)."""
    h = hashlib.sha256()
    try:
        for root in _APT_STATE:
            for p in sorted(root.rglob("*")):
                if p.name in ("lock", "partial"):
                    continue
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return h.hexdigest()


def resolve_kernel_package_cached(cache_file: Path, metapackage: str = METAPACKAGE) -> KernelPackage:
    """:func:`resolve_kernel_package`, remembered until the apt state changes
    (apt-cache needs ~1 s here: the pkgcache is disabled on these machines)."""
    fp = apt_state_fingerprint()
    if fp is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(cache_file.read_text())
            if doc["fingerprint"] == fp and doc["metapackage"] == metapackage:
                return KernelPackage(**doc["package"])
    pkg = resolve_kernel_package(metapackage)
    if fp is not None:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({
                "fingerprint": fp,
                "metapackage": metapackage,
                "package": {"name": pkg.name, "version": pkg.version,
                            "sha256": pkg.sha256, "filename": pkg.filename},
            }))
            os.replace(tmp, cache_file)
    return pkg


def download_deb(pkg: KernelPackage, debs_dir: Path) -> Path:
    """``apt-get download`` the package into ``debs_dir`` (a cache: reused when its
    SHA-256 matches the apt lists). Safe against concurrent downloads."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    target = debs_dir / pkg.deb_name
    if target.exists() and sha256_file(target) == pkg.sha256:
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=debs_dir))
    try:
        # _apt cannot write into a private dir; apt then downloads as root and
        # warns, which is harmless.
        _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], "apt-get download", cwd=tmp)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise ImageError(f"apt-get download of {pkg.name} produced {len(got)} .deb files")
        digest = sha256_file(got[0])
        if digest != pkg.sha256:
            raise ImageError(
                f"downloaded {got[0].name} has sha256 {digest}, apt lists say {pkg.sha256}"
            )
        os.replace(got[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack_deb(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)], "dpkg-deb")


# ----------------------------------------------------------------- bzImage → ELF


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    protocol: int  # boot protocol version, e.g. 0x020f
    payload_offset: int
    payload_length: int

    @property
    def pm_start(self) -> int:
        """File offset of the protected-mode code."""
        return (self.setup_sects + 1) * 512


def parse_setup_header(data: bytes) -> SetupHeader:
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise ImageError("not an x86 bzImage (no 'HdrS' boot setup header)")
    setup_sects = data[0x1F1] or 4
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < 0x208:
        raise ImageError(f"bzImage boot protocol {protocol:#x} is too old (need >= 2.08)")
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    return SetupHeader(setup_sects, protocol, payload_offset, payload_length)


_MAGICS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),  # lz4 legacy frame, 0x184C2102 LE
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
]


def detect_compression(payload: bytes) -> str:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise ImageError(f"unknown kernel payload compression (magic {payload[:6].hex()})")


def _decompress_cli(tool: str, data: bytes) -> bytes:
    if shutil.which(tool) is None:
        raise ExternalToolError(tool, f"{tool} not found; install it (apt-get install {tool})")
    proc = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ExternalToolError(tool, proc.stderr.decode(errors="replace") or "decompression failed")
    return proc.stdout


def decompress_payload(payload: bytes) -> tuple[bytes, str]:
    """Decompress a bzImage payload; returns (data, compression name)."""
    kind = detect_compression(payload)
    # All formats but gzip get the uncompressed size appended (4 bytes LE).
    size_hint = None
    body = payload
    if kind != "gzip" and len(payload) > 4:
        (size_hint,) = struct.unpack("<I", payload[-4:])
        body = payload[:-4]
    try:
        if kind == "gzip":
            data = zlib.decompressobj(wbits=31).decompress(payload)
        elif kind == "xz":
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(body)
        elif kind == "lzma":
            data = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(body)
        elif kind == "bzip2":
            data = bz2.BZ2Decompressor().decompress(body)
        elif kind == "lz4":
            data = _decompress_cli("lz4", body)
        elif kind == "zstd":
            data = _decompress_cli("zstd", body)
        else:
            raise ImageError(f"kernel payload compression {kind} is not supported")
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise ImageError(f"cannot decompress the {kind} kernel payload: {exc}") from exc
    if size_hint is not None and size_hint != len(data):
        raise ImageError(
            f"decompressed kernel is {len(data)} bytes, the bzImage says {size_hint}"
        )
    return data, kind


def extract_vmlinux(bzimage: bytes) -> tuple[bytes, str]:
    """The uncompressed ELF vmlinux inside a bzImage; returns (elf, compression)."""
    hdr = parse_setup_header(bzimage)
    start = hdr.pm_start + hdr.payload_offset
    end = start + hdr.payload_length
    if hdr.payload_length == 0 or end > len(bzimage):
        raise ImageError(
            f"bzImage payload [{start}, {end}) lies outside the file ({len(bzimage)} bytes)"
        )
    elf, kind = decompress_payload(bzimage[start:end])
    if not elf.startswith(b"\x7fELF"):
        raise ImageError(f"decompressed kernel ({kind}) is not an ELF file")
    return elf, kind


def has_pvh_note(elf: bytes) -> bool:
    """Does the ELF carry the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18)?"""
    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1:  # ELFCLASS64, little-endian
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, off)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
