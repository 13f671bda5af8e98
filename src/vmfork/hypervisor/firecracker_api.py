"""A thin client of Firecracker's HTTP API on its unix socket: one method per endpoint.

Method names, paths and body fields follow Firecracker's OpenAPI description
(``src/firecracker/swagger/firecracker.yaml``; the tests validate every request against
v1.12.1 and v1.16.1). Optional fields are sent only when given. A refusal (4xx/5xx) raises
FirecrackerAPIError whose message carries Firecracker's ``fault_message`` verbatim.

The request shapes differ between Firecracker versions; ``Dialect`` holds every difference
vmfork depends on, in this one place (from Firecracker's CHANGELOG, checked against the
v1.12.1 and v1.16.1 API descriptions and, for v1.12.1, against the real binary):

- ``PUT /serial`` exists from v1.14.0 (#5350). Before, the guest's serial console goes to
  the process's stdout, as Firecracker does by default.
- ``/snapshot/load`` takes ``track_dirty_pages`` from v1.13.0 (#5274), which deprecates
  ``enable_diff_snapshots``; v1.12 refuses the new name ("unknown field").
- ``/snapshot/load`` takes ``vsock_override`` from v1.16.0 (#5323).
- A ``Diff`` snapshot of a VM with more than one memory slot (x86: more than 3 GiB of RAM)
  was written corrupt before v1.15.0 (#5705).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from vmfork.errors import HypervisorError

CONFIG_TIMEOUT = 10.0  # configuration calls return at once
SNAPSHOT_TIMEOUT = 600.0  # writing or mapping guest memory can take a while


# Supported: every release 1.12.x to 1.16.x (major.minor, inclusive).
MIN_VERSION = (1, 12)
MAX_VERSION = (1, 16)
SUPPORTED = f"{MIN_VERSION[0]}.{MIN_VERSION[1]} to {MAX_VERSION[0]}.{MAX_VERSION[1]}"
SINGLE_SLOT_MIB = 3072  # x86: guest RAM above this is split into two memory slots


@dataclass(frozen=True)
class Dialect:
    """What one Firecracker version accepts, where versions differ (see the module doc)."""

    version: tuple[int, int, int]

    @property
    def serial_endpoint(self) -> bool:
        return self.version >= (1, 14, 0)

    @property
    def load_tracking_field(self) -> str:
        return "track_dirty_pages" if self.version >= (1, 13, 0) else "enable_diff_snapshots"

    @property
    def vsock_override(self) -> bool:
        return self.version >= (1, 16, 0)

    def diff_snapshot_safe(self, mem_mib: int) -> bool:
        """Does this version write a correct Diff of a guest of this size?"""
        return self.version >= (1, 15, 0) or mem_mib <= SINGLE_SLOT_MIB

    @property
    def name(self) -> str:
        return ".".join(map(str, self.version))


class UnsupportedVersion(HypervisorError):
    """A Firecracker outside the supported range (or one whose version cannot be read)."""


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def dialect_for(version: str) -> Dialect:
    """The dialect of ``version`` ("1.12.1", "v1.16.1-dev"); UnsupportedVersion outside the range."""
    v = parse_version(version)
    if v is None:
        raise UnsupportedVersion(f"cannot read a Firecracker version from {version.strip()[:80]!r}; "
                                 f"vmfork supports Firecracker {SUPPORTED}")
    if not MIN_VERSION <= v[:2] <= MAX_VERSION:
        raise UnsupportedVersion(f"Firecracker {'.'.join(map(str, v))} is not supported: vmfork supports "
                                 f"Firecracker {SUPPORTED} (point --firecracker-bin or VMFORK_FIRECRACKER_BIN "
                                 "at one of those)")
    return Dialect(v)


class FirecrackerUnreachable(HypervisorError):
    """The API socket did not answer (not there yet, refused, or the connection broke)."""


class FirecrackerAPIError(HypervisorError):
    """Firecracker answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        self.method, self.path, self.status, self.fault_message = method, path, status, fault_message
        super().__init__(f"Firecracker refused {method} {path} (HTTP {status}): {fault_message}")


class FirecrackerAPI:
    """One client per VMM: ``with FirecrackerAPI(sock) as api: api.patch_vm("Paused")``."""

    def __init__(self, sock: str, timeout: float = CONFIG_TIMEOUT, dialect: Dialect | None = None) -> None:
        self.sock = sock
        self.dialect = dialect  # set by negotiate(), or given by a caller that asked before
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=sock),
            base_url="http://localhost",
            timeout=timeout,
            headers={"Accept": "application/json"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirecrackerAPI:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- transport --------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        """Send one request; return the decoded JSON body (None for 204 No Content)."""
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            r = self._client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise FirecrackerUnreachable(
                f"Firecracker API socket {self.sock}: {method} {path}: {e or type(e).__name__}"
            ) from None
        if r.status_code >= 400:
            raise FirecrackerAPIError(method, path, r.status_code, _fault_message(r))
        if r.status_code == 204 or not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise HypervisorError(
                f"Firecracker answered {method} {path} with a body that is not JSON: {r.text[:200]!r}"
            ) from None

    # --- endpoints (paths and fields as in the API spec) ----------------------------------
    def describe_instance(self) -> dict[str, Any]:
        """``GET /``: InstanceInfo (app_name, id, state, vmm_version)."""
        info = self.call("GET", "/")
        if not isinstance(info, dict):
            raise HypervisorError(f"Firecracker answered GET / with {info!r}")
        return info

    def get_version(self) -> str:
        """``GET /version``: the ``firecracker_version`` string."""
        return str(self.call("GET", "/version")["firecracker_version"])

    def negotiate(self) -> Dialect:
        """Ask ``GET /version`` and keep the dialect of the answer (refuses an unsupported one)."""
        self.dialect = dialect_for(self.get_version())
        return self.dialect

    def known_dialect(self) -> Dialect:
        if self.dialect is None:
            return self.negotiate()
        return self.dialect

    def put_boot_source(self, kernel_image_path: str, *, initrd_path: str | None = None,
                        boot_args: str | None = None) -> None:
        body: dict[str, Any] = {"kernel_image_path": kernel_image_path}
        if initrd_path is not None:
            body["initrd_path"] = initrd_path
        if boot_args is not None:
            body["boot_args"] = boot_args
        self.call("PUT", "/boot-source", body)

    def put_machine_config(self, *, vcpu_count: int, mem_size_mib: int,
                           track_dirty_pages: bool | None = None, smt: bool | None = None) -> None:
        body: dict[str, Any] = {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib}
        if track_dirty_pages is not None:
            body["track_dirty_pages"] = track_dirty_pages
        if smt is not None:
            body["smt"] = smt
        self.call("PUT", "/machine-config", body)

    def put_drive(self, drive_id: str, *, path_on_host: str, is_root_device: bool,
                  is_read_only: bool) -> None:
        self.call("PUT", f"/drives/{quote(drive_id, safe='')}", {
            "drive_id": drive_id, "path_on_host": path_on_host,
            "is_root_device": is_root_device, "is_read_only": is_read_only,
        })

    def put_network_interface(self, iface_id: str, *, host_dev_name: str,
                              guest_mac: str | None = None) -> None:
        body: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": host_dev_name}
        if guest_mac is not None:
            body["guest_mac"] = guest_mac
        self.call("PUT", f"/network-interfaces/{quote(iface_id, safe='')}", body)

    def put_vsock(self, *, guest_cid: int, uds_path: str) -> None:
        self.call("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    def put_serial(self, *, serial_out_path: str) -> None:
        """``PUT /serial`` (v1.14+; callers check ``dialect.serial_endpoint`` first)."""
        if not self.known_dialect().serial_endpoint:
            raise HypervisorError(f"Firecracker {self.known_dialect().name} has no PUT /serial (v1.14+)")
        self.call("PUT", "/serial", {"serial_out_path": serial_out_path})

    def instance_start(self) -> None:
        self.call("PUT", "/actions", {"action_type": "InstanceStart"})

    def patch_vm(self, state: str) -> None:
        """``PATCH /vm`` with ``Paused`` or ``Resumed``."""
        self.call("PATCH", "/vm", {"state": state})

    def create_snapshot(self, *, snapshot_path: str, mem_file_path: str, snapshot_type: str) -> None:
        """``PUT /snapshot/create`` (``Full`` or ``Diff``); only while the VM is paused."""
        self.call("PUT", "/snapshot/create", {
            "snapshot_type": snapshot_type, "snapshot_path": snapshot_path, "mem_file_path": mem_file_path,
        }, timeout=SNAPSHOT_TIMEOUT)

    def load_snapshot(self, *, snapshot_path: str, mem_file: str, track_dirty_pages: bool,
                      resume_vm: bool, vsock_uds_path: str | None = None,
                      network_overrides: dict[str, str] | None = None) -> None:
        """``PUT /snapshot/load`` with a ``File`` memory backend; only on a fresh process.

        Dirty-page tracking is sent under the name this version takes; ``vsock_uds_path``
        only where ``vsock_override`` exists (v1.16+: callers check ``dialect.vsock_override``).
        """
        d = self.known_dialect()
        body: dict[str, Any] = {
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file},
            d.load_tracking_field: track_dirty_pages,
            "resume_vm": resume_vm,
        }
        if vsock_uds_path is not None:
            if not d.vsock_override:
                raise HypervisorError(f"Firecracker {d.name} has no vsock_override on snapshot load (v1.16+)")
            body["vsock_override"] = {"uds_path": vsock_uds_path}
        if network_overrides:
            body["network_overrides"] = [
                {"iface_id": iface, "host_dev_name": tap} for iface, tap in sorted(network_overrides.items())
            ]
        self.call("PUT", "/snapshot/load", body, timeout=SNAPSHOT_TIMEOUT)


def _fault_message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
        return str(body["fault_message"])
    text = r.text.strip()
    return text[:500] if text else r.reason_phrase or f"HTTP {r.status_code}"
