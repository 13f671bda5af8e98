"""Issue 8: broken metadata and broken snapshots are reported, never silently dropped.

- a snapshot missing ``config.json``, with a truncated mem-file or a flipped byte in its state
  is refused by restore and fork with one short line (before any VMM starts), shown as
  ``error`` with its problem, and kept: put right, it restores;
- an instance whose ``instance.json`` is invalid is listed with its problem, keeps its name
  taken, and can be removed by name or id.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="module")
def bcli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    with data_dir_on("ext4", tmp_path_factory.mktemp("broken")) as cli:
        cli("run", "src", "--memory", "128M")
        cli.sh("src", "echo kept > /run/sentinel")
        cli("standby", "src")
        yield cli


def _snap(cli: CLI, name: str) -> Path:
    return Path(cli.json("inspect", name)["dir"]) / "snapshots" / "snapshot-latest"  # type: ignore[index]


def _row(cli: CLI, name: str) -> dict[str, object]:
    rows = [r for r in cli.json("ps") if r["name"] == name]  # type: ignore[union-attr, index]
    assert len(rows) == 1, rows
    return rows[0]  # type: ignore[return-value]


def _refused(cli: CLI, *args: str, match: str) -> str:
    r = cli(*args, check=False)
    err = r.stderr.decode()
    assert r.returncode == 5, (args, r.returncode, err)
    assert match in err, err
    assert err.count("\n") == 1 and len(err) < 400, err  # one short line, no QEMU command line
    return err


def test_flipped_state_byte_is_refused_by_fork_and_restore(bcli: CLI) -> None:
    state = _snap(bcli, "src") / "state"
    good = state.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    state.write_bytes(bad)
    try:
        _refused(bcli, "fork", "src", "copy", match="state does not match the digest")
        _refused(bcli, "restore", "src", match="state does not match the digest")
        assert "copy" not in {r["name"] for r in bcli.json("ps")}  # type: ignore[union-attr, index]
        assert bcli.json("inspect", "src")["snapshot"]["problem"]  # type: ignore[index]
    finally:
        state.write_bytes(good)
    assert bcli.json("inspect", "src")["snapshot"]["problem"] is None  # type: ignore[index]


def test_truncated_memory_is_an_error_and_refused_at_once(bcli: CLI) -> None:
    mem = _snap(bcli, "src") / "memory"
    aside = mem.with_name("memory.aside")
    shutil.copyfile(mem, aside)
    os.truncate(mem, 64 << 20)
    try:
        row = _row(bcli, "src")
        assert row["state"] == "error" and "memory file holds 67108864 bytes" in str(row["problem"])
        _refused(bcli, "restore", "src", match="128 MiB")
        _refused(bcli, "fork", "src", "copy", match="128 MiB")
        _refused(bcli, "start", "src", match="is broken")
    finally:
        os.replace(aside, mem)
    assert _row(bcli, "src")["state"] == "standby"


def test_missing_config_is_reported_not_discarded(bcli: CLI) -> None:
    cfg = _snap(bcli, "src") / "config.json"
    text = cfg.read_bytes()
    cfg.unlink()
    try:
        row = _row(bcli, "src")
        assert row["state"] == "error" and row["problem"] == "snapshot is incomplete: config.json missing"
        _refused(bcli, "start", "src", match="config.json missing")  # no silent cold boot
        _refused(bcli, "restore", "src", match="config.json missing")
        assert (_snap(bcli, "src") / "memory").is_file()  # kept
    finally:
        cfg.write_bytes(text)
    # put right, it restores with its RAM
    bcli("restore", "src")
    assert bcli.sh("src", "cat /run/sentinel") == "kept"
    bcli("standby", "src")


def test_invalid_instance_json_is_listed_reserved_and_removable(bcli: CLI) -> None:
    for how, ref_kind in (("garbage", "id"), ("types", "name")):
        bcli("fork", "src", "bad")
        d = Path(bcli.json("inspect", "bad")["dir"])  # type: ignore[index]
        meta = d / "instance.json"
        if how == "garbage":
            meta.write_text('{"name": "bad", "memory_mib": ')  # cut short
        else:
            meta.write_text(json.dumps(json.loads(meta.read_text()) | {"vcpus": "two"}))
        row = _row(bcli, "bad")
        assert row["state"] == "error" and "instance.json is invalid" in str(row["problem"])
        assert row["id"] == d.name
        r = bcli("run", "bad", check=False)  # the name stays taken
        assert r.returncode == 4 and "already exists" in r.stderr.decode()
        _refused(bcli, "restore", "bad", match="is broken")
        bcli("rm", d.name if ref_kind == "id" else "bad")
        assert not d.exists()
        assert "bad" not in {r["name"] for r in bcli.json("ps")}  # type: ignore[union-attr, index]
        assert not (bcli.data_dir / "locks" / f"{d.name}.lock").exists()
