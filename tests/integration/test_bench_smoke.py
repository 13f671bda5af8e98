"""``python -m vmfork.bench --smoke`` runs end to end (~40 s) and writes well-formed results.

Only the shape is checked: every metric family present with its unit, medians that are the
medians of their samples, ratios equal to the values they name from the same run, host facts,
the table and the plot. No figure is judged here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import vm_unavailable_reason
from tests.fsutil import loop_fs_unavailable_reason
from vmfork.bench.stats import UNITS, median, recompute_ratio

pytestmark = [pytest.mark.vm, pytest.mark.slow]

EXPECTED = {
    "fork_phase_ms": "ms",
    "fork_host_ms": "ms",
    "fork_running_ms": "ms",
    "bare_restore_ms": "ms",
    "fork_host_over_bare_restore": "ratio",
    "pool_claim_ms": "ms",
    "pool_prestart_ms": "ms",
    "pool_vmm_idle_pss_mib": "MiB",
    "pool_claim_over_bare_restore": "ratio",
    "pool_fork_host_ms": "ms",
    "pool_slot_idle_pss_mib": "MiB",
    "pool_fork_host_over_bare_restore": "ratio",
    "pool_fork_host_pooled_over_unpooled": "ratio",
    "cli_fork_standby_ms": "ms",
    "inprocess_fork_standby_ms": "ms",
    "cli_overhead_ms": "ms",
    "python_startup_ms": "ms",
    "cli_startup_ms": "ms",
    "cli_ps_json_ms": "ms",
    "cli_version_over_python": "ratio",
    "cli_ps_json_over_python": "ratio",
    "memfile_data_mib": "MiB",
    "fork_standby_ms": "ms",
    "copy_memfile_ms": "ms",
    "fork_over_copy": "ratio",
    "copy_guest_ms": "ms",
    "fork_over_copy_same_files": "ratio",
    "standby_ms": "ms",
    "standby_again_over_first": "ratio",
    "fanout_wall_ms": "ms",
    "fanout_wall_over_n_single": "ratio",
    "fork_lifecycle_disk_mib": "MiB",
    "fork_file_allocated_mib": "MiB",
    "fork_file_exclusive_mib": "MiB",
    "vmm_rss_mib": "MiB",
    "vmm_pss_mib": "MiB",
    "boot_ms": "ms",
}


def test_bench_smoke_writes_complete_results(tmp_path: Path):
    reason = vm_unavailable_reason() or loop_fs_unavailable_reason("xfs")
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "vmfork.bench", "--smoke", "--out", str(out), "--work", str(tmp_path),
         "--no-readme"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "vmfork-bench/1" and doc["mode"] == "smoke"
    assert doc["command"].startswith("python -m vmfork.bench --smoke")
    for key in ("kernel", "cpu", "cores", "qemu", "accel"):
        assert doc["host"][key], key
    records = doc["records"]
    by_metric: dict[str, list[dict]] = {}
    for rec in records:
        by_metric.setdefault(rec["metric"], []).append(rec)
        assert rec["unit"] in UNITS
        assert rec["host"]["accel"] == doc["host"]["accel"]
        assert rec["n"] == len(rec["samples"]) >= 1
        if rec["unit"] == "ratio":
            assert rec["value"] == pytest.approx(recompute_ratio(records, rec), rel=1e-3, abs=1e-3)
        else:
            assert rec["value"] == pytest.approx(median(rec["samples"]), abs=1e-3)
    for metric, unit in EXPECTED.items():
        assert metric in by_metric, f"{metric} missing"
        assert {rec["unit"] for rec in by_metric[metric]} == {unit}, metric
    # both filesystems where ext4 loop mounts work, and the lever comparison on XFS
    fss = {rec["params"]["fs"] for rec in by_metric["fork_standby_ms"]}
    assert "xfs" in fss
    configs = {rec["params"]["config"] for rec in by_metric["fork_lifecycle_disk_mib"] if rec["params"]["fs"] == "xfs"}
    assert {"vmfork", "qemu-default"} <= configs
    phases = {rec["params"]["phase"] for rec in by_metric["fork_phase_ms"]}
    assert {"clone", "VMM spawn", "QMP handshake", "state load", "resume", "agent ready"} <= phases
    table = (out / "table.md").read_text()
    assert "fork_host_over_bare_restore" in table
    assert (out / "bench.png").stat().st_size > 1000


def test_bench_only_runs_those_parts(tmp_path: Path):
    """``--only breakdown,pool,pooled``: those parts' metrics and no others; the pooled VMM's
    guest answered and the warm pool's slot was taken (the parts raise otherwise); results go
    to OUT, no README is written."""
    reason = vm_unavailable_reason() or loop_fs_unavailable_reason("xfs")
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "vmfork.bench", "--smoke", "--only", "breakdown,pool,pooled", "--out", str(out),
         "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())["records"]
    metrics = {rec["metric"] for rec in records}
    assert {"fork_host_over_bare_restore", "pool_claim_ms", "pool_claim_over_bare_restore",
            "pool_fork_host_over_bare_restore", "pool_slot_idle_pss_mib"} <= metrics
    assert not metrics & {"cli_startup_ms", "fork_standby_ms", "fanout_wall_ms", "vmm_pss_mib"}
    for rec in records:
        if rec["unit"] == "ratio":
            assert rec["value"] == pytest.approx(recompute_ratio(records, rec), rel=1e-3, abs=1e-3)
    assert not (out / "README.md").exists()


def test_bench_only_refuses_an_unknown_part():
    r = subprocess.run([sys.executable, "-m", "vmfork.bench", "--only", "breakdown,nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown part 'nope'" in r.stderr and "breakdown" in r.stderr
