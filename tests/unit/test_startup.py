"""Start-up of the CLI: what ``--version`` and read-only commands import (their speed is
measured in ``vmfork.bench``; here only what they load, which a stray top-level import breaks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def loaded_after(argv: list[str], data: Path) -> tuple[str, set[str]]:
    """Run ``vmfork ARGV`` in a fresh interpreter; its stdout and the modules it loaded."""
    code = ("import sys, json\n"
            f"sys.argv = ['vmfork', '--data-dir', {str(data)!r}, *{argv!r}]\n"
            "from vmfork.__main__ import main\n"
            "try:\n    main()\n"
            "except SystemExit:\n    pass\n"
            "sys.stdout.flush()\n"
            "sys.stderr.write(json.dumps(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    return r.stdout.decode(), set(json.loads(r.stderr.decode().splitlines()[-1]))


def test_version_is_answered_before_click_is_imported(tmp_path: Path) -> None:
    code = ("import sys\nsys.argv = ['vmfork', '--version']\nfrom vmfork.__main__ import main\nmain()\n"
            "assert not {'click', 'rich'} & set(m.split('.')[0] for m in sys.modules), sorted(sys.modules)\n")
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    slow = subprocess.run([sys.executable, "-m", "vmfork.cli", "--version"], capture_output=True, check=True)
    assert fast.stdout == slow.stdout and fast.stdout.startswith(b"vmfork, version ")


def test_ps_json_loads_neither_rich_nor_the_image_builder_nor_the_exec_mux(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    out, mods = loaded_after(["ps", "--json"], tmp_path / "data")
    assert json.loads(out) == []
    heavy = {"rich", "vmfork.images", "vmfork.images.build", "vmfork.guest.mux", "qemu", "httpx"}
    assert not heavy & (mods | {m.split(".")[0] for m in mods}), sorted(heavy & mods)


# --- ps --json without the CLI (vmfork.fastpath) ----------------------------------------------
def _instance(root: Path, name: str, iid: str, created: str, **kw: object) -> Path:
    from vmfork.instances.model import Instance

    d = root / "guests" / iid
    for sub in ("run", "logs", "snapshots"):
        (d / sub).mkdir(parents=True)
    inst = Instance(id=iid, name=name, hypervisor="qemu", accel="tcg", memory_mib=128, vcpus=1,
                    image_digest="0" * 64, created_at=created, mac="52:54:00:00:00:01", cid=3, **kw)  # type: ignore[arg-type]
    (d / "instance.json").write_text(json.dumps(inst.to_json()))
    return d


def _snapshot(d: Path, memory_bytes: int, files: tuple[str, ...] = ("memory", "state", "config.json")) -> None:
    snap = d / "snapshots" / "snapshot-latest"
    snap.mkdir()
    for f in files:
        (snap / f).write_bytes(b"{}" if f == "config.json" else b"s")
    if "memory" in files:
        os.truncate(snap / "memory", memory_bytes)


def _record_vmm(d: Path, pid: int) -> None:
    from vmfork.procs import ProcRef

    ref = ProcRef.of(pid)
    (d / "run" / "vmm.json").write_text(json.dumps({"pid": ref.pid, "start": ref.start}))


@pytest.fixture
def states(tmp_path: Path) -> Iterator[Path]:
    """A data dir with an instance in each state: running, paused by the space watchdog,
    standby, stopped, a stale VMM record, a truncated snapshot, an incomplete one, unreadable
    metadata, a fork whose source is gone, one with a network."""
    root = tmp_path / "data"
    for sub in ("guests", "images", "locks"):
        (root / sub).mkdir(parents=True)
    live = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    dead = subprocess.Popen(["true"])
    dead_ref = (dead.pid, 0)
    try:
        _record_vmm(_instance(root, "run", "aaaaaaaaaaa1", "2026-01-01T00:00:01"), live[0].pid)
        paused = _instance(root, "paused", "aaaaaaaaaaa2", "2026-01-01T00:00:02")
        _record_vmm(paused, live[1].pid)
        rec = json.loads((paused / "run" / "vmm.json").read_text())
        (paused / "run" / "space-paused.json").write_text(json.dumps(
            {"pid": rec["pid"], "start": rec["start"], "at": "2026-01-01T00:00:09", "free_bytes": 1 << 20,
             "low_water_bytes": 64 << 20}))
        _snapshot(_instance(root, "standby", "aaaaaaaaaaa3", "2026-01-01T00:00:03"), 128 << 20)
        _instance(root, "stopped", "aaaaaaaaaaa4", "2026-01-01T00:00:04")
        stale = _instance(root, "stale", "aaaaaaaaaaa5", "2026-01-01T00:00:05")
        dead.wait()
        (stale / "run" / "vmm.json").write_text(json.dumps({"pid": dead_ref[0], "start": 1}))
        _snapshot(_instance(root, "trunc", "aaaaaaaaaaa6", "2026-01-01T00:00:06"), 64 << 20)
        _snapshot(_instance(root, "nocfg", "aaaaaaaaaaa7", "2026-01-01T00:00:07"), 128 << 20, ("memory", "state"))
        bad = _instance(root, "bad", "aaaaaaaaaaa8", "2026-01-01T00:00:08")
        (bad / "instance.json").write_text('{"name": "bad", "memory_mib": ')
        _snapshot(_instance(root, "orphan", "aaaaaaaaaaa9", "2026-01-01T00:00:09", parent_id="bbbbbbbbbbbb",
                            parent_name="gone"), 128 << 20)
        _instance(root, "net", "aaaaaaaaaab1", "2026-01-01T00:00:10",
                  network={"mode": "default", "publish": [{"host_port": 8080, "guest_port": 80, "proto": "tcp"}],
                           "egress": "deny", "allow": ["10.0.0.0/8"]})
        for iid in ("aaaaaaaaaaa1", "aaaaaaaaaaa3"):
            (root / "locks" / f"{iid}.lock").touch()
        (root / "locks" / "global.lock").touch()
        yield root
    finally:
        for p in live:
            p.kill()
            p.wait()


def _vmfork(*args: str, entry: str = "vmfork", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if k not in ("VMFORK_HOST", "VMFORK_DATA_DIR")} | (env or {})
    return subprocess.run([sys.executable, "-m", entry, *args], capture_output=True, check=True, env=e)


def _snapshot_of(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mode, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_ps_json_without_the_cli_prints_what_the_cli_prints(states: Path) -> None:
    before = _snapshot_of(states)
    fast = _vmfork("--data-dir", str(states), "ps", "--json")
    assert _snapshot_of(states) == before  # read-only: nothing created, nothing changed
    slow = _vmfork("--data-dir", str(states), "ps", "--json", entry="vmfork.cli")
    assert fast.stdout == slow.stdout and fast.stderr == slow.stderr == b""
    rows = {r["name"]: r for r in json.loads(fast.stdout)}
    assert {n: r["state"] for n, r in rows.items()} == {
        "run": "running", "paused": "paused", "standby": "standby", "stopped": "stopped", "stale": "stopped",
        "trunc": "error", "nocfg": "error", "bad": "error", "orphan": "standby", "net": "stopped"}
    assert "below the low-water mark" in rows["paused"]["problem"]
    assert "memory file holds 67108864 bytes" in rows["trunc"]["problem"]
    assert rows["nocfg"]["problem"] == "snapshot is incomplete: config.json missing"
    assert rows["bad"]["id"] == "aaaaaaaaaaa8" and "instance.json is invalid" in rows["bad"]["problem"]
    assert rows["orphan"]["parent"] == "gone (deleted)"
    assert rows["net"]["network"]["egress"] == "deny" and rows["run"]["pid"]
    # the same through env VMFORK_DATA_DIR, -q, and --data-dir=
    for args, env in ((["-q", "ps", "--json"], {"VMFORK_DATA_DIR": str(states)}),
                      ([f"--data-dir={states}", "--quiet", "ps", "--json"], None)):
        assert _vmfork(*args, env=env).stdout == fast.stdout


def test_ps_json_without_the_cli_loads_no_cli_library(states: Path) -> None:
    out, mods = loaded_after(["ps", "--json"], states)
    assert len(json.loads(out)) == 10
    heavy = {"click", "rich", "pydantic", "httpx", "qemu", "vmfork.cli", "vmfork.instances.manager"}
    assert not heavy & (mods | {m.split(".")[0] for m in mods}), sorted(heavy & mods)


@pytest.mark.parametrize("leftover", ["guests/.tmp-cccccccccccc", "guests/aaaaaaaaaaa3/snapshots/.snapshot-tmp",
                                      "locks/dddddddddddd.lock", "snapshots/.tmp-eeeeeeeeeeee"])
def test_ps_json_leaves_a_data_dir_that_needs_recovery_to_the_cli(states: Path, leftover: str) -> None:
    from vmfork.fastpath import ps_json

    argv = ["--data-dir", str(states), "ps", "--json"]
    assert ps_json(argv) is not None
    p = states / leftover
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch() if p.suffix == ".lock" else p.mkdir()
    assert ps_json(argv) is None  # the CLI recovers first, then lists
    _vmfork(*argv)
    assert not p.exists()


@pytest.mark.parametrize("argv", [["ps"], ["ps", "--json", "-h"], ["--host", "x", "ps", "--json"], ["-qq", "ps", "--json"],
                                  ["ps", "--json", "extra"], ["inspect", "ps", "--json"], ["--data-dir", "", "ps", "--json"],
                                  ["--data-dir"], ["--firecracker-bin", "f", "ps", "--json"]])
def test_ps_json_fast_path_answers_only_its_own_command_line(tmp_path: Path, argv: list[str]) -> None:
    from vmfork.fastpath import ps_json

    assert ps_json(argv) is None


def test_ps_json_with_a_server_goes_through_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmfork.fastpath import ps_json

    assert ps_json(["--data-dir", str(tmp_path), "ps", "--json"]) == "[]\n"
    monkeypatch.setenv("VMFORK_HOST", str(tmp_path / "api.sock"))
    assert ps_json(["--data-dir", str(tmp_path), "ps", "--json"]) is None


def test_ps_json_on_a_data_dir_with_only_a_leftover_goes_to_the_cli(tmp_path: Path) -> None:
    from vmfork.fastpath import ps_json

    (tmp_path / "guests" / ".tmp-cccccccccccc").mkdir(parents=True)  # a first run that crashed
    assert ps_json(["--data-dir", str(tmp_path), "ps", "--json"]) is None
