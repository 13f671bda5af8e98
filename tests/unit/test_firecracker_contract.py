"""The Firecracker backend against Firecracker's API contract — no Firecracker, no VM.

Two halves:

- ``SpecValidator``: built from Firecracker's own OpenAPI descriptions (v1.12.1 and v1.16.1,
  read from ``../shared/specs/`` beside the repo; tests that need one skip when it is absent). It checks
  each recorded request's path (templates with their path parameters), method and JSON body
  (``$ref``s resolved into ``#/definitions``; objects closed to unknown fields, as Firecracker's
  serde structs are), and each answer's status and body against the declared responses.
  ``order_violations`` replays each VMM process's requests through the rules Firecracker
  enforces (pre-boot configuration only before the VM starts, ``/snapshot/load`` only on a
  fresh process, ``PATCH /vm`` and ``/snapshot/create`` only after start, the latter only while
  paused, nothing after a failed load) plus vmfork's own (a ``Diff`` only with dirty-page
  tracking on).
- the real backend (``vmfork.hypervisor.firecracker``), and in one test the real manager,
  spawning ``tests/fc_api_double.py`` — a test double of Firecracker's API on a real unix
  socket — through their real spawn / wait-for-socket / HTTP code, then validating everything
  the double recorded. Every backend test runs twice: against a double speaking v1.12.1 and
  validated against the v1.12.1 description, and against one speaking v1.16.1 (validated
  against v1.16.1).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]
from jsonschema import Draft4Validator  # type: ignore[import-untyped, unused-ignore]

from tests.fc_api_double import (
    GUEST_WRITES,
    build_state,
    make_fake_firecracker,
    parse_state,
    read_log,
    read_page,
)
from vmfork.errors import HypervisorError, WrongState
from vmfork.forkvm import (
    clone_tree,
)
from vmfork.hypervisor import fc_vmstate, get_hypervisor
from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.firecracker import AGENT_PORT, VSOCK_UDS, FirecrackerHypervisor
from vmfork.images import Image
from vmfork.instances.manager import _guest_skip
from vmfork.layout import GuestDir
from vmfork.procs import ProcRef

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO.parent / "shared" / "specs"
VERSIONS = {"1.12.1": "6.0.0", "1.16.1": "8.0.0"}  # Firecracker version: its snapshot format version
MEM_MIB = 8


# =============================================================================================
# The validator, built from the spec file
# =============================================================================================
class _Yaml12Loader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """YAML 1.2 booleans only: the spec's Logger level enum lists ``Off``, which YAML 1.1
    (PyYAML's default) would turn into ``false``."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _closed(schema: Any) -> Any:
    """Objects with declared properties accept no others (Firecracker: serde deny_unknown_fields)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@dataclass
class Operation:
    template: str
    method: str
    regex: re.Pattern[str]
    op: dict[str, Any]


class SpecValidator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.version = str(spec["info"]["version"])
        self.definitions = _closed(spec["definitions"])
        self.operations: list[Operation] = []
        for template, item in spec["paths"].items():
            pattern = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            shared = item.get("parameters", [])
            for method, op in item.items():
                if method == "parameters":
                    continue
                op = dict(op, parameters=[*shared, *op.get("parameters", [])])
                self.operations.append(Operation(template, method.upper(), re.compile(pattern), op))

    @classmethod
    def load(cls, path: Path) -> SpecValidator:
        return cls(yaml.load(path.read_text(), Loader=_Yaml12Loader))  # a SafeLoader

    def _schema_errors(self, schema: dict[str, Any], value: Any) -> list[str]:
        root = {**_closed(schema), "definitions": self.definitions}
        return [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
                for e in sorted(Draft4Validator(root).iter_errors(value), key=str)]

    def operation(self, method: str, path: str) -> tuple[Operation | None, dict[str, str], str]:
        matches = [(o, m) for o in self.operations if (m := o.regex.match(path))]
        if not matches:
            return None, {}, f"{method} {path}: no such path in the API"
        for o, m in matches:
            if o.method == method:
                return o, m.groupdict(), ""
        allowed = sorted({o.method for o, _ in matches})
        return None, {}, f"{method} {path}: method not allowed (the API has {', '.join(allowed)})"

    def check_request(self, method: str, path: str, body: Any) -> list[str]:
        o, params, err = self.operation(method, path)
        if o is None:
            return [err]
        errors = []
        body_param = None
        for p in o.op["parameters"]:
            if p.get("in") == "path":
                value = params.get(p["name"])
                if p.get("required") and not value:
                    errors.append(f"{method} {o.template}: path parameter {p['name']} missing")
                if value is not None and p.get("type", "string") != "string":
                    errors.append(f"{method} {o.template}: path parameter {p['name']} is not a {p['type']}")
            elif p.get("in") == "body":
                body_param = p
        if body_param is None:
            if body is not None:
                errors.append(f"{method} {o.template} takes no body, got {body!r}")
        elif body is None:
            if body_param.get("required"):
                errors.append(f"{method} {o.template}: the body is required")
        else:
            errors += [f"{method} {path}: {e}" for e in self._schema_errors(body_param["schema"], body)]
        return errors

    def check_response(self, method: str, path: str, status: int, body: Any) -> list[str]:
        o, _, err = self.operation(method, path)
        if o is None:
            return [] if status == 400 else [f"{err}, yet answered {status}"]
        responses = o.op["responses"]
        declared = responses.get(status, responses.get(str(status), responses.get("default")))
        if declared is None:
            return [f"{method} {o.template}: status {status} is not declared"]
        schema = declared.get("schema")
        if schema is None:
            return [] if body is None else [f"{method} {o.template} {status}: no body declared, got {body!r}"]
        if body is None:
            return [f"{method} {o.template} {status}: a body is declared, got none"]
        return [f"{method} {o.template} {status}: {e}" for e in self._schema_errors(schema, body)]


# The order Firecracker enforces (src/vmm/src/rpc_interface.rs: PrebootApiController and
# RuntimeApiController; docs/snapshotting/snapshot-support.md).
BOOT_RESOURCES = [  # configuring one of these rules out a later /snapshot/load ("boot_path")
    ("PUT", r"/boot-source"), ("PUT", r"/machine-config"), ("PATCH", r"/machine-config"),
    ("PUT", r"/drives/[^/]+"), ("PUT", r"/network-interfaces/[^/]+"), ("PUT", r"/pmem/[^/]+"),
    ("PUT", r"/vsock"), ("PUT", r"/balloon"), ("PUT", r"/entropy"), ("PUT", r"/mmds/config"),
    ("PUT", r"/hotplug/memory"),
]
PRE_BOOT_ONLY = [*BOOT_RESOURCES, ("PUT", r"/logger"), ("PUT", r"/metrics"), ("PUT", r"/serial"),
                 ("PUT", r"/cpu-config"), ("PUT", r"/snapshot/load")]
POST_BOOT_ONLY = [("PATCH", r"/vm"), ("PUT", r"/snapshot/create"), ("PATCH", r"/drives/[^/]+"),
                  ("PATCH", r"/network-interfaces/[^/]+"), ("PATCH", r"/balloon"),
                  ("PATCH", r"/balloon/statistics"), ("PATCH", r"/hotplug/memory")]


def _is(rules: list[tuple[str, str]], method: str, path: str) -> bool:
    return any(method == m and re.fullmatch(rx, path) for m, rx in rules)


@dataclass
class VmmModel:
    started: bool = False
    paused: bool = False
    boot_path: bool = False
    boot_source: bool = False
    tracking: bool = False
    dead: bool = False


def order_violations(requests: list[dict[str, Any]]) -> list[str]:
    """Replay each VMM process's requests (in order) through Firecracker's ordering rules."""
    out: list[str] = []
    models: dict[int, VmmModel] = {}
    for r in requests:
        s = models.setdefault(r["pid"], VmmModel())
        method, path, body = r["method"], r["path"], r.get("body") or {}
        what = f"pid {r['pid']}: {method} {path}"
        ok = r.get("status", 204) < 400
        start = method == "PUT" and path == "/actions" and body.get("action_type") == "InstanceStart"
        if s.dead:
            out.append(f"{what}: sent after a failed /snapshot/load ended the process")
        if (_is(PRE_BOOT_ONLY, method, path) or start) and s.started:
            out.append(f"{what}: pre-boot only, but the VM already started")
        if _is(POST_BOOT_ONLY, method, path) and not s.started:
            out.append(f"{what}: only after the VM started")
        if path == "/snapshot/load" and s.boot_path:
            out.append(f"{what}: a snapshot load after boot-specific configuration")
        if start and not s.boot_source:
            out.append(f"{what}: InstanceStart without a boot source")
        if path == "/snapshot/create" and s.started and not s.paused:
            out.append(f"{what}: a snapshot of a running (not paused) VM")
        if path == "/snapshot/create" and body.get("snapshot_type") == "Diff" and not s.tracking:
            out.append(f"{what}: a Diff snapshot without dirty-page tracking (vmfork's rule)")
        if not ok:
            s.dead = s.dead or path == "/snapshot/load"
            continue
        if _is(BOOT_RESOURCES, method, path):
            s.boot_path = True
        if path == "/boot-source":
            s.boot_source = True
        if path == "/machine-config" and "track_dirty_pages" in body:
            s.tracking = bool(body["track_dirty_pages"])
        if start:
            s.started = True
        if path == "/snapshot/load":
            s.started, s.paused = True, not body.get("resume_vm", False)
            s.tracking = bool(body.get("track_dirty_pages") or body.get("enable_diff_snapshots"))
        if method == "PATCH" and path == "/vm":
            s.paused = body.get("state") == "Paused"
    return out


def contract_errors(validator: SpecValidator, log: Path) -> list[str]:
    requests = [r for r in read_log(log) if r["kind"] == "request"]
    assert requests, "the double recorded no request"
    errors: list[str] = []
    for r in requests:
        errors += validator.check_request(r["method"], r["path"], r["body"])
        errors += validator.check_response(r["method"], r["path"], r["status"], r["response"])
    return errors + order_violations(requests)


_VALIDATORS: dict[str, SpecValidator] = {}


def validator_for(version: str) -> SpecValidator:
    path = SPECS / f"firecracker-v{version}.yaml"
    if not path.is_file():
        pytest.skip(f"Firecracker API spec not found at {path} (it is kept beside the repo, "
                    "in ../shared/specs/, not in it)")
    if version not in _VALIDATORS:
        _VALIDATORS[version] = SpecValidator.load(path)
    return _VALIDATORS[version]


@pytest.fixture(params=list(VERSIONS), ids=[f"v{v}" for v in VERSIONS])
def fc_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def validator(fc_version: str) -> SpecValidator:
    return validator_for(fc_version)


# =============================================================================================
# The validator checks itself
# =============================================================================================
def test_validator_is_built_from_the_spec() -> None:
    validator = validator_for("1.16.1")
    assert validator.version == "1.16.1"
    ok = [
        ("GET", "/", None),
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0"}),
        ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": True}),
        ("PUT", "/drives/data", {"drive_id": "data", "path_on_host": "disk.raw", "is_root_device": False,
                                 "is_read_only": False}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "run/vsock.sock"}),
        ("PUT", "/serial", {"serial_out_path": "logs/console.log"}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m"}),
        ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"},
                                   "track_dirty_pages": True, "resume_vm": False,
                                   "vsock_override": {"uds_path": "run/vsock.sock"},
                                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap0"}]}),
        ("PUT", "/logger", {"level": "Off"}),  # only valid when "Off" stays a string (YAML 1.2)
    ]
    for method, path, body in ok:
        assert validator.check_request(method, path, body) == [], (method, path)
    bad: list[tuple[str, str, Any, str]] = [
        ("PUT", "/snapshot/restore", {}, "no such path"),
        ("GET", "/snapshot/create", None, "method not allowed"),
        ("PUT", "/drives/data", {"drive_id": "data", "path_on_host": "disk.raw"}, "'is_root_device' is a required"),
        ("PUT", "/drives/data", {"drive_id": "data", "is_root_device": False, "read_only": True}, "Additional properties"),
        ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 256}, "less than the minimum"),
        ("PUT", "/machine-config", {"vcpu_count": "1", "mem_size_mib": 256}, "is not of type 'integer'"),
        ("PUT", "/snapshot/create", {"snapshot_type": "Partial", "snapshot_path": "s", "mem_file_path": "m"}, "is not one of"),
        ("PUT", "/snapshot/load", {"mem_backend": {"backend_type": "File", "backend_path": "m"}}, "'snapshot_path' is a required"),
        ("PUT", "/snapshot/load", {"snapshot_path": "s", "vsock_override": {"path": "x"}}, "'uds_path' is a required"),
        ("PATCH", "/vm", {"state": "Stopped"}, "is not one of"),
        ("PUT", "/actions", None, "the body is required"),
        ("GET", "/version", {"x": 1}, "takes no body"),
    ]
    for method, path, body, expected in bad:
        errors = validator.check_request(method, path, body)
        assert any(expected in e for e in errors), (method, path, body, errors)
    assert validator.check_response("GET", "/", 200, {"app_name": "Firecracker", "id": "x", "state": "Paused",
                                                      "vmm_version": "1.16.1"}) == []
    assert validator.check_response("PUT", "/vsock", 204, None) == []
    assert validator.check_response("PUT", "/vsock", 400, {"fault_message": "no"}) == []
    assert validator.check_response("GET", "/", 200, {"state": "Asleep"})  # missing fields, bad enum
    assert validator.check_response("PUT", "/vsock", 204, {"unexpected": 1})


def test_v1_12_1_validator_refuses_what_the_real_v1_12_1_refused() -> None:
    """The three rejections issue 10 met on the real v1.12.1 binary, seen by its spec."""
    v = validator_for("1.12.1")
    assert v.version == "1.12.1"
    assert any("no such path" in e for e in v.check_request("PUT", "/serial", {"serial_out_path": "c"}))
    load = {"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}, "resume_vm": False}
    assert any("track_dirty_pages" in e for e in v.check_request("PUT", "/snapshot/load",
                                                                 load | {"track_dirty_pages": True}))
    assert any("vsock_override" in e for e in v.check_request(
        "PUT", "/snapshot/load", load | {"vsock_override": {"uds_path": "run/vsock.sock"}}))
    assert v.check_request("PUT", "/snapshot/load", load | {"enable_diff_snapshots": True}) == []
    v16 = validator_for("1.16.1")  # still accepted there (deprecated), as is the new name
    assert v16.check_request("PUT", "/snapshot/load", load | {"enable_diff_snapshots": True}) == []
    assert v16.check_request("PUT", "/snapshot/load", load | {"track_dirty_pages": True}) == []


def test_dialects_across_the_supported_range() -> None:
    from vmfork.hypervisor.firecracker_api import UnsupportedVersion, dialect_for

    shapes = {v: (d.serial_endpoint, d.load_tracking_field, d.vsock_override, d.diff_snapshot_safe(4096))
              for v in ("1.12.1", "1.13.0", "1.14.2", "1.15.0", "1.16.1") for d in [dialect_for(v)]}
    assert shapes == {
        "1.12.1": (False, "enable_diff_snapshots", False, False),
        "1.13.0": (False, "track_dirty_pages", False, False),
        "1.14.2": (True, "track_dirty_pages", False, False),
        "1.15.0": (True, "track_dirty_pages", False, True),
        "1.16.1": (True, "track_dirty_pages", True, True),
    }
    assert dialect_for("v1.12.0-dev").diff_snapshot_safe(3072)  # one memory slot: fine everywhere
    for bad in ("1.11.0", "1.17.0", "2.0.0"):
        with pytest.raises(UnsupportedVersion, match=r"supports Firecracker 1\.12 to 1\.16"):
            dialect_for(bad)
    with pytest.raises(UnsupportedVersion, match="cannot read a Firecracker version"):
        dialect_for("Firecracker")


def _req(pid: int, method: str, path: str, body: Any = None, status: int = 204) -> dict[str, Any]:
    return {"pid": pid, "method": method, "path": path, "body": body, "status": status}


def test_order_rules_catch_what_firecracker_refuses() -> None:
    boot = [_req(1, "PUT", "/boot-source", {"kernel_image_path": "k"}),
            _req(1, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8, "track_dirty_pages": True}),
            _req(1, "PUT", "/actions", {"action_type": "InstanceStart"})]
    assert order_violations(boot) == []
    cases = {
        "after boot-specific configuration": [boot[0], _req(1, "PUT", "/snapshot/load", {"snapshot_path": "s"})],
        "pre-boot only": [*boot, _req(1, "PUT", "/drives/x", {})],
        "only after the VM started": [_req(1, "PATCH", "/vm", {"state": "Paused"})],
        "without a boot source": [_req(1, "PUT", "/actions", {"action_type": "InstanceStart"})],
        "not paused": [*boot, _req(1, "PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"})],
        "without dirty-page tracking": [
            _req(1, "PUT", "/snapshot/load", {"snapshot_path": "s"}),
            _req(1, "PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m"})],
        "ended the process": [_req(1, "PUT", "/snapshot/load", {"snapshot_path": "s"}, status=400),
                              _req(1, "GET", "/")],
    }
    for expected, reqs in cases.items():
        assert any(expected in v for v in order_violations(reqs)), (expected, order_violations(reqs))
    # a serial console may be configured before a load; processes are judged separately
    assert order_violations([_req(1, "PUT", "/serial", {"serial_out_path": "c"}),
                             _req(1, "PUT", "/snapshot/load", {"snapshot_path": "s"}),
                             _req(2, "PUT", "/boot-source", {"kernel_image_path": "k"}),
                             _req(1, "PATCH", "/vm", {"state": "Resumed"})]) == []


# =============================================================================================
# The backend against the test double
# =============================================================================================
@dataclass
class Env:
    root: Path
    exe: Path
    log: Path
    image: Image
    hv: FirecrackerHypervisor
    guests: list[GuestDir] = field(default_factory=list)

    def guest(self, iid: str, cid: int = 3) -> GuestDir:
        g = GuestDir(self.root / "guests" / iid)
        g.ensure_dirs()
        g.metadata.write_text(json.dumps({"id": iid, "cid": cid}))
        with open(g.disk, "wb") as f:
            f.truncate(1 << 20)
        self.guests.append(g)
        return g

    def cfg(self, iid: str, name: str = "vm") -> VMConfig:
        return VMConfig(hypervisor="firecracker", memory_mib=MEM_MIB, vcpus=1, accel="kvm",
                        image_digest=self.image.digest, cmdline=self.hv.kernel_cmdline("kvm", name),
                        vmm_version=self.hv.version(), id=iid)

    def records(self, kind: str = "request", pid: int | None = None) -> list[dict[str, Any]]:
        return [r for r in read_log(self.log) if r["kind"] == kind and (pid is None or r["pid"] == pid)]

    # what the manager does around save() and restore()
    def standby(self, g: GuestDir, cfg: VMConfig, proc: ProcRef) -> None:
        g.snapshot_tmp.mkdir(parents=True)
        self.hv.save(g, cfg, proc, g.snapshot_tmp)
        shutil.rmtree(g.snapshot_base, ignore_errors=True)  # merged into the new snapshot, or superseded
        (g.snapshot_tmp / "config.json").write_text(json.dumps(cfg.to_json()))
        os.rename(g.snapshot_tmp, g.snapshot_latest)

    def restore(self, g: GuestDir, cfg: VMConfig) -> ProcRef:
        os.rename(g.snapshot_latest, g.restoring)
        proc = self.hv.restore(g, cfg, self.image, g.restoring).proc
        os.rename(g.restoring, g.snapshot_base)  # restore_consumes_snapshot=False
        return proc


def _fake_image(d: Path) -> Image:
    from vmfork.images import build as _build

    d.mkdir(parents=True)
    for name in _build.IMAGE_FILES:
        (d / name).write_bytes(b"not a real " + name.encode())
    digest = hashlib.sha256(b"fake image").hexdigest()
    (d / _build.MANIFEST).write_text(json.dumps({"digest": digest, "kernel_version": "fake"}))
    return Image(digest=digest, dir=d, kernel_version="fake", manifest={"digest": digest})


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fc_version: str) -> Iterator[Env]:
    exe = make_fake_firecracker(tmp_path / "bin", version=fc_version, snapshot_version=VERSIONS[fc_version])
    log = tmp_path / "fc-requests.jsonl"
    monkeypatch.setenv("FC_DOUBLE_LOG", str(log))
    monkeypatch.delenv("FC_DOUBLE_FAULTS", raising=False)
    monkeypatch.delenv("FC_DOUBLE_ABSOLUTE_PATHS", raising=False)
    monkeypatch.delenv("FC_DOUBLE_DIE_AFTER_START", raising=False)
    e = Env(tmp_path, exe, log, _fake_image(tmp_path / "images" / "fake"), FirecrackerHypervisor(str(exe)))
    yield e
    for g in e.guests:
        try:
            d = json.loads(g.vmm_json.read_text())
            ref = ProcRef(int(d["pid"]), int(d["start"]))
        except (OSError, ValueError):
            continue
        ref.kill(timeout=2)


def guest_writes(g: GuestDir, pages: dict[int, str]) -> None:
    """Make 'the guest' of the double dirty these pages before its next pause."""
    (g.path / GUEST_WRITES).write_text(json.dumps({str(k): v for k, v in pages.items()}))


def fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest()


def test_capabilities_and_command_line(env: Env) -> None:
    caps = env.hv.capabilities
    assert (caps.file_backed_memory, caps.restore_consumes_snapshot) == (False, False)
    line = env.hv.kernel_cmdline("kvm", "web-1").split()
    assert {"console=ttyS0", "reboot=k", "panic=1", "pci=off", "vmfork.hostname=web-1",
            f"vmfork.agent_port={AGENT_PORT}"} <= set(line)
    assert env.hv.version() in VERSIONS and env.hv.snapshot_version() == VERSIONS[env.hv.version()]


def test_binary_from_env_and_missing_binary(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMFORK_FIRECRACKER_BIN", str(env.exe))
    hv = get_hypervisor("firecracker")
    assert isinstance(hv, FirecrackerHypervisor) and hv.binary == str(env.exe) and hv.available() is None
    missing = FirecrackerHypervisor(str(tmp_path / "nowhere" / "firecracker"))
    reason = missing.available()
    assert reason and "not found" in reason and "VMFORK_FIRECRACKER_BIN" in reason
    from vmfork.hypervisor import firecracker as fc_mod

    # after the env: the project's tools dir (make setup), before PATH
    tools = tmp_path / "tools"
    make_fake_firecracker(tools, version="1.12.1", snapshot_version="6.0.0")
    monkeypatch.setattr(fc_mod, "TOOLS_BIN", tools)
    assert FirecrackerHypervisor().binary == str(env.exe)  # the env still wins
    monkeypatch.delenv("VMFORK_FIRECRACKER_BIN")
    hv = FirecrackerHypervisor()
    assert (hv.binary, hv.source, hv.version()) == (str(tools / "firecracker"), "the project's tools dir", "1.12.1")
    monkeypatch.setattr(fc_mod, "TOOLS_BIN", tmp_path / "no-tools")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    reason = str(FirecrackerHypervisor().available())
    assert "firecracker (PATH) not found" in reason and "make setup" in reason and "--firecracker-bin" in reason


def test_a_firecracker_outside_the_range_is_refused(tmp_path: Path) -> None:
    for version in ("1.11.2", "1.17.0"):
        hv = FirecrackerHypervisor(str(make_fake_firecracker(tmp_path / version, version=version)))
        reason = hv.available()
        assert reason and f"Firecracker {version} is not supported" in reason and "1.12 to 1.16" in reason


def test_each_version_gets_its_own_request_shapes(env: Env, validator: SpecValidator) -> None:
    """Boot, Full, restore (load), Diff: what was sent depends on the version the VMM told."""
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    proc = env.hv.boot(g, cfg, env.image)
    env.standby(g, cfg, proc)
    proc = env.restore(g, cfg)
    env.standby(g, cfg, proc)
    reqs = env.records()
    paths = [(r["method"], r["path"]) for r in reqs]
    assert paths.count(("GET", "/version")) == 2  # once per VMM process
    loads = [r["body"] for r in reqs if r["path"] == "/snapshot/load"]
    assert len(loads) == 1 and all(r["status"] < 400 for r in reqs)
    if env.hv.version() == "1.12.1":
        assert ("PUT", "/serial") not in paths
        assert loads[0]["enable_diff_snapshots"] is True and "track_dirty_pages" not in loads[0]
        assert "vsock_override" not in loads[0]
        assert b"InstanceStart" in g.vmm_log.read_bytes()  # the console went to stdout: logs/vmm.log
    else:
        assert paths.count(("PUT", "/serial")) == 2
        assert loads[0]["track_dirty_pages"] is True and "enable_diff_snapshots" not in loads[0]
        assert loads[0]["vsock_override"] == {"uds_path": VSOCK_UDS}
        assert b"InstanceStart" in g.console_log.read_bytes()
    assert cfg.snapshot_type == "Diff"
    assert contract_errors(validator, env.log) == []


def test_no_diff_of_a_guest_over_3_gib_before_v1_15(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Firecracker < 1.15 wrote corrupt Diffs of guests with two memory slots (#5705): Full instead."""
    monkeypatch.setenv("FC_DOUBLE_LOG", str(tmp_path / "log.jsonl"))
    for version, want in (("1.14.0", "Full"), ("1.15.0", "Diff")):
        exe = make_fake_firecracker(tmp_path / version, version=version, snapshot_version="7.0.0")
        e = Env(tmp_path / f"e{version}", exe, tmp_path / "log.jsonl", _fake_image(tmp_path / f"img{version}"),
                FirecrackerHypervisor(str(exe)))
        g = e.guest("src000000001")
        cfg = e.cfg("src000000001")
        cfg.memory_mib = 3100
        e.standby(g, cfg, e.hv.boot(g, cfg, e.image))
        proc = e.restore(g, cfg)
        e.standby(g, cfg, proc)
        assert cfg.snapshot_type == want, version
        assert (g.snapshot_latest / "memory").stat().st_size == 3100 << 20


@pytest.mark.parametrize("fc_version", ["1.12.1"])
def test_without_vsock_override_a_state_naming_another_socket_is_refused(env: Env, tmp_path: Path) -> None:
    """The fallback before v1.16 (no vsock_override) holds only for a relative uds_path: a
    state naming a socket elsewhere is refused after the load, and nothing runs."""
    assert not env.hv.dialect().vsock_override
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    env.standby(g, cfg, env.hv.boot(g, cfg, env.image))
    state = g.snapshot_latest / "state"
    _, version, content = parse_state(state.read_bytes())
    content["vsock"]["uds_path"] = str(tmp_path / "somewhere-else.sock")
    state.write_bytes(build_state(version, content))
    os.rename(g.snapshot_latest, g.restoring)
    with pytest.raises(HypervisorError, match=r"without binding .*run/vsock\.sock.*refusing to run it"):
        env.hv.restore(g, cfg, env.image, g.restoring)
    pid = json.loads(g.vmm_json.read_text())["pid"]
    assert not ProcRef.of(pid).alive() if Path(f"/proc/{pid}").exists() else True


def test_boot_full_restore_diff_lifecycle(env: Env, validator: SpecValidator) -> None:
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001", "src")
    proc = env.hv.boot(g, cfg, env.image)
    assert proc.alive() and env.hv.status(g, proc) == "running"
    assert g.vmm_json.is_file() and (g.path / VSOCK_UDS).exists()
    with env.hv.agent(g, 5) as agent:  # hybrid vsock CONNECT 52, then the agent protocol
        agent.ping()
    assert os.getpgid(proc.pid) == proc.pid  # its own process group

    guest_writes(g, {7: "before the first standby"})
    env.standby(g, cfg, proc)
    assert not proc.alive()
    snap = g.snapshot_latest
    assert cfg.snapshot_type == "Full" and cfg.snapshot_version == VERSIONS[cfg.vmm_version]
    assert cfg.vmm_version == env.hv.version()
    assert (snap / "memory").stat().st_size == MEM_MIB << 20
    assert read_page(snap / "memory", 7) == b"before the first standby"
    fc_vmstate.verify((snap / "state").read_bytes())  # our CRC64 agrees with the double's

    proc = env.restore(g, cfg)
    assert env.hv.status(g, proc) == "running"
    base_ino = (g.snapshot_base / "memory").stat().st_ino
    guest_writes(g, {5: "after the restore"})
    env.standby(g, cfg, proc)
    assert cfg.snapshot_type == "Diff"
    mem = g.snapshot_latest / "memory"
    assert mem.stat().st_ino == base_ino  # merged in place: only the dirty pages were written
    assert read_page(mem, 0).startswith(b"booted by fake firecracker")  # from the Full, kept
    assert read_page(mem, 7) == b"before the first standby"
    assert read_page(mem, 5) == b"after the restore"
    assert not g.snapshot_base.exists() and not (g.run / "fc-base.json").exists()

    snaps = env.records("event")
    assert [(e["type"], e["existed"]) for e in snaps if e["event"] == "snapshot"] == [("Full", False), ("Diff", True)]
    # every path the backend sent is relative to the guest dir, or inside the shared image dir
    for r in env.records():
        for value in _strings(r["body"]):
            if "/" in value and value.startswith("/"):
                assert value.startswith(str(env.image.dir)), (r["path"], value)
    assert contract_errors(validator, env.log) == []


def _strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def _clone(env: Env, src: GuestDir, iid: str, cid: int) -> GuestDir:
    """What the manager's fork does: clone the guest dir (no run/, logs/, snapshot-base)."""
    dst = GuestDir(src.path.parent / iid)
    clone_tree(src.path, dst.path, skip=_guest_skip)
    dst.ensure_dirs()
    dst.metadata.write_text(json.dumps({"id": iid, "cid": cid}))
    env.guests.append(dst)
    return dst


def _opened_by(env: Env, pid: int) -> list[str]:
    return [e["path"] for e in env.records("event", pid) if e["event"] == "open"]


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-state", "absolute-state"])
def test_fork_restore_gets_its_own_files_and_never_touches_the_source(
    env: Env, validator: SpecValidator, monkeypatch: pytest.MonkeyPatch, absolute: bool
) -> None:
    """absolute-state: the double writes absolute paths into state files (as a VMM configured
    with absolute paths would); the fork's restore must rewrite them to the fork's dir."""
    if absolute:
        monkeypatch.setenv("FC_DOUBLE_ABSOLUTE_PATHS", "1")
    src = env.guest("src000000001", cid=3)
    scfg = env.cfg("src000000001", "src")
    env.standby(src, scfg, env.hv.boot(src, scfg, env.image))
    src_state = (src.snapshot_latest / "state").read_bytes()
    _, _, embedded = parse_state(src_state)
    assert (str(src.disk) in json.dumps(embedded)) == absolute
    before = {f: fingerprint(src.snapshot_latest / f) for f in ("memory", "state")} | {"disk": fingerprint(src.disk)}

    fork = _clone(env, src, "frk000000002", cid=4)
    fcfg = VMConfig.from_json(json.loads((fork.snapshot_latest / "config.json").read_text()))
    fcfg.id = "frk000000002"
    proc = env.restore(fork, fcfg)
    fork_state = (fork.snapshot_base / "state").read_bytes()
    if absolute:
        assert fork_state != src_state and str(fork.disk).encode() in fork_state
        assert str(src.path).encode() not in fork_state
        fc_vmstate.verify(fork_state)
    else:
        assert fork_state == src_state  # nothing in it names an instance: no rewrite needed
    load = next(r for r in env.records(pid=proc.pid) if r["path"] == "/snapshot/load")["body"]
    if env.hv.dialect().vsock_override:
        assert load["vsock_override"] == {"uds_path": VSOCK_UDS}
    else:  # the fallback: the relative uds_path in the state, bound in the fork's own dir
        assert "vsock_override" not in load and (fork.path / VSOCK_UDS).is_socket()
    assert load["mem_backend"]["backend_path"] == "snapshots/.restoring/memory"
    opened = _opened_by(env, proc.pid)
    assert opened and all(p.startswith((str(fork.path) + "/", str(env.image.dir) + "/")) for p in opened), opened
    assert str(fork.disk) in opened and str(fork.path / VSOCK_UDS) in opened

    guest_writes(fork, {9: "fork only"})
    env.standby(fork, fcfg, proc)
    assert fcfg.snapshot_type == "Diff"
    assert read_page(fork.snapshot_latest / "memory", 9) == b"fork only"
    after = {f: fingerprint(src.snapshot_latest / f) for f in ("memory", "state")} | {"disk": fingerprint(src.disk)}
    assert after == before

    sproc = env.restore(src, scfg)  # the source still restores, and knows nothing of the fork
    guest_writes(src, {3: "source again"})
    env.standby(src, scfg, sproc)
    assert read_page(src.snapshot_latest / "memory", 9) == b""
    assert read_page(src.snapshot_latest / "memory", 3) == b"source again"
    assert contract_errors(validator, env.log) == []


def test_diff_never_writes_into_a_shared_mem_file(env: Env, tmp_path: Path) -> None:
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    env.standby(g, cfg, env.hv.boot(g, cfg, env.image))
    proc = env.restore(g, cfg)
    other = tmp_path / "other-instance-memory"
    os.link(g.snapshot_base / "memory", other)  # a second link: someone else's snapshot
    shared = fingerprint(other)
    guest_writes(g, {11: "dirty"})
    env.standby(g, cfg, proc)
    assert cfg.snapshot_type == "Diff"
    assert fingerprint(other) == shared  # the other link saw nothing
    mem = g.snapshot_latest / "memory"
    assert mem.stat().st_ino != shared[0] and mem.stat().st_nlink == 1
    assert read_page(mem, 11) == b"dirty" and read_page(mem, 0).startswith(b"booted")


def test_diff_never_writes_into_a_mem_file_another_process_maps(env: Env) -> None:
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    env.standby(g, cfg, env.hv.boot(g, cfg, env.image))
    proc = env.restore(g, cfg)
    base = g.snapshot_base / "memory"
    mapper = subprocess.Popen(
        [sys.executable, "-c", "import mmap,sys,time\n"
         "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
         "print('mapped',flush=True); time.sleep(60)", str(base)],
        stdout=subprocess.PIPE,
    )
    try:
        assert mapper.stdout is not None and mapper.stdout.readline().strip() == b"mapped"
        ino, sha = fingerprint(base)
        guest_writes(g, {12: "dirty"})
        env.standby(g, cfg, proc)
        mem = g.snapshot_latest / "memory"
        assert mem.stat().st_ino != ino
        assert read_page(mem, 12) == b"dirty"
        maps = Path(f"/proc/{mapper.pid}/map_files")
        mapped = [p for p in maps.iterdir() if os.stat(p).st_ino == ino]
        assert mapped and hashlib.sha256(mapped[0].read_bytes()).hexdigest() == sha
    finally:
        mapper.kill()
        mapper.wait()


def test_diff_only_onto_the_mem_file_this_vmm_was_restored_from(env: Env) -> None:
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    env.standby(g, cfg, env.hv.boot(g, cfg, env.image))
    proc = env.restore(g, cfg)
    base = g.snapshot_base / "memory"
    stranger = base.with_name("stranger")
    stranger.write_bytes(base.read_bytes())
    os.replace(stranger, base)  # same content, another file: not what the VM maps
    env.standby(g, cfg, proc)
    assert cfg.snapshot_type == "Full"
    # a cold boot forgets any base
    proc = env.restore(g, cfg)
    assert g.snapshot_base.exists()
    env.hv.quit(g, proc)
    proc = env.hv.boot(g, cfg, env.image)
    assert not (g.run / "fc-base.json").exists()  # (the manager removes the base dir itself)
    g.snapshot_tmp.mkdir()
    env.hv.save(g, cfg, proc, g.snapshot_tmp)
    assert cfg.snapshot_type == "Full"


# --- errors: Firecracker's fault_message reaches the user verbatim ---------------------------------
FAULT = "Create snapshot error: Cannot write memory file: No space left on device (os error 28) [double]"


def test_failed_snapshot_create_reports_fault_verbatim_and_resumes(
    env: Env, validator: SpecValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    env.standby(g, cfg, env.hv.boot(g, cfg, env.image))
    proc = env.restore(g, cfg)
    monkeypatch.setenv("FC_DOUBLE_FAULTS", json.dumps({"PUT /snapshot/create": FAULT}))
    # the fault knob is read at process start: restart the VMM on the same snapshot
    env.hv.quit(g, proc)
    os.rename(g.snapshot_base, g.snapshot_latest)
    proc = env.restore(g, cfg)
    g.snapshot_tmp.mkdir()
    with pytest.raises(HypervisorError) as ei:
        env.hv.save(g, cfg, proc, g.snapshot_tmp)
    assert FAULT in str(ei.value) and "guest left running" in str(ei.value)
    assert proc.alive() and env.hv.status(g, proc) == "running"
    assert list(g.snapshot_tmp.iterdir()) == []
    assert not (g.run / "fc-base.json").exists()  # a Diff may have half-merged into it: never reused
    tail = [(r["method"], r["path"], r["status"]) for r in env.records(pid=proc.pid) if r["method"] != "GET"][-3:]
    assert tail == [("PATCH", "/vm", 204), ("PUT", "/snapshot/create", 400), ("PATCH", "/vm", 204)]
    assert contract_errors(validator, env.log) == []


def test_failed_boot_and_load_report_fault_verbatim(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    boot_fault = "Boot source error: The kernel file cannot be opened: Permission denied (os error 13) [double]"
    monkeypatch.setenv("FC_DOUBLE_FAULTS", json.dumps({"PUT /boot-source": boot_fault}))
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    with pytest.raises(HypervisorError) as ei:
        env.hv.boot(g, cfg, env.image)
    assert boot_fault in str(ei.value)
    pid = json.loads(g.vmm_json.read_text())["pid"]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]

    monkeypatch.delenv("FC_DOUBLE_FAULTS")
    env.standby(g, cfg, env.hv.boot(g, cfg, env.image))
    load_fault = "Load snapshot error: Failed to restore from snapshot: Invalid data version: 7.0.0 [double]"
    monkeypatch.setenv("FC_DOUBLE_FAULTS", json.dumps({"PUT /snapshot/load": load_fault}))
    os.rename(g.snapshot_latest, g.restoring)
    with pytest.raises(HypervisorError) as ei:
        env.hv.restore(g, cfg, env.image, g.restoring)
    assert load_fault in str(ei.value)
    assert all((g.restoring / f).is_file() for f in ("memory", "state"))  # the snapshot is whole


def test_restore_refuses_a_state_it_cannot_point_at_this_instance(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FC_DOUBLE_ABSOLUTE_PATHS", "1")
    src = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    env.standby(src, cfg, env.hv.boot(src, cfg, env.image))
    fork = _clone(env, src, "frk000000002", cid=4)
    state = fork.snapshot_latest / "state"
    data = bytearray(state.read_bytes())
    data[20] ^= 0xFF  # a damaged state: its checksum no longer matches
    state.write_bytes(bytes(data))
    os.rename(fork.snapshot_latest, fork.restoring)
    with pytest.raises(HypervisorError, match="CRC64 mismatch"):
        env.hv.restore(fork, env.cfg("frk000000002"), env.image, fork.restoring)
    assert not fork.vmm_json.exists()  # refused before any VMM was started


# --- snapshot format compatibility --------------------------------------------------------------
def test_check_snapshot_compat_follows_firecracker_rules(env: Env, tmp_path: Path) -> None:
    hv = FirecrackerHypervisor(str(make_fake_firecracker(tmp_path / "v9", version="1.17.0", snapshot_version="9.2.0")))

    def cfg(snapshot_version: str | None, vmm_version: str = "1.16.1") -> VMConfig:
        return VMConfig("firecracker", 8, 1, "kvm", "d", "", vmm_version, id="x",
                        snapshot_version=snapshot_version or "")

    hv.check_snapshot_compat(cfg("9.0.0"), "web")  # older minor: Firecracker loads it
    hv.check_snapshot_compat(cfg("9.2.7"), "web")  # any patch
    with pytest.raises(WrongState, match=r"format v8\.0\.0.*reads format v9\.2\.0.*different major"):
        hv.check_snapshot_compat(cfg("8.0.0"), "web")
    with pytest.raises(WrongState, match=r"newer than the v9\.2\.0"):
        hv.check_snapshot_compat(cfg("9.3.0"), "web")
    with pytest.raises(WrongState, match=r"written by firecracker 1\.16\.1, this is 1\.17\.0"):
        hv.check_snapshot_compat(cfg(None), "web")  # not recorded: same Firecracker version only
    hv.check_snapshot_compat(cfg(None, "1.17.0"), "web")


# --- the manager's lifecycle, end to end against the double ----------------------------------
def test_manager_run_standby_fork_restore_against_the_double(
    env: Env, validator: SpecValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmfork.images import load_image
    from vmfork.instances import manager as mgr_mod

    monkeypatch.setenv("VMFORK_FIRECRACKER_BIN", str(env.exe))
    # The double is a Python script run from this checkout, not a VMM: confining it (its own
    # uid, a root holding /usr and the guest dir only) would hide its interpreter and code.
    monkeypatch.setenv("VMFORK_CONFINE", "0")
    data = env.root / "data"
    m = mgr_mod.Manager(data)
    img_dir = m.dd.images / env.image.digest[:16]
    env.image.dir.rename(img_dir)
    image = load_image(m.dd.images, env.image.digest)
    monkeypatch.setattr(mgr_mod, "ensure_image", lambda *a, **k: image)
    monkeypatch.setattr(mgr_mod, "resolve_accel", lambda *a, **k: ("kvm", "test double"))
    try:
        src = m.run("src", memory_mib=MEM_MIB, hypervisor="firecracker")
        assert m.status(src).state == "running"
        guest_writes(src.g, {20: "source"})
        m.standby("src")
        fork, _ = m.fork("src", "f1")
        assert fork.cid != src.cid
        m.restore("f1")  # the fork's hostname is set through the (fake) agent
        names = [e["name"] for e in env.records("event") if e["event"] == "set-hostname"]
        assert names == ["f1"]
        assert (fork.g.snapshot_base / "memory").is_file()  # kept for the next Diff
        before = fingerprint(src.g.snapshot_latest / "memory")
        guest_writes(fork.g, {21: "fork"})
        m.standby("f1")
        assert fingerprint(src.g.snapshot_latest / "memory") == before
        cfg = json.loads((fork.g.snapshot_latest / "config.json").read_text())
        assert cfg["snapshot_type"] == "Diff" and cfg["vmm_version"] == env.hv.version()
        assert read_page(fork.g.snapshot_latest / "memory", 20) == b"source"
        assert read_page(fork.g.snapshot_latest / "memory", 21) == b"fork"
        m.rm("f1")
        m.restore("src")
        assert m.describe(m.find("src"), detail=True)["state"] == "running"
        m.fork("src", "f2", from_running=True)  # standby (Diff), clone, restore both
        assert m.status(m.find("src")).state == "running" and m.status(m.find("f2")).state == "running"
        assert read_page(m.find("f2").g.snapshot_base / "memory", 21) == b""
    finally:
        for inst in m.instances():
            m.rm(inst.name, force=True)
    assert contract_errors(validator, env.log) == []


@pytest.mark.parametrize("fc_version", ["1.12.1"])
def test_a_failed_run_names_the_vmms_own_error_and_keeps_its_log(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM dies after InstanceStart (the double logs what the real v1.12.1 logged on this
    host): the error carries Firecracker's own lines, the log is kept, the instance is gone."""
    monkeypatch.setenv("VMFORK_CONFINE", "0")  # the double is a script of the checkout, not a VMM
    from vmfork.errors import AgentError
    from vmfork.images import load_image
    from vmfork.instances import manager as mgr_mod

    monkeypatch.setenv("VMFORK_FIRECRACKER_BIN", str(env.exe))
    monkeypatch.setenv("FC_DOUBLE_DIE_AFTER_START", "0.5")
    m = mgr_mod.Manager(env.root / "data")
    env.image.dir.rename(m.dd.images / env.image.digest[:16])
    image = load_image(m.dd.images, env.image.digest)
    monkeypatch.setattr(mgr_mod, "ensure_image", lambda *a, **k: image)
    monkeypatch.setattr(mgr_mod, "resolve_accel", lambda *a, **k: ("kvm", "test double"))
    with pytest.raises(AgentError) as ei:
        m.run("dies", memory_mib=MEM_MIB, hypervisor="firecracker")
    msg = str(ei.value)
    assert "the firecracker VMM stopped before the guest agent answered after boot" in msg
    assert "fc_vcpu 0: Received KVM_EXIT_INTERNAL_ERROR signal" in msg
    assert "\n" not in msg and "2026-12-01T" not in msg  # one line, no timestamps
    kept = Path(msg.rsplit("(VMM log kept in ", 1)[1].rstrip(")"))
    assert kept.parent == m.dd.root / "failed-runs" and b"KVM_EXIT_INTERNAL_ERROR" in kept.read_bytes()
    assert m.instances() == [] and [p.name for p in m.dd.guests.iterdir()] == []


def test_api_socket_wait_fails_fast_when_the_vmm_dies(env: Env, tmp_path: Path) -> None:
    dying = tmp_path / "bin2" / "firecracker"
    dying.parent.mkdir()
    dying.write_text("#!/bin/sh\necho 'Error: this firecracker dies at once' >&2\nexit 1\n")
    dying.chmod(0o755)
    hv = FirecrackerHypervisor(str(dying))
    g = env.guest("src000000001")
    t0 = time.monotonic()
    with pytest.raises(HypervisorError, match=r"exited before its API socket answered.*dies at once"):
        hv.boot(g, env.cfg("src000000001"), env.image)
    assert time.monotonic() - t0 < 5


def test_double_state_framing_matches_the_documented_layout() -> None:
    data = build_state("8.0.0", {"drives": []})
    assert int.from_bytes(data[:8], "little") == 0x0710_1984_8664_0000
    assert data[8:16] == (5).to_bytes(8, "little") and data[16:21] == b"8.0.0"
    assert fc_vmstate.crc64(data) == 0  # the trailer is the CRC of all before it
    fc_vmstate.verify(data)


# --- live snapshot (named snapshots, issue 12) ------------------------------------------------------
def test_live_snapshot_pauses_writes_full_and_resumes(env: Env, validator: SpecValidator) -> None:
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    proc = env.hv.boot(g, cfg, env.image)
    live = g.snapshots / ".live-snapshot"
    live.mkdir(parents=True)
    seen: list[str] = []
    saved = env.hv.snapshot_live(g, cfg, proc, live, while_paused=lambda: seen.append(env.hv.status(g, proc)))
    assert seen == ["paused"]  # the manager's clones happen while the guest is paused
    assert proc.alive() and env.hv.status(g, proc) == "running"  # and it runs on
    assert (live / "state").is_file() and (live / "memory").is_file()
    assert cfg.snapshot_type == "Full" and saved.phases["pause_s"] >= 0
    tail = [(r["method"], r["path"], r["status"]) for r in env.records(pid=proc.pid) if r["method"] != "GET"][-3:]
    assert tail == [("PATCH", "/vm", 204), ("PUT", "/snapshot/create", 204), ("PATCH", "/vm", 204)]
    assert contract_errors(validator, env.log) == []
    env.hv.quit(g, proc)


def test_a_guest_with_a_nic_gets_its_tap_before_boot_and_nothing_on_load(env: Env, validator: SpecValidator) -> None:
    """vmfork.network: ``PUT /network-interfaces/eth0`` (the TAP's fixed name, the guest's fixed
    MAC) before InstanceStart, checked against the spec; a restore overrides nothing, since
    the TAP has the same name in every instance's namespace."""
    g = env.guest("src000000001")
    cfg = env.cfg("src000000001")
    cfg.tap, cfg.mac = "tap0", "06:00:ac:10:00:02"
    proc = env.hv.boot(g, cfg, env.image)
    env.standby(g, cfg, proc)
    env.restore(g, cfg)
    reqs = env.records()
    paths = [(r["method"], r["path"]) for r in reqs]
    nic = paths.index(("PUT", "/network-interfaces/eth0"))
    assert nic < paths.index(("PUT", "/actions"))
    assert reqs[nic]["body"] == {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}
    load = next(r["body"] for r in reqs if r["path"] == "/snapshot/load")
    assert "network_overrides" not in load
    assert all(r["status"] < 400 for r in reqs)
    assert contract_errors(validator, env.log) == []
