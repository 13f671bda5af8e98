"""Request and response bodies of the HTTP API, shared by the server (``vmfork.api``) and
the SDK (``vmfork.client``). Field names follow the CLI's options and ``--json`` output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Exec output kept per stream in a request/response exec (the rest is counted as dropped).
MAX_EXEC_OUTPUT = 4 << 20
# A file sent or fetched through /files (the agent's frames are at most 16 MiB, argv included).
MAX_FILE_BYTES = 15 << 20
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
STATES = ("running", "standby", "stopped", "paused", "error")

State = Literal["running", "standby", "stopped", "paused", "error"]
TargetState = Literal["running", "standby", "stopped"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """RFC 9457 problem details; ``code`` is stable (see the README's table)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


class CreateInstance(_Body):
    name: str = Field(pattern=NAME_PATTERN, description="Instance name (as `vmfork run NAME`).")
    image: str = Field(default="default", description=(
        "An OCI image (ref or digest, pulled if absent, as `vmfork run --image`): its Entrypoint/Cmd "
        "runs as the main process. 'default' (or omitted): the built-in guest image."))
    memory: str = Field(default="256M", max_length=32, description="Guest RAM, e.g. 256M or 2G.")
    vcpus: int = Field(default=1, ge=1, le=32)
    hypervisor: Literal["qemu", "firecracker"] = "qemu"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    cpus: float | None = Field(default=None, gt=0, le=1024, description="CPU limit of the VMM in cores.")
    memory_limit: str | None = Field(default=None, max_length=32)
    pids_limit: int | None = Field(default=None, ge=1, le=1 << 22)
    io_weight: int | None = Field(default=None, ge=1, le=10000)
    overcommit: bool = False
    auto_standby: float | None = Field(default=None, ge=1, le=30 * 86400, description=(
        "Seconds without activity (exec, files) after which the server puts the instance in standby; "
        "an exec or file transfer then restores it first."))
    env: dict[str, str] = Field(default_factory=dict, description=(
        "With an OCI image: the main process's environment, added to the image's Env (a key given "
        "replaces the image's; as `vmfork run -e K=V`). Refused without an image: pass env to exec."))
    entrypoint: list[str] = Field(default_factory=list, description=(
        "With an OCI image: replaces its Entrypoint (and drops its Cmd), as `docker run --entrypoint`."))
    cmd: list[str] = Field(default_factory=list, description=(
        "With an OCI image: replaces its Cmd (as the arguments after `vmfork run NAME --image REF --`)."))
    workdir: str = Field(default="", description=(
        "With an OCI image: the main process's working directory (absolute; as `vmfork run -w`)."))
    network: Literal["none", "default"] | None = Field(
        default=None, description="default: a network of its own (NAT); default when publish/egress/allow is given.")
    publish: list[str] = Field(default_factory=list, max_length=64,
                               description="[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp], as `vmfork run -p`.")
    egress: Literal["allow", "deny"] = "allow"
    allow: list[str] = Field(default_factory=list, max_length=64, description="With egress deny: reachable CIDRs.")


class Instance(BaseModel):
    id: str
    name: str
    state: str
    problem: str | None = None
    hypervisor: str
    accel: str
    memory_mib: int
    vcpus: int
    pid: int | None = None
    dir: str
    created_at: str
    parent: str | None = None
    last_exit: str | None = None
    auto_standby: float | None = Field(default=None, description="Idle seconds before auto-standby, if set.")
    network: dict[str, Any] | None = Field(default=None, description="Its network (address, published ports), if any.")
    seconds: float | None = Field(default=None, description="How long the operation took.")


class InstanceDetail(Instance):
    parent_id: str | None = None
    mac: str | None = None
    vsock_cid: int | None = None
    image: str | None = None
    disk: str | None = None
    disk_allocated_bytes: int | None = None
    console_log: str | None = None
    pending: str | None = None
    snapshot: dict[str, Any] | None = None
    confinement: dict[str, Any] | None = None
    image_ref: str | None = Field(default=None, description="An OCI image instance: the image as asked for.")
    image_oci_digest: str | None = Field(default=None, description="An OCI image instance: its manifest digest.")
    main: dict[str, Any] | None = Field(default=None, description=(
        "An OCI image instance: its main process (state, pid, exit_code, argv), as the guest says."))


class ActionResult(BaseModel):
    instance: Instance
    result: str | None = None
    timings: dict[str, Any] = Field(default_factory=dict)


class StopRequest(_Body):
    force: bool = False


class StartRequest(_Body):
    overcommit: bool = False


class ForkRequest(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    from_running: bool = False
    target_state: TargetState | None = None
    count: int | None = Field(default=None, ge=1, le=100, description="Make NAME-1 ... NAME-N.")
    partial: bool = False
    overcommit: bool = False


class ForkResult(BaseModel):
    instances: list[Instance]
    timings: dict[str, Any] = Field(default_factory=dict)


class ExecRequest(_Body):
    argv: list[str] = Field(min_length=1, max_length=4096)
    stdin: str = Field(default="", description="Text fed to the command's stdin (see stdin_b64).")
    stdin_b64: str | None = Field(default=None, description="Binary stdin, base64 (instead of stdin).")
    env: dict[str, str] | None = None
    cwd: str | None = None
    timeout: float | None = Field(default=None, gt=0, le=86400)


class ExecResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    signal: int | None = None
    stdout_dropped: int = Field(default=0, description="Bytes of stdout beyond the cap, not kept.")
    stderr_dropped: int = 0
    encoding: Literal["utf-8", "base64"] = Field(
        default="utf-8", description="utf-8: stdout/stderr are text (invalid bytes replaced); "
        "base64 when asked for with ?binary=true.")
    seconds: float | None = None


class WaitResult(BaseModel):
    reached: bool
    state: str
    instance: Instance


class Stats(BaseModel):
    id: str
    name: str
    state: str
    cpu_seconds: float | None = None
    rss_bytes: int | None = None
    pss_bytes: int | None = None
    memory_bytes: int = Field(description="Guest RAM size.")
    disk_bytes: int | None = None
    disk_allocated_bytes: int | None = None
    disk_shared_bytes: int | None = None
    snapshot_allocated_bytes: int | None = None


class SnapshotCreate(_Body):
    name: str = Field(pattern=NAME_PATTERN)


class Snapshot(BaseModel):
    id: str
    name: str
    created_at: str
    source_id: str
    source_name: str
    hypervisor: str
    memory_mib: int
    vcpus: int
    accel: str
    image_digest: str
    parent_id: str | None = None
    parent_name: str | None = None
    live: bool = False
    pause_ms: float | None = None
    logical_bytes: int = 0
    dir: str
    problem: str | None = None


class SnapshotResult(BaseModel):
    snapshot: Snapshot
    timings: dict[str, Any] = Field(default_factory=dict)


class SnapshotFork(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    count: int | None = Field(default=None, ge=1, le=100)
    target_state: TargetState = "standby"
    partial: bool = False
    overcommit: bool = False


ImageStatus = Literal["pending", "pulling", "converting", "ready", "failed"]
# An image reference as `vmfork image pull` takes it (the server checks it further).
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$"


class PullImage(_Body):
    name: str = Field(min_length=1, max_length=512, pattern=REF_PATTERN, description=(
        "The image reference to pull for linux/amd64, e.g. `127.0.0.1:5000/app:1` or `alpine:3.20` "
        "(docker.io/library/ is implied), or `repo@sha256:...`."))
    insecure: bool = Field(default=False, description=(
        "Allow plain HTTP / unverified TLS for this registry (always allowed for localhost, 127.0.0.1)."))
    fs: Literal["ext4", "erofs"] = Field(default="ext4", description="The read-only root filesystem's format.")


class Image(BaseModel):
    """An OCI image (or a pull of one), or the built-in guest image (``kind`` builtin)."""

    name: str = Field(description="The normalised reference (e.g. docker.io/library/alpine:3.20), else the digest; "
                      "builtin: the digest's first 16 hex digits.")
    kind: Literal["oci", "builtin"] = "oci"
    status: ImageStatus = Field(default="ready", description=(
        "pending (waiting for another pull), pulling, converting (unpacking the layers into a root "
        "filesystem), ready, failed (see error)."))
    digest: str | None = Field(default=None, description="The manifest's digest (sha256:...), once known.")
    refs: list[str] = Field(default_factory=list, description="Every reference that names this image.")
    fs: str | None = None
    size_bytes: int | None = Field(default=None, description="Disk taken by its root filesystem.")
    compressed_size_bytes: int | None = Field(default=None, description="Its layers as pulled.")
    created_at: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] | None = None
    working_dir: str | None = None
    user: str | None = None
    used_by: list[str] = Field(default_factory=list, description="Instances and named snapshots using it.")
    dir: str | None = None
    progress: str | None = Field(default=None, description="A pull in progress: its last step (escaped).")
    error: str | None = Field(default=None, description=(
        "failed: why (the tool's own message). On a ready image: the last re-pull of this name failed "
        "and the image shown is the one from before."))
    error_code: str | None = Field(default=None, description="The problem code the error maps to (not_found, ...).")
    error_status: int | None = Field(default=None, description="The HTTP status the error maps to.")
    kernel_version: str | None = Field(default=None, description="builtin: its kernel.")
    seconds: float | None = Field(default=None, description="How long the pull took (or has taken so far).")


class Removed(BaseModel):
    removed: list[str]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    uptime_s: float


class Capabilities(BaseModel):
    hypervisors: dict[str, str | None] = Field(description="Backend name -> null if usable, else why not.")
    accel: dict[str, Any]
    reflink: bool
    filesystem: str
    features: list[str]


class Resources(BaseModel):
    cpus: int
    memory_bytes: int
    memory_available_bytes: int
    disk_bytes: int
    disk_free_bytes: int
    instances: dict[str, int]
    allocated_memory_bytes: int = Field(description="Guest RAM of the running instances.")
