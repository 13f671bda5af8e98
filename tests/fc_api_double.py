"""A TEST DOUBLE of Firecracker's HTTP API. It never runs a VM and proves nothing about one.

What it is: a stand-in ``firecracker`` executable (``make_fake_firecracker``) that the real
backend spawns exactly as it would spawn Firecracker (own process group, cwd = guest dir,
``--api-sock run/fc.sock``). It serves HTTP/1.1 on a real unix socket, keeps the state machine
Firecracker's API enforces (pre-boot configuration, ``InstanceStart``, ``/snapshot/load`` only
on a fresh process, ``PATCH /vm``, snapshots only while paused), opens the files Firecracker
would open (kernel, drives, the mem-file), binds the vsock socket, answers 204 / 200 with the
bodies the spec defines and 400 ``{"fault_message": ...}`` otherwise, and appends every request
and its answer to the JSONL file named by ``FC_DOUBLE_LOG`` for the contract validator.

What it models, and how little:
- guest RAM is a dict of 4 KiB pages over an optional MAP_PRIVATE mapping of a loaded mem-file;
  "the guest" writes page 0 at boot, and the pages listed in ``run/double-guest-writes.json``
  when it is paused (a test's way to dirty memory). ``Full`` writes every page, ``Diff`` only
  the pages dirtied since boot/load, into an existing mem-file of the right size (merged) or
  into a new one — as Firecracker does; files are sparse.
- the state file has Firecracker's documented framing (magic, version string, state, CRC64 of
  all preceding bytes, little-endian) around a made-up state: a JSON document with the drive
  and vsock paths as configured. It is synthetic; only its framing follows Firecracker.
- behind the vsock socket it answers the hybrid-vsock ``CONNECT 52`` handshake and a minimal
  guest agent (ping, set-time, sync, exec -> exit 0, poweroff) so that the manager's agent waits
  can run. Nothing is executed.

Versions: it speaks the dialect of the version it is made with (``make_fake_firecracker(version=)``),
as far as vmfork's requests go: no ``PUT /serial`` before 1.14 (the console goes to stdout),
``/snapshot/load`` refuses ``track_dirty_pages`` before 1.13 and ``vsock_override`` /
``clock_realtime`` before 1.16, with Firecracker's own messages.

Knobs (environment, inherited from the test): ``FC_DOUBLE_LOG`` (record file),
``FC_DOUBLE_FAULTS`` (JSON ``{"PUT /snapshot/create": "message"}``: answer that request with
400 and this fault_message), ``FC_DOUBLE_ABSOLUTE_PATHS=1`` (write absolute paths into state
files, as a VMM given absolute paths would), ``FC_DOUBLE_DIE_AFTER_START=SECONDS`` (that long
after ``InstanceStart`` or a load, log what a real v1.12.1 logged when its guest died on a
PVM-style KVM, and exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.server
import json
import mmap
import os
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

MAGIC_X86_64 = 0x0710_1984_8664_0000
PAGE = 4096
AGENT_PORT = 52
GUEST_WRITES = "run/double-guest-writes.json"
_U64 = struct.Struct("<Q")


# --- the documented state-file framing, implemented independently of vmfork's fc_vmstate ------
def crc64_bitwise(data: bytes) -> int:
    """CRC64 (Jones, reflected, init 0, no xorout), bit by bit: a second implementation."""
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x95AC9329AC4BC9B5 if crc & 1 else crc >> 1
    return crc


def _string(s: str) -> bytes:
    raw = s.encode()
    return _U64.pack(len(raw)) + raw


def build_state(version: str, state: dict[str, Any], *, magic: int = MAGIC_X86_64) -> bytes:
    """magic (u64 LE) | version (u64 length + bytes) | state | CRC64 (u64 LE) of all before."""
    body = _U64.pack(magic) + _string(version) + _string(json.dumps(state, sort_keys=True))
    return body + _U64.pack(crc64_bitwise(body))


class StateError(Exception):
    pass


def parse_state(data: bytes) -> tuple[int, str, dict[str, Any]]:
    if len(data) < 8 + 8 + 8:
        raise StateError("Snapshot file is smaller than CRC length.")
    body, (stored,) = data[:-8], _U64.unpack(data[-8:])
    if crc64_bitwise(body) != stored:
        raise StateError("CRC64 validation failed")
    (magic,) = _U64.unpack_from(body, 0)
    off = 8
    (n,) = _U64.unpack_from(body, off)
    version = body[off + 8: off + 8 + n].decode()
    off += 8 + n
    (n,) = _U64.unpack_from(body, off)
    state = json.loads(body[off + 8: off + 8 + n])
    return magic, version, state


# --- recording -----------------------------------------------------------------------------
def _record(entry: dict[str, Any]) -> None:
    path = os.environ.get("FC_DOUBLE_LOG")
    if not path:
        return
    entry = {"pid": os.getpid(), "t": time.time(), **entry}
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Fault(Exception):
    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.message, self.fatal = message, fatal


PRE_BOOT = "The requested operation is not supported before starting the microVM."
POST_BOOT = "The requested operation is not supported after starting the microVM."
LOAD_NOT_ALLOWED = "Loading a microVM snapshot not allowed after configuring boot-specific resources."

# Accepted fields per body (Firecracker's serde structs deny unknown fields).
FIELDS = {
    "boot-source": ({"kernel_image_path"}, {"boot_args", "initrd_path"}),
    "machine-config": ({"vcpu_count", "mem_size_mib"}, {"smt", "track_dirty_pages", "cpu_template", "huge_pages"}),
    "drive": ({"drive_id", "is_root_device"}, {"path_on_host", "is_read_only", "cache_type", "partuuid",
                                               "rate_limiter", "io_engine", "socket"}),
    "vsock": ({"guest_cid", "uds_path"}, {"vsock_id"}),
    "network-interface": ({"iface_id", "host_dev_name"}, {"guest_mac", "rx_rate_limiter", "tx_rate_limiter"}),
    "serial": (set(), {"serial_out_path", "rate_limiter"}),
    "actions": ({"action_type"}, set()),
    "vm": ({"state"}, set()),
    "snapshot-create": ({"mem_file_path", "snapshot_path"}, {"snapshot_type"}),
    "snapshot-load": ({"snapshot_path"}, {"mem_backend", "mem_file_path", "track_dirty_pages", "enable_diff_snapshots",
                                          "resume_vm", "network_overrides", "vsock_override", "clock_realtime"}),
}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("-")[0].split(".")[:3])


def _not_yet(kind: str, version: str) -> set[str]:
    """Fields the given version does not know yet (from Firecracker's CHANGELOG)."""
    v = _version_tuple(version)
    if kind != "snapshot-load":
        return set()
    out = set()
    if v < (1, 13):
        out.add("track_dirty_pages")
    if v < (1, 16):
        out |= {"vsock_override", "clock_realtime"}
    return out


def _check_fields(kind: str, body: Any, version: str = "1.16.1") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Fault("An error occurred when deserializing the json body of a request: expected a JSON object.")
    required, optional = FIELDS[kind]
    known = (required | optional) - _not_yet(kind, version)
    for k in body:
        if k not in known:
            raise Fault(f"An error occurred when deserializing the json body of a request: unknown field `{k}`, "
                        f"expected one of {', '.join(f'`{f}`' for f in sorted(known))}.")
    for k in sorted(required):
        if k not in body:
            raise Fault(f"An error occurred when deserializing the json body of a request: missing field `{k}`.")
    return body


class Memory:
    """Guest RAM: private (written) pages over an optional read-only MAP_PRIVATE mapping."""

    def __init__(self, size: int, base: str | None = None) -> None:
        self.size = size
        self.private: dict[int, bytes] = {}
        self.dirty: set[int] = set()
        self.base_map: mmap.mmap | None = None
        self.base_fd = -1
        if base is not None:
            self.base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(self.base_fd).st_size != size:
                raise Fault(f"Load snapshot error: Failed to restore from snapshot: the memory file {base} "
                            f"is not {size} bytes", fatal=True)
            self.base_map = mmap.mmap(self.base_fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)

    def write(self, idx: int, data: bytes) -> None:
        self.private[idx] = data[:PAGE].ljust(PAGE, b"\0")
        self.dirty.add(idx)

    def page(self, idx: int) -> bytes:
        if idx in self.private:
            return self.private[idx]
        if self.base_map is not None:
            return self.base_map[idx * PAGE:(idx + 1) * PAGE]
        return bytes(PAGE)

    @staticmethod
    def _data_pages(fd: int, size: int) -> set[int]:
        pages: set[int] = set()
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            pages.update(range(start // PAGE, (end + PAGE - 1) // PAGE))
            off = end
        return pages

    def dump(self, path: str, full: bool) -> None:
        existed = os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if existed and os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, 0)  # Firecracker truncates only on a size mismatch
            os.ftruncate(fd, self.size)
            if full:
                pages = set(self.private)
                if self.base_fd >= 0:
                    pages |= self._data_pages(self.base_fd, self.size)
                if existed:
                    rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        pages |= self._data_pages(rfd, self.size)
                    finally:
                        os.close(rfd)
            else:
                pages = set(self.dirty)
            for idx in sorted(pages):
                os.pwrite(fd, self.page(idx), idx * PAGE)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.dirty.clear()


class FakeFirecracker:
    def __init__(self, instance_id: str, version: str, snapshot_version: str) -> None:
        self.id, self.version, self.snapshot_version = instance_id, version, snapshot_version
        self.lock = threading.Lock()
        self.phase = "preboot"  # preboot | running | paused
        self.boot_path = False
        self.boot_source: dict[str, Any] | None = None
        self.machine: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False}
        self.drives: dict[str, dict[str, Any]] = {}
        self.drive_fds: dict[str, int] = {}
        self.vsock: dict[str, Any] | None = None
        self.vsock_listener: socket.socket | None = None
        self.serial_out: str | None = None
        self.memory: Memory | None = None
        self.track_dirty = False
        self.faults: dict[str, str] = json.loads(os.environ.get("FC_DOUBLE_FAULTS") or "{}")
        self.hostname = ""

    # --- dispatch ------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, bool]:
        """(status, JSON body or None, exit after answering)."""
        key = f"{method} {path}"
        try:
            if key in self.faults:
                raise Fault(self.faults[key], fatal=path == "/snapshot/load")
            out = self._route(method, path, body)
            return (200, out, False) if out is not None else (204, None, False)
        except Fault as f:
            return 400, {"fault_message": f.message}, f.fatal

    def _route(self, method: str, path: str, body: Any) -> Any:
        if method == "GET" and path == "/":
            state = {"preboot": "Not started", "running": "Running", "paused": "Paused"}[self.phase]
            return {"app_name": "Firecracker", "id": self.id, "state": state, "vmm_version": self.version}
        if method == "GET" and path == "/version":
            return {"firecracker_version": self.version}
        if method == "GET" and path == "/machine-config":
            return dict(self.machine)
        if method == "PUT" and path == "/boot-source":
            return self._boot_source(_check_fields("boot-source", body))
        if method == "PUT" and path == "/machine-config":
            return self._machine_config(_check_fields("machine-config", body))
        if method == "PUT" and path.startswith("/drives/") and path.count("/") == 2:
            return self._drive(path.split("/")[2], _check_fields("drive", body))
        if method == "PUT" and path == "/vsock":
            return self._vsock(_check_fields("vsock", body))
        if method == "PUT" and path.startswith("/network-interfaces/") and path.count("/") == 2:
            return self._nic(path.split("/")[2], _check_fields("network-interface", body))
        if method == "PUT" and path == "/serial" and _version_tuple(self.version) >= (1, 14):
            return self._serial(_check_fields("serial", body))
        if method == "PUT" and path in ("/logger", "/metrics"):
            self._preboot()
            return None
        if method == "PUT" and path == "/actions":
            return self._action(_check_fields("actions", body))
        if method == "PATCH" and path == "/vm":
            return self._vm(_check_fields("vm", body))
        if method == "PUT" and path == "/snapshot/create":
            return self._create(_check_fields("snapshot-create", body))
        if method == "PUT" and path == "/snapshot/load":
            return self._load(_check_fields("snapshot-load", body, self.version))
        raise Fault(f"Invalid request method and/or path: {method} {path.lstrip('/')}.")

    def _preboot(self) -> None:
        if self.phase != "preboot":
            raise Fault(POST_BOOT)

    def _opened(self, what: str, path: str) -> None:
        _record({"kind": "event", "event": "open", "what": what, "path": os.path.realpath(path)})

    # --- pre-boot configuration ----------------------------------------------------------------
    def _boot_source(self, b: dict[str, Any]) -> None:
        self._preboot()
        self.boot_path = True
        for field in ("kernel_image_path", "initrd_path"):
            if field in b and not os.path.isfile(b[field]):
                name = "kernel" if field == "kernel_image_path" else "initrd"
                raise Fault(f"Boot source error: The {name} file cannot be opened: No such file or directory (os error 2)")
        self.boot_source = b

    def _machine_config(self, b: dict[str, Any]) -> None:
        self._preboot()
        self.boot_path = True
        if not 1 <= int(b["vcpu_count"]) <= 32 or int(b["mem_size_mib"]) < 1:
            raise Fault("Machine config error: The memory size (MiB) or the vCPU number is invalid.")
        self.machine.update(b)

    def _open_drive(self, drive_id: str, path: str, read_only: bool, *, fatal: bool) -> None:
        try:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise Fault(f"Drive config error: Unable to create the virtio block device: Virtio backend error: "
                        f"Error manipulating the backing file: {e.strerror} (os error {e.errno}) {path}",
                        fatal=fatal) from None
        self.drive_fds[drive_id] = fd
        self._opened(f"drive {drive_id}", path)

    def _nic(self, iface_id: str, b: dict[str, Any]) -> None:
        """Recorded only: the double opens no TAP (the real binary's test does)."""
        self._preboot()
        self.boot_path = True
        if b["iface_id"] != iface_id:
            raise Fault(f"The id from the path [{iface_id}] does not match the id from the body [{b['iface_id']}]!")

    def _drive(self, drive_id: str, b: dict[str, Any]) -> None:
        self._preboot()
        self.boot_path = True
        if b["drive_id"] != drive_id:
            raise Fault(f"The id from the path [{drive_id}] does not match the id from the body [{b['drive_id']}]!")
        if "path_on_host" not in b:
            raise Fault("Drive config error: path_on_host is required for a virtio block device")
        self._open_drive(drive_id, b["path_on_host"], bool(b.get("is_read_only")), fatal=False)
        self.drives[drive_id] = b

    def _bind_vsock(self, uds_path: str, fatal: bool) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(uds_path)
        except OSError as e:
            s.close()
            raise Fault(f"Vsock config error: Cannot create backend for vsock device: UnixBind({e.strerror})",
                        fatal=fatal) from None
        s.listen(8)
        self.vsock_listener = s
        self._opened("vsock", uds_path)
        threading.Thread(target=self._vsock_accept, args=(s,), daemon=True).start()

    def _vsock(self, b: dict[str, Any]) -> None:
        self._preboot()
        self.boot_path = True
        if int(b["guest_cid"]) < 3:
            raise Fault("Vsock config error: invalid guest CID")
        self._bind_vsock(b["uds_path"], fatal=False)
        self.vsock = {"guest_cid": b["guest_cid"], "uds_path": b["uds_path"]}

    def _serial(self, b: dict[str, Any]) -> None:
        self._preboot()  # not a boot-specific resource: a later /snapshot/load is still allowed
        self.serial_out = b.get("serial_out_path")

    def _console(self, text: str) -> None:
        line = f"[fc_api_double pid {os.getpid()}] {text} (a test double: no guest runs)\n"
        if self.serial_out:
            with open(self.serial_out, "a") as f:
                f.write(line)
        else:  # Firecracker's default: the serial console goes to stdout
            sys.stdout.write(line)
            sys.stdout.flush()
        die = os.environ.get("FC_DOUBLE_DIE_AFTER_START")
        if die:
            threading.Thread(target=self._die, args=(float(die),), daemon=True).start()

    def _die(self, after: float) -> None:
        time.sleep(after)
        stamp = "2026-12-01T02:05:26.671307442"
        print(f"{stamp} [{self.id}:fc_vcpu 0] Received KVM_EXIT_INTERNAL_ERROR signal\n"
              f"{stamp} [{self.id}:main] Vmm is stopping.\n"
              f"{stamp} [{self.id}:main] RunWithApiError error: MicroVM stopped with an error: GenericError\n"
              "Error: RunWithApi(MicroVMStoppedWithError(GenericError))\n"
              f"{stamp} [{self.id}:main] Firecracker exiting with error. exit_code=1", flush=True)
        os._exit(1)

    # --- start, pause, snapshots ---------------------------------------------------------------
    def _action(self, b: dict[str, Any]) -> None:
        if b["action_type"] != "InstanceStart":
            if self.phase == "preboot":
                raise Fault(PRE_BOOT)
            return
        self._preboot()
        if self.boot_source is None:
            raise Fault("Start microvm error: Cannot start microvm without kernel configuration.")
        self.memory = Memory(int(self.machine["mem_size_mib"]) << 20)
        self.track_dirty = bool(self.machine.get("track_dirty_pages"))
        self.memory.write(0, f"booted by fake firecracker pid {os.getpid()} id {self.id}".encode())
        self.phase = "running"
        self._console("InstanceStart")

    def _vm(self, b: dict[str, Any]) -> None:
        if self.phase == "preboot":
            raise Fault(PRE_BOOT)
        if b["state"] == "Paused":
            if self.phase == "running":
                self._guest_writes()
            self.phase = "paused"
        elif b["state"] == "Resumed":
            self.phase = "running"
        else:
            raise Fault(f"An error occurred when deserializing the json body of a request: unknown variant `{b['state']}`")

    def _guest_writes(self) -> None:
        path = Path(GUEST_WRITES)
        if not path.exists() or self.memory is None:
            return
        for idx, text in json.loads(path.read_text()).items():
            self.memory.write(int(idx), text.encode())
        path.unlink()

    def _path(self, p: str) -> str:
        return os.path.abspath(p) if os.environ.get("FC_DOUBLE_ABSOLUTE_PATHS") == "1" else p

    def _create(self, b: dict[str, Any]) -> None:
        if self.phase == "preboot":
            raise Fault(PRE_BOOT)
        if self.phase != "paused":
            raise Fault("Create snapshot error: Cannot save the microVM state: The microVM must be paused.")
        assert self.memory is not None
        kind = b.get("snapshot_type", "Full")
        state = {
            "machine": {k: self.machine[k] for k in ("vcpu_count", "mem_size_mib")},
            "drives": [{"drive_id": d, "path_on_host": self._path(v["path_on_host"]),
                        "is_read_only": bool(v.get("is_read_only"))} for d, v in sorted(self.drives.items())],
            "vsock": None if self.vsock is None else {"guest_cid": self.vsock["guest_cid"],
                                                      "uds_path": self._path(self.vsock["uds_path"])},
            "written_by": os.getpid(),
        }
        with open(b["snapshot_path"], "wb") as f:
            f.write(build_state(self.snapshot_version, state))
            f.flush()
            os.fsync(f.fileno())
        existed = os.path.exists(b["mem_file_path"])
        self.memory.dump(b["mem_file_path"], full=kind == "Full")
        st = os.stat(b["mem_file_path"])
        _record({"kind": "event", "event": "snapshot", "type": kind, "existed": existed,
                 "mem_file": os.path.realpath(b["mem_file_path"]), "ino": st.st_ino})

    def _load(self, b: dict[str, Any]) -> None:
        if self.phase != "preboot":
            raise Fault(POST_BOOT)
        if self.boot_path:
            raise Fault(LOAD_NOT_ALLOWED)
        if ("mem_backend" in b) == ("mem_file_path" in b):
            raise Fault("Load snapshot error: exactly one of mem_backend and mem_file_path must be given")
        backend = b.get("mem_backend") or {"backend_type": "File", "backend_path": b["mem_file_path"]}
        if backend.get("backend_type") != "File":
            raise Fault("Load snapshot error: the test double serves only File memory backends", fatal=True)
        fail = "Load snapshot error: Failed to restore from snapshot: "
        try:
            with open(b["snapshot_path"], "rb") as f:
                magic, version, state = parse_state(f.read())
        except OSError as e:
            raise Fault(f"{fail}Failed to open the snapshot state file: {e.strerror}", fatal=True) from None
        except (StateError, ValueError, struct.error) as e:
            raise Fault(f"{fail}Failed to load snapshot state from file: {e}", fatal=True) from None
        if magic != MAGIC_X86_64:
            raise Fault(f"{fail}Magic value does not match arch: {magic}", fatal=True)
        ours, theirs = (tuple(int(x) for x in v.split(".")) for v in (self.snapshot_version, version))
        if theirs[0] != ours[0] or theirs[1] > ours[1]:
            raise Fault(f"{fail}Invalid data version: {version}", fatal=True)
        self.machine.update(state["machine"])
        self.memory = Memory(int(self.machine["mem_size_mib"]) << 20, backend["backend_path"])
        self._opened("memory", backend["backend_path"])
        for d in state["drives"]:
            self._open_drive(d["drive_id"], d["path_on_host"], d["is_read_only"], fatal=True)
            self.drives[d["drive_id"]] = d
        if state["vsock"] is not None:
            uds = (b.get("vsock_override") or {}).get("uds_path") or state["vsock"]["uds_path"]
            self._bind_vsock(uds, fatal=True)
            self.vsock = {"guest_cid": state["vsock"]["guest_cid"], "uds_path": uds}
        self.track_dirty = bool(b.get("track_dirty_pages") or b.get("enable_diff_snapshots"))
        self.phase = "running" if b.get("resume_vm") else "paused"
        self._console("snapshot loaded")

    # --- hybrid vsock and a minimal guest agent ---------------------------------------------------
    def _vsock_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._vsock_conn, args=(conn,), daemon=True).start()

    def _vsock_conn(self, conn: socket.socket) -> None:
        from vmfork.guest import protocol as proto

        with conn:
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            parts = line.split()
            if len(parts) != 2 or parts[0] != b"CONNECT" or int(parts[1]) != AGENT_PORT or self.phase != "running" \
                    or os.environ.get("FC_DOUBLE_DIE_AFTER_START"):  # that guest never reaches userspace
                return  # Firecracker closes a connection no guest listener accepts
            conn.sendall(b"OK 1073741824\n")
            reader = proto.FrameReader()
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                reader.feed(data)
                for fr in reader.frames():
                    conn.sendall(self._agent_reply(proto, fr))
                    if fr.type == proto.POWEROFF:
                        time.sleep(0.05)
                        os._exit(0)  # the VM is gone, and so is its VMM

    def _agent_reply(self, proto: Any, fr: Any) -> bytes:
        if fr.type == proto.PING:
            return bytes(proto.encode_frame(proto.PONG, fr.req_id, fr.payload))
        if fr.type == proto.SET_TIME:
            return bytes(proto.encode_frame(proto.TIME_SET, fr.req_id))
        if fr.type == proto.SYNC:
            return bytes(proto.encode_frame(proto.SYNCED, fr.req_id))
        if fr.type == proto.SET_HOSTNAME:
            self.hostname = bytes(fr.payload).decode()
            _record({"kind": "event", "event": "set-hostname", "name": self.hostname})
            return bytes(proto.encode_frame(proto.HOSTNAME_SET, fr.req_id))
        if fr.type == proto.POWEROFF:
            return bytes(proto.encode_frame(proto.POWERING_OFF, fr.req_id))
        if fr.type == proto.EXEC:
            _, argv, _, _, _ = proto.decode_exec(fr.payload)
            _record({"kind": "event", "event": "exec", "argv": argv})
            if argv[:1] == ["hostname"] and len(argv) == 2:
                self.hostname = argv[1]
            out = b"" if len(argv) != 1 or argv[0] != "hostname" else (self.hostname + "\n").encode()
            frames = b""
            if out:
                frames += proto.encode_frame(proto.STDOUT, fr.req_id, out)
            return bytes(frames + proto.encode_frame(proto.EXIT, fr.req_id,
                                                     proto.encode_exit(proto.ExitStatus(0, False, False, 0))))
        return bytes(proto.encode_frame(proto.ERROR, fr.req_id, b"not served by the test double"))


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fc: FakeFirecracker


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        fc = self.server.fc
        path = self.path.split("?", 1)[0]
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            status, out, fatal = 400, {"fault_message": "An error occurred when deserializing the json body "
                                                        "of a request: invalid JSON."}, False
        else:
            with fc.lock:
                status, out, fatal = fc.handle(self.command, path, body)
        _record({"kind": "request", "method": self.command, "path": path, "body": body,
                 "status": status, "response": out, "cwd": os.getcwd()})
        data = json.dumps(out).encode() if out is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        if fatal:  # as Firecracker: a failed snapshot load ends the process
            print(f"Firecracker exiting after a fatal error: {out}", flush=True)
            os._exit(1)

    do_GET = do_PUT = do_PATCH = _serve


def main(argv: list[str], *, version: str = "1.16.1", snapshot_version: str = "8.0.0") -> int:
    p = argparse.ArgumentParser(prog="firecracker (test double)")
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--version", action="store_true")
    p.add_argument("--snapshot-version", action="store_true")
    p.add_argument("--level")
    p.add_argument("--log-path")
    p.add_argument("--no-seccomp", action="store_true")
    a = p.parse_args(argv)
    if a.version:
        print(f"Firecracker v{version}\n")
        return 0
    if a.snapshot_version:
        print(f"v{snapshot_version}")
        return 0
    if os.path.exists(a.api_sock):
        print(f"Error: Failed to open the API socket at: {a.api_sock}. Check that it is not already used.",
              file=sys.stderr)
        return 1
    server = _Server(a.api_sock, _Handler)
    server.fc = FakeFirecracker(a.id, version, snapshot_version)
    print(f"Running Firecracker v{version} (test double, pid {os.getpid()})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.05)
    return 0


def make_fake_firecracker(directory: Path, *, version: str = "1.16.1", snapshot_version: str = "8.0.0",
                          name: str = "firecracker") -> Path:
    """Write an executable ``firecracker`` that runs this double; return its path."""
    repo = Path(__file__).resolve().parent.parent
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / name
    exe.write_text(
        f"#!{sys.executable}\n"
        "# A test double of Firecracker's API (tests/fc_api_double.py): it never runs a VM.\n"
        "import sys\n"
        f"sys.path[:0] = [{str(repo)!r}, {str(repo / 'src')!r}]\n"
        "from tests.fc_api_double import main\n"
        f"raise SystemExit(main(sys.argv[1:], version={version!r}, snapshot_version={snapshot_version!r}))\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def read_page(path: Path, idx: int) -> bytes:
    """Page ``idx`` of a mem-file, with trailing NULs stripped."""
    with open(path, "rb") as f:
        f.seek(idx * PAGE)
        return f.read(PAGE).rstrip(b"\0")
